"""Per-token circuit activity: which circuits are "on" at each token, and what each one does for it.

For every real token and circuit c (at the run's default loop counts):

    write_norm_c   ||g_c * out_c||, what c adds to the stream at that token (its on-indicator)
    delta_loss_c   CE(token, c removed) - CE(token, full model), at answer tokens (mask 1), c removed
                   by its gate (zero ablation, or its mean output with mode=mean)

A circuit is **on** at a token when its write norm exceeds ``ON_FRACTION`` (10 %) of the split's
typical write, ``max_c median_c(write_norm)`` over the split's real tokens: a circuit writing a tenth
of what the busiest circuit usually writes, or less, is off. Rows, per split and circuit: on_rate
(share of real tokens on), mean_write_norm (over real tokens), mean_ablation_delta_loss (over answer
tokens). One compiled program per batch shape: removing a circuit is a gate, not a new program.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from loopformer.evaluation.ablate import mean_fill
from loopformer.evaluation.run import Batch, LoadedRun
from loopformer.model.plan import Plan
from loopformer.model.transformer import forward_batch
from loopformer.runs.log import log

Array = jax.Array
ON_FRACTION = 0.1  # on: write norm > ON_FRACTION * the split's largest per-circuit median write norm
EXAMPLES_SHOWN = 2  # examples per split kept per token (the JSON's "examples" and the PNG)


@functools.lru_cache(maxsize=16)
def _token_stats(graphdef: nnx.GraphDef) -> Any:
    """Jitted (params, batch, plan) -> (CE per token [B, T], {circuit: write norm [B, T]})."""

    def run(params: Any, batch: Batch, plan: Plan) -> tuple[Array, dict[str, Array]]:
        logits, diag = forward_batch(nnx.merge(graphdef, params), batch, plan)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return ce, {n: r.write_norm for n, r in diag.circuits.items()}

    return jax.jit(run)


@dataclasses.dataclass
class SplitActivity:
    """One split's per-token arrays over its real rows: ``valid`` / ``answer`` bool [N, T], ``norms`` and
    ``delta`` {circuit: float [N, T]} (delta is 0 off the answer tokens), ``inputs`` int [N, T]."""

    valid: np.ndarray
    answer: np.ndarray
    inputs: np.ndarray
    norms: dict[str, np.ndarray]
    delta: dict[str, np.ndarray]

    def threshold(self) -> float:
        """The on-threshold: ON_FRACTION * max over circuits of the median write norm over real tokens."""
        medians = [float(np.median(v[self.valid])) for v in self.norms.values() if self.valid.any()]
        return ON_FRACTION * max(medians, default=0.0)


def split_activity(run: LoadedRun, batches: Sequence[Batch], loops: Mapping[str, int] | None = None,
                   fill: np.ndarray | None = None) -> SplitActivity:
    """Write norms (full model) and per-token CE changes with each circuit removed, over ``batches``."""
    names = run.info.circuits
    full = run.info.full_loops(loops)
    stats = _token_stats(run.evaluator.graphdef)
    plan = lambda ablate: dataclasses.replace(run.evaluator.plan(full, ablate, fill), collect_norms=True)  # noqa: E731
    parts: dict[str, list[np.ndarray]] = {"valid": [], "answer": [], "inputs": []}
    norms: dict[str, list[np.ndarray]] = {n: [] for n in names}
    delta: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for b in batches:
        keep = np.asarray(b["mask"]).sum(-1) > 0  # rows that pad the last batch hold no answer
        seg = b.get("segment_ids")
        valid = (np.asarray(seg) > 0) if seg is not None else np.ones(np.shape(b["inputs"]), bool)
        answer = np.asarray(b["mask"]) > 0
        ce, wn = jax.device_get(stats(run.params, b, plan(())))
        parts["valid"].append(valid[keep])
        parts["answer"].append(answer[keep])
        parts["inputs"].append(np.asarray(b["inputs"])[keep])
        for n in names:
            norms[n].append(np.asarray(wn[n])[keep])
            ce_off = np.asarray(jax.device_get(stats(run.params, b, plan((n,)))[0]))
            delta[n].append(np.where(answer, ce_off - np.asarray(ce), 0.0)[keep])
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros((0, 0))  # noqa: E731
    return SplitActivity(cat(parts["valid"]).astype(bool), cat(parts["answer"]).astype(bool), cat(parts["inputs"]),
                         {n: cat(v) for n, v in norms.items()}, {n: cat(v) for n, v in delta.items()})


def activity_rows(split: str, act: SplitActivity) -> list[dict[str, Any]]:
    """Per circuit: on_rate, mean_write_norm (real tokens), mean_ablation_delta_loss (answer tokens)."""
    tau = act.threshold()
    real, answers = max(int(act.valid.sum()), 1), max(int(act.answer.sum()), 1)
    return [{"split": split, "circuit": n, "on_rate": float(((act.norms[n] > tau) & act.valid).sum() / real),
             "mean_write_norm": float((act.norms[n] * act.valid).sum() / real),
             "mean_ablation_delta_loss": float((act.delta[n] * act.answer).sum() / answers)} for n in act.norms]


def shown_examples(split: str, act: SplitActivity, count: int = EXAMPLES_SHOWN) -> list[dict[str, Any]]:
    """The first ``count`` examples' per-token values over their real tokens (JSON and PNG)."""
    out = []
    for i in range(min(count, len(act.valid))):
        v = act.valid[i]
        out.append({"split": split, "index": i, "tokens": act.inputs[i][v].tolist(),
                    "answer": act.answer[i][v].astype(int).tolist(),
                    "write_norm": {n: act.norms[n][i][v].tolist() for n in act.norms},
                    "delta_loss": {n: act.delta[n][i][v].tolist() for n in act.delta}})
    return out


def activity(run: LoadedRun, eval_sets: Mapping[str, Sequence[Batch]], loops: Mapping[str, int] | None = None,
             mode: str = "zero") -> tuple[list[dict[str, Any]], dict[str, float], list[dict[str, Any]]]:
    """(rows per split and circuit, the on-threshold of each split, a few examples per split)."""
    rows, thresholds, examples = [], {}, []
    for split, batches in eval_sets.items():
        fill = mean_fill(run, batches) if mode == "mean" else None
        act = split_activity(run, batches, loops, fill)
        rows += activity_rows(split, act)
        thresholds[split] = act.threshold()
        examples += shown_examples(split, act)
        log(f"activity {split}: done")
    return rows, thresholds, examples
