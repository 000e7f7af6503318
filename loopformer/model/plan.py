"""How to run the circuits of one forward pass (`Plan`), and what the pass reports back (`Diagnostics`).

A plan is a pytree keyed by circuit name, passed into the jitted forward: its arrays (loop counts,
gates, fills, the PRNG key) are traced, so a new count or ablation never recompiles; its static
fields (truncation depths, trace length, whether to collect means) choose the program.

    loops  {name: int32 []}        iterations of each circuit
    gates  {name: float32 []}      1 runs the circuit, 0 removes it (its output is replaced by the fill)
    fills  {name: float32 [D]}     what a removed circuit writes (None: zeros, i.e. zero ablation)
    key    PRNG key                noise-initialised states
    backprop ((name, k), ...)      static: training with gradient through each circuit's last k iterations
                                   (empty: inference, every loop a plain fori_loop)
    grads  {name: int32 [] or [B, T]}  training: gradient through the last min(g, k) iterations instead of k
                                   (the progressive loss's random k; empty: k)
    by_difficulty ((name, a, b, cap), ...)  static: counts round(a * difficulty + b) clipped to [1, cap] per
                                   token, from the batch's ``difficulty`` (`Plan.for_batch`; loops X=auto)
    trace_len                      static: record per-iteration state statistics of iterations 1..trace_len
    collect_means                  static: report each circuit's mean output over the real tokens
    collect_norms                  static: report each circuit's write norm ||g_c * out_c|| per token [B, T]
    exits {name: ExitRule}         per-token exit rules (`loopformer.variants.exits`; kinds static, thresholds
                                   traced); the circuit's loop count is then the cap
    stash                          static: L > 0 records every iteration of a halting circuit (its exit
                                   distribution, and the logits after each iteration; L >= its count)
    windows ((name, W), ...)       static: training, the circuit also reports its last W states (W <= its
                                   truncation depth) and the model the logits after each (train.iteration_loss)
    bound                          static: the largest per-token count or routed round when training
                                   (the length of the scan that carries the gradient)
    position_offset                static: K > 0 adds one offset from U{0..K} per row to every abacus place
                                   (training; drawn from the plan's key; 0: none)
    compact                        static: in evaluation and cached decoding (prefill and each step) with exits
                                   or per-token counts, one-block circuits
                                   compute only the tokens still running (gathered into a dense buffer of a
                                   few static sizes), reusing the frozen tokens' keys and values; False: every
                                   token runs every iteration (masked); None (default): compact batches of at
                                   least COMPACT_MIN_TOKENS tokens, where it pays for its extra programs. Both
                                   give the same logits
    compact_shares                 static: the buffer sizes of compacted inference, as shares s >= 1 of the batch's
                                   rows and of the sequence (caps ceil(B / s) by ceil(T / s), one compiled branch per
                                   pair; in evaluation also flat buffers of ceil(B T / s) tokens), 1 among them;
                                   default COMPACT_SHARES, read when the plan is made; a masked plan
                                   (compact False) keeps none, so its program does not depend on them
    schedules {stack: int32 [S]}   layer schedules of the plain stacks ("prelude", "coda"): the layers run
                                   in this order, -1 entries skipped (`loopformer.model.schedule`); every
                                   schedule of one length S shares a program. Empty: each stack in order

Loop counts may be one per token ([B, T]) instead of one per circuit: a token past its count keeps its
state (copy-forward).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from loopformer.config.schema import MAX_LOOPS, CircuitConfig, ModelConfig
from loopformer.errors import PlanError
from loopformer.variants.exits import ExitRule
from loopformer.variants.loops import PerDifficulty

Array = jax.Array

# Compacted inference gathers the running tokens into a buffer of one of these shares of the rows and of the sequence
# (rounded up; the smallest that holds every row's running tokens): one program per pair, picked by lax.switch at
# run time. Finer shares waste less of the buffer and cost more branches to trace and compile.
COMPACT_SHARES = (1, 2, 4, 8)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["loops", "gates", "fills", "key", "exits", "schedules", "grads"],
                   meta_fields=["backprop", "trace_len", "collect_means", "stash", "bound", "collect_norms",
                                "by_difficulty", "position_offset", "compact", "windows", "compact_shares"])
@dataclass(frozen=True)
class Plan:
    loops: Mapping[str, Array]
    gates: Mapping[str, Array]
    fills: Mapping[str, Array] | None = None
    key: Array | None = None
    backprop: tuple[tuple[str, int], ...] = ()
    trace_len: int = 0
    collect_means: bool = False
    collect_norms: bool = False
    exits: Mapping[str, ExitRule] = field(default_factory=dict)
    stash: int = 0
    bound: int = 0
    schedules: Mapping[str, Array] = field(default_factory=dict)
    grads: Mapping[str, Array] = field(default_factory=dict)
    by_difficulty: tuple[tuple[str, float, float, int], ...] = ()
    position_offset: int = 0
    compact: bool | None = None
    windows: tuple[tuple[str, int], ...] = ()
    compact_shares: tuple[float, ...] = field(default_factory=lambda: COMPACT_SHARES)

    def for_batch(self, difficulty_BT: Array | None) -> Plan:
        """This plan with its per-difficulty counts resolved from a batch's ``difficulty`` [B, T] (int32;
        0 on padding); unchanged when it has none. PlanError when it needs them and the batch has none."""
        if not self.by_difficulty:
            return self
        if difficulty_BT is None:
            names = ", ".join(n for n, *_ in self.by_difficulty)
            raise PlanError(f"loops of {names} follow each example's difficulty, but these batches carry none (text "
                            f"has no difficulty); give a count, e.g. --loops {self.by_difficulty[0][0]}=8")
        loops = dict(self.loops)
        for name, a, b, cap in self.by_difficulty:
            loops[name] = PerDifficulty(a, b, cap=cap).counts(difficulty_BT)
        return dataclasses.replace(self, loops=loops, by_difficulty=())

    @property
    def training(self) -> bool:
        return bool(self.backprop)

    def truncation(self, name: str) -> int:
        """Backprop depth k of a circuit (0: no gradient needed, inference)."""
        return dict(self.backprop).get(name, 0)

    def exit_of(self, name: str) -> ExitRule | None:
        return self.exits.get(name)

    def circuit(self, name: str, key: Array) -> CircuitPlan:
        """How to run one circuit (its PRNG ``key`` folded from the plan's by the caller)."""
        return CircuitPlan(self.loops[name], key, self.exit_of(name), self.truncation(name), self.trace_len,
                           self.stash, self.bound, self.grads.get(name), self.compact, dict(self.windows).get(name, 0),
                           self.compact_shares)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["loops", "key", "exit", "grad"],
                   meta_fields=["backprop", "trace_len", "stash", "bound", "compact", "window", "compact_shares"])
