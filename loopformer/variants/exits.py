"""Exit rules: when a token stops iterating a circuit at inference (no training needed, except ``learned``).

A rule is checked after each iteration i (1-based) for every token still running; a token whose rule
fires stops and keeps its last state (copy-forward), so its neighbours keep reading a stable value.
The plan's loop count of the circuit is the cap (``max_loops``).

    latent_diff:EPS     ||h_i - h_{i-1}|| / ||h_i|| < EPS            (Huginn's default 0.03)
    kl:EPS              KL(p_i || p_{i-1}) < EPS on the next-token distributions read out through the
                        rest of the model after each iteration (Huginn: 5e-4 .. 1e-3)
    entropy_diff:EPS    |H(p_i) - H(p_{i-1})| < EPS (same readout)
    patience:K          the top-1 prediction (same readout) unchanged for K iterations in a row (PABEE)
    context_diff:EPS    latent_diff's test holds for the token and for every token that can reach it (the
                        tokens before it in a causal model, its whole row in a bidirectional one)
    learned:q=Q         a circuit trained with a halting head: its halting kind's stop test
                        (ouro / pondernet: the exit CDF 1 - prod_{j<=i} (1 - lambda_j) reaches Q)

Options follow after commas: ``latent_diff:0.01,min=2,every=2`` (``min``: never stop before iteration
min; ``every``: check only every k-th iteration). A new rule is one class registered with `register_exit`:
its threshold's range, its stop test (`ExitRule.start` / `ExitRule.stop`) and, when it reads the model's
output, ``needs_readout``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from loopformer.errors import DecodingError, PlanError, unplain_digits
from loopformer.variants.halting import Halting
from loopformer.variants.loops import MAX_LOOPS
from loopformer.variants.registry import Registry

Array = jax.Array
EXITS: Registry = Registry("exit rule")

# the thresholds a rule can compare against: it compares in float32, where smaller ones are 0 and larger ones infinite
FLOAT32_RANGE = (float(np.finfo(np.float32).smallest_subnormal), float(np.finfo(np.float32).max))


class Probe(Protocol):
    """What a rule may read of the circuit it stops: its write of a state (``emit(h)`` [..., O]), the
    model's logits given that write (``readout``; None when the model cannot read out here), its halting
    head (``halt_prob(h)`` [...], and ``halting`` the kind), the cap ``n``, the write's width and whether its
    attention is causal."""

    n: Array
    out_width: int
    halting: Halting
    readout: Any
    causal: bool

    def emit(self, h: Array) -> Array: ...

    def halt_prob(self, h: Array) -> Array: ...


@dataclass(frozen=True)
class ExitRule:
    """A rule (static: its kind, min_loops, check_every) and its threshold (traced inside a plan, so
    sweeping thresholds reuses one compiled program). Build one with `ExitRule.parse` or `exit_rule`."""

    threshold: float | Array
    min_loops: int = 1
    check_every: int = 1
    kind: ClassVar[str] = ""
    needs_readout: ClassVar[bool] = False  # reads the model's output distribution after every iteration
    needs_head: ClassVar[bool] = False  # reads the circuit's halting head
    reads_earlier: ClassVar[bool] = False  # a token's stop depends on the states of the tokens before it
    uncached: ClassVar[str] = ""  # why cached decoding cannot run the rule ("" when it can; `check_decoding`)
    prefix: ClassVar[str] = ""  # written before the threshold: KIND:PREFIX VALUE (learned:q=0.5)
    placeholder: ClassVar[str] = "EPS"
    at_most_one: ClassVar[bool] = False  # threshold in (0, 1]
    whole: ClassVar[bool] = False  # the threshold counts iterations (a whole number)

    @staticmethod
    def parse(text: str) -> ExitRule:
        """``latent_diff:0.01``, ``kl:5e-4,min=2``, ``learned:q=0.5,every=2``; PlanError naming the forms."""
        forms = ", ".join(EXITS.get(n).form() for n in EXITS.names())
        forms = f"{forms}, optionally followed by ,min=N and ,every=K"
        foreign = unplain_digits(text or "")
        if foreign:  # `latent_diff:٠.١` and `min=٢` were read as 0.1 and 2 (#27 pass 40's leftover)
            raise PlanError(f"exit rule '{text}': {foreign}")
        # the threshold as any word, so that nan, inf or a typo is named as a number (they were "not one of" the forms)
        m = re.fullmatch(r"\s*(\w+)\s*:\s*(?:(\w+)\s*=\s*)?([-+\w.]+)\s*((?:,\s*\w+\s*=\s*\d+\s*)*)", text or "")
        if not m or m.group(1) not in EXITS:
            raise PlanError(f"exit rule '{text}' is not one of {forms}")
        cls = EXITS.get(m.group(1))
        if (m.group(2) or "") != cls.prefix.rstrip("="):
            raise PlanError(f"exit rule '{text}': write {cls.form()} (the forms: {forms})")
        options = {}
        for opt in filter(None, (o.strip() for o in m.group(4).split(","))):
            key, _, value = opt.partition("=")
            if key.strip() not in ("min", "every"):
                raise PlanError(f"exit rule '{text}': unknown option '{key.strip()}' (min=N, every=K)")
            if key.strip() in options:  # the last one would win with no word
                raise PlanError(f"exit rule '{text}': {key.strip()}= is given twice; give it once")
            options[key.strip()] = int(value)
        try:
            threshold = float(m.group(3))
        except ValueError:
            raise PlanError(f"exit rule '{text}': '{m.group(3)}' is not a number") from None
        if not (0 < threshold < math.inf and (not cls.at_most_one or threshold <= 1)):  # 1e400 reads as inf
            raise PlanError(f"exit rule '{text}': the threshold must be a finite number > 0"
                            + (" and <= 1" if cls.at_most_one else ""))
        with np.errstate(over="ignore"):  # 1e39 was read as inf (a JAX warning), 1e-50 as 0
            in_float32 = float(np.float32(threshold))
        if not 0 < in_float32 < math.inf:
            raise PlanError(f"exit rule '{text}': the threshold must be between {FLOAT32_RANGE[0]:.1e} and "
                            f"{FLOAT32_RANGE[1]:.1e}: the rules compare in float32, where {m.group(3)} is "
                            f"{'infinite' if threshold > 1 else '0'}")
        if cls.whole and threshold != int(threshold):
            raise PlanError(f"exit rule '{text}': {cls.placeholder} counts iterations; give a whole number")
        rule = cls(threshold, options.get("min", 1), options.get("every", 1))
        if not (1 <= rule.min_loops <= MAX_LOOPS and 1 <= rule.check_every <= MAX_LOOPS):
            raise PlanError(f"exit rule '{text}': min and every must be in 1..{MAX_LOOPS}")
        return rule

    @classmethod
    def form(cls) -> str:
        return f"{cls.kind}:{cls.prefix}{cls.placeholder}"

    def due(self, i: Array) -> Array:
        """Whether the rule may stop a token after iteration i (1-based)."""
        return (i >= self.min_loops) & (i % self.check_every == 0)

    def first_stop(self) -> int:
        """The first iteration after which the rule can stop a token: its first check (min=, every=) at or after
        the iterations the rule itself needs (`earliest`)."""
        first = max(self.min_loops, self.earliest())
        return -(-first // self.check_every) * self.check_every

    def earliest(self) -> int:
        """The first iteration after which the rule itself can fire (before min= and every=)."""
        return 1

    # --- what each rule defines
    def start(self, probe: Probe, h0: Array) -> Any:
        """The rule's state before the first iteration (a pytree)."""
        return ()

    def stop(self, probe: Probe, i: Array, h_prev: Array, h: Array, active: Array, state: Any) -> tuple[Array, Any]:
        """After iteration i (1-based), states h_prev -> h [..., w] of the tokens that ran it (``active``):
        (fire [...] bool, the new state)."""
        raise NotImplementedError

    def output(self, probe: Probe, state: Any, out: Array) -> Array:
        """What the circuit writes once every token stopped (``out``: the write of the final states)."""
        return out

    def __str__(self) -> str:
        value = f"{self.threshold:g}" if isinstance(self.threshold, int | float) else "<traced>"
        return f"{self.kind}:{self.prefix}{value}" + (f",min={self.min_loops}" if self.min_loops > 1 else "") + (
            f",every={self.check_every}" if self.check_every > 1 else "")


