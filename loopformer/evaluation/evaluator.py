"""Evaluation at chosen loop counts, gates and fills, with one compiled program per batch shape.

`Evaluator.evaluate(params, batches, loops={"X": 16, "Y": 2}, ablate=["Y"])` is the seam every
analysis command (eval, ablate, sweep) and the trainer's periodic evaluation go through. Loop counts
are full mappings (every circuit): callers fill in defaults with `loopformer.model.plan.resolve_loops`.
With ``exits={"X": rule}`` a circuit's count is its cap and tokens stop by the rule; every evaluation
reports the iterations each circuit actually ran per real token (``mean_loops``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopformer.metrics import answer_sums, exact_match, summarize
from loopformer.model.loop import TRACE_STATS
from loopformer.model.plan import Plan, make_plan
from loopformer.model.transformer import LoopedTransformer, forward_batch
from loopformer.runs.log import progress

Array = jax.Array
Batch = dict[str, Any]


class Evaluator:
    """Jitted evaluation of one model structure. Loop counts, gates and fills are traced inputs: a new
    count or ablation never recompiles (`compiles` counts the programs traced)."""

    def __init__(self, graphdef: nnx.GraphDef, circuits: Sequence[str], d_model: int):
        self.graphdef = graphdef
        self.names = list(circuits)
        self.d_model = d_model
        self.compiles = 0

        def run(params: Any, batch: Batch, plan: Plan) -> tuple[Array, Any]:
            self.compiles += 1  # runs at trace time only
            return forward_batch(nnx.merge(self.graphdef, params), batch, plan)

        def sums_fn(params: Any, batch: Batch, plan: Plan) -> tuple[dict[str, Array], dict[str, Array]]:
            logits, diag = run(params, batch, plan)
            valid = _valid(batch)
            used = loops_used(diag, plan, batch["inputs"].shape)
            return answer_sums(logits, batch) | {"real_tokens": valid.sum()} | {
                f"loops/{n}": jnp.sum(u * valid) for n, u in used.items()} | {
                f"computed/{n}": c for n, c in loops_computed(diag, used).items()}, used  # used: for histograms

        def examples_fn(params: Any, batch: Batch, plan: Plan) -> dict[str, Array]:
            logits, diag = run(params, batch, plan)
            valid = _valid(batch)
            count = jnp.maximum(valid.sum(-1), 1.0)
            used = loops_used(diag, plan, batch["inputs"].shape)
            return {"correct": exact_match(logits, batch), "used": used, "real": valid.sum(),
                    "mean": {n: jnp.sum(u * valid, -1) / count for n, u in used.items()},
                    "computed": loops_computed(diag, used),
                    "scored": {n: r.scored for n, r in diag.circuits.items() if r.scored is not None}}

        def means_fn(params: Any, batch: Batch, plan: Plan) -> dict[str, Array]:
            diag = run(params, batch, plan)[1]
            return {n: r.mean_out for n, r in diag.circuits.items()}

        def trace_fn(params: Any, batch: Batch, plan: Plan) -> dict[str, Array]:
            return {n: r.trace for n, r in run(params, batch, plan)[1].circuits.items()}

        def correct_fn(params: Any, batch: Batch, plan: Plan) -> Array:
            return exact_match(run(params, batch, plan)[0], batch)

        def logits_fn(params: Any, tokens_BT: Array, plan: Plan, segment_ids_BT: Array | None) -> Array:
            self.compiles += 1
            return nnx.merge(self.graphdef, params)(tokens_BT, plan, segment_ids_BT=segment_ids_BT)[0]

        def logits_used_fn(params: Any, tokens_BT: Array, plan: Plan,
                           segment_ids_BT: Array | None) -> tuple[Array, dict[str, Array]]:
            self.compiles += 1
            logits, diag = nnx.merge(self.graphdef, params)(tokens_BT, plan, segment_ids_BT=segment_ids_BT)
            return logits, loops_used(diag, plan, tokens_BT.shape)

        self._sums, self._means, self._trace = jax.jit(sums_fn), jax.jit(means_fn), jax.jit(trace_fn)
        self._correct, self._logits = jax.jit(correct_fn), jax.jit(logits_fn)
        self._logits_used = jax.jit(logits_used_fn)
        self._examples = jax.jit(examples_fn)

    def plan(self, loops: Mapping[str, int], ablate: Sequence[str] = (), fill: Array | np.ndarray | None = None,
             **static: Any) -> Plan:
        """A plan at ``loops`` (every circuit); removed circuits write ``fill`` [num_circuits, d_model]
        (zeros unless given, so zero and mean ablation share one program)."""
        if fill is None:
            fill = np.zeros((len(self.names), self.d_model), np.float32)
        return make_plan(self.names, loops, ablate=ablate, fills=fill, **static)

    def evaluate(self, params: Any, batches: Sequence[Batch], loops: Mapping[str, int], ablate: Sequence[str] = (),
                 fill: Array | np.ndarray | None = None, exits: Mapping[str, Any] | None = None,
                 schedules: Mapping[str, Any] | None = None,
                 by_difficulty: Mapping[str, tuple[float, float, int]] | None = None,
                 histogram: bool = False, compact: bool | None = None,
                 compact_shares: Sequence[float] | None = None) -> dict[str, Any]:
        """Loss / accuracy (exact match per example) / token_accuracy / examples over ``batches``,
        ``mean_loops`` {circuit: iterations per real token} and ``computed_loops`` {circuit: token-iterations its
        blocks executed per real token: padding, tokens that wait for the batch's slowest and the compacted
        buffer's slack included, so >= mean_loops}; ``ablate`` removes circuits, whose output is
        replaced by ``fill`` (zero or mean ablation); ``exits`` stops tokens by rules (`ExitRule`);
        ``schedules`` runs the prelude / coda layers in another order (`loopformer.model.schedule`);
        ``by_difficulty`` {circuit: (a, b, cap)} gives each example round(a * difficulty + b) iterations of
        that circuit (its entry in ``loops`` is then unused; `loopformer.model.plan.difficulty_rules`).
        ``histogram``: also ``histogram`` {circuit: {iterations: real tokens}}, from the same pass.
        ``compact``, ``compact_shares``: `Plan.compact` (None: by the batch's size) and its buffers."""
        plan = self.plan(loops, ablate, fill, exits=exits, schedules=schedules, by_difficulty=by_difficulty,
                         compact=compact, compact_shares=compact_shares)
        totals: dict[str, Any] = {}
        hist: dict[str, dict[int, int]] = {n: {} for n in self.names}
        # Exits make an evaluation run for minutes (tokens run to --max-loops): a bar per batch, each batch
        # awaited so that the bar measures the work, not its asynchronous dispatch.
        for batch in progress(batches, "evaluate", total=len(batches)) if exits else batches:
            sums, used = self._sums(params, batch, plan)
            if exits:
                jax.block_until_ready(sums)
            if histogram:
                _count(hist, jax.device_get(used), np.asarray(_valid(batch)) > 0)
            totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
        totals = jax.device_get(totals)
        real = max(float(totals["real_tokens"]), 1.0)
        out = {**summarize(totals), "examples": int(totals["examples"]),
               "mean_loops": {n: float(totals[f"loops/{n}"]) / real for n in self.names},
               "computed_loops": {n: float(totals[f"computed/{n}"]) / real for n in self.names}}
        return out | ({"histogram": {n: dict(sorted(h.items())) for n, h in hist.items()}} if histogram else {})

    def examples(self, params: Any, batches: Sequence[Batch], loops: Mapping[str, int],
                 exits: Mapping[str, Any] | None = None,
                 by_difficulty: Mapping[str, tuple[float, float, int]] | None = None,
                 compact: bool | None = None, compact_shares: Sequence[float] | None = None) -> dict[str, Any]:
        """Per example (in order; the rows without an answer that pad the last batch dropped): exact
        match ``correct`` bool [N] and ``loops`` {circuit: float [N]} (mean iterations over the example's
        real tokens); ``histogram`` {circuit: {iterations: tokens}} over every real token; and
        ``computed_loops`` {circuit: token-iterations executed per real token} (as `evaluate`'s);
        ``scored_rounds`` {circuit of a routed bank: token-rounds its router scored per real token}.
        ``compact``, ``compact_shares``: `Plan.compact` (None: by the batch's size) and its buffers."""
        plan = self.plan(loops, exits=exits, by_difficulty=by_difficulty, compact=compact, compact_shares=compact_shares)
        correct, per_example, hist = [], {n: [] for n in self.names}, {n: {} for n in self.names}
        computed, real, scored = dict.fromkeys(self.names, 0.0), 0.0, {}
        for b in batches:
            out = jax.device_get(self._examples(params, b, plan))
            real += float(out["real"])
            computed = {n: computed[n] + float(out["computed"][n]) for n in self.names}
            scored = {n: scored.get(n, 0.0) + float(s) for n, s in out["scored"].items()}
            keep = np.asarray(b["mask"]).sum(-1) > 0
            valid = np.asarray(_valid(b)) > 0
            correct.append(np.asarray(out["correct"])[keep])
            for n in self.names:
                per_example[n].append(np.asarray(out["mean"][n])[keep])
            _count(hist, {n: np.asarray(u)[keep] for n, u in out["used"].items()}, valid[keep])
        return {"correct": np.concatenate(correct), "loops": {n: np.concatenate(v) for n, v in per_example.items()},
                "histogram": {n: dict(sorted(h.items())) for n, h in hist.items()},
                "computed_loops": {n: c / max(real, 1.0) for n, c in computed.items()},
                "scored_rounds": {n: s / max(real, 1.0) for n, s in scored.items()}}

    def correct(self, params: Any, batches: Sequence[Batch], loops: Mapping[str, int],
                by_difficulty: Mapping[str, tuple[float, float, int]] | None = None) -> np.ndarray:
        """bool [examples]: exact match of each example of ``batches`` (in order; rows without an
        answer, which pad the last batch, dropped) at ``loops`` (and ``by_difficulty``, as in `evaluate`)."""
        plan = self.plan(loops, by_difficulty=by_difficulty)
        return np.concatenate([np.asarray(self._correct(params, b, plan))[np.asarray(b["mask"]).sum(-1) > 0]
                               for b in batches])

    def circuit_means(self, params: Any, batches: Sequence[Batch], loops: Mapping[str, int]) -> np.ndarray:
        """[num_circuits, d_model]: each circuit's mean output over the real tokens of the batches
        (for mean ablation)."""
        plan = self.plan(loops, collect_means=True)
        weights, means = [], []
        for b in batches:
            out = jax.device_get(self._means(params, b, plan))
            seg = b.get("segment_ids")
            weights.append(float(np.sum(np.asarray(seg) > 0)) if seg is not None else float(np.size(b["inputs"])))
            means.append(np.stack([out[n] for n in self.names]))
        w = np.asarray(weights) / max(sum(weights), 1.0)
        return np.einsum("b,bcd->cd", w, np.stack(means)).astype(np.float32)

    def diagnostics(self, params: Any, batch: Batch, loops: Mapping[str, int],
                    trace_len: int | None = None) -> dict[str, dict[str, list[float]]]:
        """Per circuit and iteration: rel_change, state_norm, token_cosine (lists up to the circuit's
        count, at most ``trace_len``, default the largest count)."""
        trace_len = trace_len or max(loops.values())
        traces = jax.device_get(self._trace(params, batch, self.plan(loops, trace_len=trace_len)))
        return {name: {stat: [float(v) for v in np.asarray(traces[name])[: loops[name], j]]
                       for j, stat in enumerate(TRACE_STATS)} for name in self.names if traces[name] is not None}

    def logits(self, params: Any, tokens_BT: Array, loops: Mapping[str, int], segment_ids_BT: Array | None = None,
               exits: Mapping[str, Any] | None = None, compact: bool | None = None) -> Array:
        """Logits [B, T, vocab] of a token buffer at ``loops`` (a `loopformer.inference` logits_fn); ``compact``:
        `Plan.compact`."""
        return self._logits(params, tokens_BT, make_plan(self.names, loops, exits=exits, compact=compact),
                            segment_ids_BT)

    def logits_used(self, params: Any, tokens_BT: Array, loops: Mapping[str, int],
                    segment_ids_BT: Array | None = None, exits: Mapping[str, Any] | None = None,
                    compact: bool | None = None) -> tuple[Array, dict[str, Array]]:
        """`logits` and {circuit: float32 [B, T]}, the iterations each position ran (`loops_used`): what an exit
        rule left of the caps (generate --no-cache reports it per new token, as cached decoding does)."""
        return self._logits_used(params, tokens_BT, make_plan(self.names, loops, exits=exits, compact=compact),
                                 segment_ids_BT)


def _valid(batch: Batch) -> Array:
    """float32 [B, T]: 1 on real tokens (segment ids > 0, or every token when the batch has none)."""
    seg = batch.get("segment_ids")
    return jnp.ones(jnp.shape(batch["inputs"]), jnp.float32) if seg is None else (jnp.asarray(seg) > 0).astype(jnp.float32)


def _count(hist: dict[str, dict[int, int]], used: Mapping[str, Any], valid: np.ndarray) -> None:
    """Add each circuit's real tokens (``valid`` bool [B, T]) by iterations run (``used`` [B, T]) to ``hist``."""
    for n, h in hist.items():
        for v, c in zip(*np.unique(np.rint(np.asarray(used[n])[valid]).astype(int), return_counts=True), strict=True):
            h[int(v)] = h.get(int(v), 0) + int(c)


def loops_computed(diag: Any, used: dict[str, Array]) -> dict[str, Array]:
    """{circuit: float32 []}: token-iterations its blocks executed over the batch, from its report
    (`CircuitReport.computed`); a circuit without one (routed banks) ran every token of the batch for as
    many iterations as its longest-running token."""
    out = {}
    for n, u in used.items():
        r = diag.circuits.get(n)
        out[n] = r.computed if r is not None and r.computed is not None else jnp.max(u) * u.size
    return out


def loops_used(diag: Any, plan: Plan, shape: tuple[int, ...]) -> dict[str, Array]:
    """{circuit: float32 [B, T]}: iterations each token ran: the circuit's report when it has one (exits,
    routing, halting), else its plan count."""
    return {n: (r.used if r.used is not None else jnp.broadcast_to(jnp.asarray(plan.loops[n], jnp.float32), shape))
            for n, r in diag.circuits.items()}


@functools.lru_cache(maxsize=16)
def _evaluator(graphdef: nnx.GraphDef, circuits: tuple[str, ...], d_model: int) -> Evaluator:
    return Evaluator(graphdef, circuits, d_model)


def evaluator_for(model: LoopedTransformer) -> Evaluator:
    """The process's Evaluator for this model structure: runs of one architecture (and commands run
    one after another in a process, e.g. tests or a notebook) share its compiled programs."""
    return _evaluator(nnx.graphdef(model), tuple(model.circuit_names), model.d_model)