@dataclass(frozen=True)
class CircuitPlan:
    """One circuit's part of a `Plan`: its count ``loops`` (int32 [] or per token [B, T]; the cap under an exit
    rule), PRNG ``key``, ``exit`` rule, the static truncation depth, trace length, stash and bound, and
    ``grad`` (None, or the traced iterations <= backprop that carry gradient), whether inference may
    compact (`Plan.compact`, in buffers of `Plan.compact_shares`), and ``window`` (training: report the last W states;
    `Plan.windows`)."""

    loops: Array
    key: Array
    exit: ExitRule | None = None
    backprop: int = 0
    trace_len: int = 0
    stash: int = 0
    bound: int = 0
    grad: Array | None = None
    compact: bool | None = None
    window: int = 0
    compact_shares: tuple[float, ...] = field(default_factory=lambda: COMPACT_SHARES)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["trace", "mean_out", "used", "exit_p", "ponder", "write_norm", "computed",
                                "exit_lambda", "scored", "settle"],
                   meta_fields=[])
@dataclass(frozen=True)
class CircuitReport:
    """What one circuit reports: ``trace`` [trace_len, 3] (`loopformer.model.loop.TRACE_STATS` of each
    iteration; NaN past its count) when the plan traces; ``mean_out`` [D] when it collects means;
    ``used`` [B, T] the iterations each token ran (exits, per-token counts, routing); with a halting
    head and a stash, ``exit_p`` [L, B, T] the exit distribution, ``exit_lambda`` [L, B, T] the head's
    lambda_t and ``ponder`` [B, T] ACT's N + R;
    ``write_norm`` [B, T] ||g_c * out_c|| at each token when the plan collects norms (its on-indicator);
    ``computed`` [] in inference, the token-iterations its blocks executed over the batch (padding included;
    `CircuitOut.computed`); ``scored`` [] in inference of a routed bank, the token-rounds its router scored;
    ``settle`` [B, T] in training with a window of 2 or more, its state's squared relative change over its last
    iteration (`CircuitOut.settle`)."""

    trace: Array | None = None
    mean_out: Array | None = None
    used: Array | None = None
    exit_p: Array | None = None
    ponder: Array | None = None
    write_norm: Array | None = None
    computed: Array | None = None
    exit_lambda: Array | None = None
    scored: Array | None = None
    settle: Array | None = None


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["circuits", "aux_loss", "step_logits", "step_valid"],
                   meta_fields=[])