def exit_rule(kind: str, threshold: float | Array, min_loops: int = 1, check_every: int = 1) -> ExitRule:
    """The rule registered as ``kind`` (PlanError naming the kinds if none)."""
    return EXITS.get(kind, "exit rule", PlanError)(threshold, min_loops, check_every)


def refuse_uncached(exits: dict[str, ExitRule]) -> None:
    """DecodingError (one line) for the first rule of ``exits`` (circuit -> rule) that cached decoding cannot run
    (`ExitRule.uncached`; the rules that read the output first). `LoopedTransformer.check_decoding` calls it, and
    `generate` before it reads a checkpoint."""
    refused = sorted((n for n, r in exits.items() if r.uncached), key=lambda n: not exits[n].needs_readout)
    if refused:
        rule = exits[refused[0]]
        raise DecodingError(f"decoding with a cache cannot run the exit rule {rule.kind} of circuit {refused[0]}: "
                            f"{rule.uncached}")


def register_exit(name: str) -> Any:
    """Register an exit rule class (a decorator): in the table, and as a pytree (threshold traced, the rest
    static). Every rule, the library's and a user's, is registered this way.

    The kind is written into the static part on purpose: JAX (0.10) compares the tree structures of two
    dataclass nodes with equal fields as equal whatever their classes (``structure(KL(t)) ==
    structure(LatentDiff(t))``) while hashing them apart, so a jit cache could run a program traced for one
    rule on a plan holding another, depending on the process's hash seed. It did: kl scored with latent_diff's
    stop rule in ``bench/adaptive.py`` and, rarely, in ``tests/model/test_adaptive.py``
    (`tests/variants/test_variants.py::test_exit_rule_kinds_have_distinct_tree_structures`)."""
    if not re.fullmatch(r"\w+", name):  # `ExitRule.parse` reads KIND as a word: the rule was listed and unusable
        raise ValueError(f"exit rule name {name!r}: give letters, digits and _ only (--exit reads KIND:THRESHOLD)")

    def add(cls: type) -> type:
        cls = EXITS.register(name)(dataclass(frozen=True)(cls))

        def flatten(rule: ExitRule) -> tuple[tuple[Any], tuple[str, int, int]]:
            return (rule.threshold,), (name, rule.min_loops, rule.check_every)

        def unflatten(aux: tuple[str, int, int], children: tuple[Any]) -> ExitRule:
            return cls(children[0], aux[1], aux[2])

        jax.tree_util.register_pytree_node(cls, flatten, unflatten)
        return cls
    return add