@dataclass(frozen=True)
class Diagnostics:
    """The forward pass's report: one `CircuitReport` per circuit name; ``aux_loss`` [] the routers'
    auxiliary losses (0 without a router); ``step_logits`` [L, B, T, V] the logits after every iteration
    of an ouro / pondernet halting circuit when the plan stashes (for its per-step loss), or after each of
    the last W iterations of a circuit the plan windows (`Plan.windows`, row j: iteration n - j);
    ``step_valid`` [W, B, T] the rows each token's window reads where its count does not say (a routed bank's
    own rounds, router.window=own), else None (rows with n - j >= 1)."""

    circuits: dict[str, CircuitReport] = field(default_factory=dict)
    aux_loss: Array | float = 0.0
    step_logits: Array | None = None
    step_valid: Array | None = None


def resolve_loops(defaults: Mapping[str, int], loops: Mapping[str, int] | None = None) -> dict[str, int]:
    """Every circuit's count: ``defaults`` (each circuit's eval_loops) overridden by ``loops``, checked:
    PlanError on an unknown circuit or a count outside 1..MAX_LOOPS."""
    out = dict(defaults)
    for name, n in (loops or {}).items():
        if name not in out:
            raise PlanError(f"unknown circuit '{name}'; this model's circuits are {', '.join(out) or 'none'}")
        if isinstance(n, bool) or not isinstance(n, int | np.integer):
            raise PlanError(f"loop count of circuit '{name}' must be an integer, got {n!r}")
        if not 1 <= int(n) <= MAX_LOOPS:
            raise PlanError(f"loop count of circuit '{name}' must be in 1..{MAX_LOOPS}, got {n}")
        out[name] = int(n)
    return out


def difficulty_rules(model: ModelConfig, circuits: Sequence[str] | None = None,
                     cap: int = MAX_LOOPS) -> dict[str, tuple[float, float, int]]:
    """{circuit: (a, b, cap)} for the circuits (default: all) trained with loops per_difficulty(a, b): the
    rule evaluation applies (``auto``), capped at ``cap`` (not at max_loops: harder instances get more)."""
    out = {}
    for c in model.circuits():
        dist = c.distribution()
        if (circuits is None or c.name in circuits) and dist.per_example:
            out[c.name] = (dist.a, dist.b, cap)
    return out


def default_exit_cap(circuit: CircuitConfig) -> int:
    """The cap of an exiting circuit given no count: the larger of its max_loops and eval_loops (a halting head was
    trained up to its max_loops)."""
    return max(circuit.max_loops, circuit.eval_loops)