def latent_change(h_prev: Array, h: Array) -> Array:
    """[...]: ||h - h_prev|| / ||h|| per token (over the last axis), in float32."""
    h, h_prev = h.astype(jnp.float32), h_prev.astype(jnp.float32)
    return jnp.linalg.norm(h - h_prev, axis=-1) / jnp.maximum(jnp.linalg.norm(h, axis=-1), 1e-12)


def latent_change_sq(h_prev: Array, h: Array) -> Array:
    """[...]: ||h - h_prev||^2 / ||h||^2 per token, in float32: `latent_change` squared, which has a gradient
    where the state does not change (the settling loss, train.settle)."""
    h, h_prev = h.astype(jnp.float32), h_prev.astype(jnp.float32)
    return jnp.sum(jnp.square(h - h_prev), axis=-1) / jnp.maximum(jnp.sum(jnp.square(h), axis=-1), 1e-24)


def kl_divergence(logits: Array, prev_logits: Array) -> Array:
    """[...]: KL(p || p_prev) of two logit arrays over their last axis."""
    lp, lq = jax.nn.log_softmax(logits.astype(jnp.float32)), jax.nn.log_softmax(prev_logits.astype(jnp.float32))
    return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


def entropy(logits: Array) -> Array:
    lp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.sum(jnp.exp(lp) * lp, axis=-1)


@register_exit("latent_diff")
class LatentDiff(ExitRule):
    def stop(self, probe: Probe, i: Array, h_prev: Array, h: Array, active: Array, state: Any) -> tuple[Array, Any]:
        return latent_change(h_prev, h) < self.threshold, state


class _OutputChange(ExitRule):
    """Rules on the next-token distribution read out after every iteration."""

    needs_readout = True
    uncached = ("it reads the output through the layers after the circuit, whose cache holds earlier tokens at their "
                "final iteration, not at each of its iterations")

    def change(self, logits: Array, prev: Array) -> Array:
        raise NotImplementedError

    def earliest(self) -> int:
        return 2  # iteration 1 has nothing to compare (`stop`)

    def _logits(self, probe: Probe, h: Array) -> Array:
        if probe.readout is None:
            raise PlanError(f"exit rule {self.kind} reads the model's output after every iteration: only one circuit "
                            f"of a model can use kl or entropy_diff at a time")
        return probe.readout(probe.emit(h))

    def start(self, probe: Probe, h0: Array) -> Any:
        return self._logits(probe, h0)

    def stop(self, probe: Probe, i: Array, h_prev: Array, h: Array, active: Array, state: Any) -> tuple[Array, Any]:
        logits = self._logits(probe, h)
        return (self.change(logits, state) < self.threshold) & (i >= 2), logits  # iteration 1 has nothing to compare


@register_exit("kl")
class KL(_OutputChange):
    def change(self, logits: Array, prev: Array) -> Array:
        return kl_divergence(logits, prev)


@register_exit("entropy_diff")
class EntropyDiff(_OutputChange):
    def change(self, logits: Array, prev: Array) -> Array:
        return jnp.abs(entropy(logits) - entropy(prev))


@register_exit("learned")
class Learned(ExitRule):
    """The circuit's own halting head decides (`loopformer.variants.halting`)."""

    prefix, placeholder = "q=", "Q"
    needs_head = True
    at_most_one = True

    def start(self, probe: Probe, h0: Array) -> Any:
        return probe.halting.exit_init(h0.shape[:-1], probe.out_width, h0.dtype)

    def stop(self, probe: Probe, i: Array, h_prev: Array, h: Array, active: Array, state: Any) -> tuple[Array, Any]:
        lam = jnp.where(active, probe.halt_prob(h), 0.0)
        return probe.halting.exit_step(i, probe.n, lam, active, state, lambda: probe.emit(h), self.threshold)

    def output(self, probe: Probe, state: Any, out: Array) -> Array:
        return probe.halting.exit_output(state, out)



@register_exit("patience")
class Patience(_OutputChange):
    """patience:K: stop once the top-1 next-token prediction has not changed for K iterations in a row
    (patience-based early exit, Zhou et al. 2020, "BERT Loses Patience")."""

    placeholder = "K"
    whole = True

    def earliest(self) -> int:
        # K unchanged predictions in a row: none can stop before iteration K (K past the cap stopped none, silently)
        return max(1, int(self.threshold)) if isinstance(self.threshold, int | float) else 1

    def start(self, probe: Probe, h0: Array) -> Any:
        top = jnp.argmax(self._logits(probe, h0), axis=-1)
        return top, jnp.zeros(top.shape, jnp.float32)

    def stop(self, probe: Probe, i: Array, h_prev: Array, h: Array, active: Array, state: Any) -> tuple[Array, Any]:
        prev, streak = state
        top = jnp.argmax(self._logits(probe, h), axis=-1)
        streak = jnp.where(top == prev, streak + 1.0, 0.0)
        return streak >= self.threshold, (top, streak)


@register_exit("context_diff")
class ContextDiff(ExitRule):
    """context_diff:EPS: a token stops after iteration i when latent_diff's test holds for it and for every token
    whose state can reach it: the tokens before it in a causal model, every token of its row in a bidirectional
    one (windowed attention included: through the iterations a window passes everything on). Tokens that stopped
    earlier hold still, so they pass: fire_t = AND_{s in reach(t)} ||h_s,i - h_s,i-1|| / ||h_s,i|| < EPS.

    Why: a token's own state can settle before what it reads from other tokens has reached it (on prefix parity a
    bit's state is still waiting for the carry; `bench/exit_oracle.py` found that even stopping each token where
    its own answer turns right solves almost nothing), so latent_diff stops tokens too early. Once every token
    that can reach t and t itself hold still, they all stop together and nothing t reads changes again. In a
    causal model tokens stop in sequence order; in a bidirectional one each row stops as a whole. Packed documents
    wait for the other documents of their row too, which costs iterations, not answers. Cached decoding does not
    keep when earlier tokens stopped, so it refuses this rule (`Transformer.check_decoding`); evaluation and the
    recompute path run it."""

    reads_earlier = True
    uncached = "a token waits for the tokens before it, and the cache does not keep the iteration at which each " \
               "earlier token stopped"

    def stop(self, probe: Probe, i: Array, h_prev: Array, h: Array, active: Array, state: Any) -> tuple[Array, Any]:
        settled = latent_change(h_prev, h) < self.threshold  # [..., T]
        if not probe.causal:
            return jnp.broadcast_to(jnp.all(settled, axis=-1, keepdims=True), settled.shape), state
        return jax.lax.cummin(settled.astype(jnp.int32), axis=settled.ndim - 1) > 0, state