def exit_caps(model: ModelConfig, exits: Mapping[str, ExitRule], loops: Mapping[str, int],
              max_loops: int | None = None) -> dict[str, int]:
    """``loops`` with every exiting circuit at its cap: ``max_loops`` if given, else its count in ``loops``
    if it has one, else the larger of its max_loops and eval_loops (a halting head was trained up to its
    max_loops). PlanError for a rule the circuit cannot run (learned:q without a halting head; on an ACT circuit, whose
    write mixes its iterations' up to its halting, a rule other than learned, or learned with min / every; any rule in
    a routed stage, whose router decides when each token stops) or that could stop no token (min / every at or past
    the cap)."""
    out = dict(loops)
    routed = {c.name for s in model.stages if s.router.routes for c in s.circuits}
    for c, rule in exits.items():
        cfg = model.circuit(c)
        if c in routed:
            raise PlanError(f"exit {c}={rule}: circuit {c} is in a routed stage, whose router decides when each token "
                            f"stops; drop --exit (its loop count caps the router's rounds)")
        if rule.needs_head and not cfg.halting.has_head:
            raise PlanError(f"exit {c}={rule}: circuit {c} was trained without a halting head (halting.kind: none); "
                            f"use latent_diff, kl or entropy_diff for it")
        if cfg.halting.rule().mixes_output and not rule.needs_head:  # it wrote the last state: another function
            raise PlanError(f"exit {c}={rule}: circuit {c} halts by {cfg.halting.kind}, which writes the mixture of its "
                            f"iterations' writes weighted by its halting probabilities; this rule would stop its tokens "
                            f"and write their last state instead, which it was not trained to write; use "
                            f"learned:q=Q (its own halting, up to the cap)")
        if cfg.halting.rule().mixes_output and (rule.min_loops > 1 or rule.check_every > 1):
            # its halting gives a token the whole remaining mass where that mass reaches q; kept running past there,
            # each later iteration got the remainder again: weights 1, 0.4, 0.1 (sum 1.5) under min=3 (#27 pass 31)
            raise PlanError(f"exit {c}={rule}: circuit {c} halts by {cfg.halting.kind}, which writes the mixture of "
                            f"its iterations' writes up to where its halting mass reaches q; min= and every= would run "
                            f"its tokens past that point, and their writes would weigh more than the whole mass (not a "
                            f"mixture); drop min= and every= (learned:q=Q: its own halting, up to the cap)")
        if max_loops and c in loops and loops[c] != max_loops:  # one of the two would be silently dropped
            raise PlanError(f"--loops {c}={loops[c]} and --max-loops {max_loops} both cap circuit {c}, which exits by "
                            f"a rule; give one")
        out[c] = max_loops or loops.get(c) or default_exit_cap(cfg)
        first = rule.first_stop()
        # every token ran to the cap, as if no rule were given: a first stop at the cap too, where every token stops
        # anyway (`min=20` under a cap of 20 was accepted and did nothing, #27 pass 30)
        if first >= out[c]:
            where = "past" if first > out[c] else "at"
            raise PlanError(f"exit {c}={rule}: the rule can first stop a token after iteration {first}, {where} circuit "
                            f"{c}'s cap of {out[c]} loops, so no token could stop by it"
                            f"{' before the cap, where every token stops' if first == out[c] else ''}; lower "
                            f"{'K, ' if rule.whole else ''}min or every, or raise the cap "
                            f"({f'--loops {c}=N' if c in loops and not max_loops else '--max-loops N'})")
    return out


def checked_shares(shares: Sequence[float]) -> tuple[float, ...]:
    """Compaction's buffer sizes as shares of the batch's rows and tokens (1: the whole batch, 2: half, ...): distinct
    finite numbers >= 1, 1 among them; else PlanError naming the list and the fix."""
    shares = tuple(float(x) for x in shares)
    if not shares or not all(np.isfinite(x) and x >= 1 for x in shares) or len(set(shares)) < len(shares):
        raise PlanError(f"compact_shares {list(shares)}: give distinct finite shares of at least 1, e.g. 1, 2, 4, 8 (a "
                        f"buffer of the whole batch, of half its rows and tokens, ...)")
    if 1 not in shares:  # the largest buffer is then smaller than the batch: the tokens past it were never run
        raise PlanError(f"compact_shares {list(shares)}: include 1 (a buffer of the whole batch, for the iterations "
                        f"where every token runs), e.g. 1, {', '.join(f'{x:g}' for x in shares)}")
    return shares


def make_plan(circuits: Sequence[str], loops: Mapping[str, int | Array], *, ablate: Sequence[str] = (),
              fills: Mapping[str, Array] | Array | None = None, key: Array | None = None,
              backprop: Mapping[str, int] | None = None, trace_len: int = 0, collect_means: bool = False,
              exits: Mapping[str, ExitRule | str] | None = None, stash: int = 0, bound: int = 0,
              schedules: Mapping[str, Array | np.ndarray] | None = None,
              by_difficulty: Mapping[str, tuple[float, float, int]] | None = None, position_offset: int = 0,
              compact: bool | None = None, windows: Mapping[str, int] | None = None,
              compact_shares: Sequence[float] | None = None) -> Plan:
    """A plan for a model with these ``circuits`` (in model order). ``loops`` must name every circuit
    (use `resolve_loops` to fill in defaults); ``ablate`` gates circuits off; ``fills`` is a mapping
    by name or an array [num_circuits, D] in circuit order; ``exits`` maps circuits to exit rules;
    ``schedules`` maps "prelude" / "coda" to a layer schedule; ``by_difficulty`` maps circuits to (a, b, cap):
    their counts follow each example's difficulty (`Plan.for_batch`; their entries in ``loops`` are then
    placeholders); ``position_offset`` K > 0 shifts each row's abacus places by a draw from U{0..K} (training);
    ``compact`` True / False forces compacted / masked inference, None leaves it to the batch's size
    (`Plan.compact`) and ``compact_shares`` its buffers (None: COMPACT_SHARES); ``windows`` maps a circuit to W:
    training reads the logits after its last W iterations."""
    exits = {c: r if isinstance(r, ExitRule) else ExitRule.parse(r) for c, r in (exits or {}).items()}
    missing = [c for c in circuits if c not in loops]
    unknown = [c for c in list(loops) + list(ablate) + list(exits) + list(windows or {}) if c not in circuits]
    if unknown:
        raise PlanError(f"unknown circuit '{unknown[0]}'; this model's circuits are {', '.join(circuits) or 'none'}")
    if missing:
        raise PlanError(f"no loop count for circuit(s) {', '.join(missing)}")
    bad = [k for k in (schedules or {}) if k not in ("prelude", "coda")]
    if bad:
        raise PlanError(f"layer schedule for '{bad[0]}': only the plain stacks prelude and coda take one")
    if fills is not None and not isinstance(fills, Mapping):
        fills = {c: jnp.asarray(fills)[i] for i, c in enumerate(circuits)}
    shares = COMPACT_SHARES if compact_shares is None else checked_shares(compact_shares)
    if compact is False:
        shares = ()  # masked: no buffers, and no separate program per setting of them
    return Plan(loops={c: jnp.asarray(loops[c], jnp.int32) for c in circuits},
                gates={c: jnp.asarray(0.0 if c in ablate else 1.0, jnp.float32) for c in circuits},
                fills=None if fills is None else {c: jnp.asarray(fills[c], jnp.float32) for c in circuits},
                key=jax.random.key(0) if key is None else key,
                backprop=tuple((c, int(k)) for c, k in (backprop or {}).items()),
                trace_len=int(trace_len), collect_means=bool(collect_means),
                exits={c: exits[c] for c in circuits if c in exits}, stash=int(stash), bound=int(bound),
                schedules={k: jnp.asarray(v, jnp.int32) for k, v in (schedules or {}).items()},
                by_difficulty=tuple((c, float(a), float(b), int(cap)) for c, (a, b, cap) in (by_difficulty or {}).items()),
                position_offset=int(position_offset), compact=None if compact is None else bool(compact),
                windows=tuple((c, int(w)) for c, w in (windows or {}).items()),
                compact_shares=shares)
