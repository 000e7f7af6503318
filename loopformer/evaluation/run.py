"""A run as the analysis sees it, once restored: its params and evaluator (`LoadedRun`, from
`load_run`). Opening a run directory and restoring its weights is `loopformer.runs`.

Rows produced by the analysis commands share one schema::

    {"split": str, "loops": {circuit: int}, "ablated": [circuit], "loss": float, "accuracy": float,
     "token_accuracy": float, "examples": int}   (+ bits_per_byte, perplexity for text)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from loopformer.errors import AnalysisError
from loopformer.evaluation.evaluator import Evaluator, evaluator_for
from loopformer.metrics import text_metrics
from loopformer.model.attend import attention_overflow
from loopformer.model.transformer import LoopedTransformer
from loopformer.runs.log import log
from loopformer.runs.read import RunInfo
from loopformer.runs.restore import ONLY_WEIGHTS, restore_weights
from loopformer.variants.exits import ExitRule

Batch = dict[str, np.ndarray]
Row = dict[str, Any]
PROBE_SPLIT = "probe"  # the split a probe file is scored as (eval --probe, rys --probe)


@dataclass
class LoadedRun:
    """A run with its params restored, ready to evaluate."""

    info: RunInfo
    model: LoopedTransformer  # abstract (shapes only): its structure; the weights are ``params``
    params: Any
    step: int
    evaluator: Evaluator
    weights: str = ONLY_WEIGHTS  # which weights ``params`` are: "EMA weights" (train.ema), "raw weights" (the
    # optimizer's, beside an EMA) or "weights" (a run without EMA)

    def provenance(self) -> dict[str, Any]:
        """Where a command's numbers come from, the head of its JSON document: the run, the step, which weights."""
        return {"run": str(self.info.path), "step": self.step, "weights": self.weights}

    @property
    def task(self) -> Any:
        """The synthetic task (None for a text run)."""
        return self.info.data.task

    def eval_sets(self, splits: Sequence[str], examples: int) -> dict[str, list[Batch]]:
        """The first ``examples`` examples (text: windows) of each split, the trainer's eval examples
        first, in batches of at most data.eval_batch_size."""
        batch = min(self.info.cfg.data.eval_batch_size, examples)
        return self.check_fits(self.info.data.eval_sets(splits, examples, batch))

    def check_fits(self, sets: dict[str, list[Batch]]) -> dict[str, list[Batch]]:
        """``sets``, after an AnalysisError for batches whose attention would not fit in memory (a run imported
        or configured with a huge data.seq_len; a huge probe): one line instead of an out-of-memory traceback."""
        for split, batches in sets.items():
            if batches:
                rows, length = np.shape(batches[0]["inputs"])[:2]
                too_big = attention_overflow(rows, length, self.info.cfg.model.max_heads)
                if too_big:
                    raise AnalysisError(f"split {split}: {too_big}; evaluate shorter sequences or smaller batches "
                                        f"(data.seq_len, data.eval_batch_size in {self.info.path}/config.yaml)")
        return sets

    def row(self, split: str, batches: Sequence[Batch], loops: Mapping[str, int] | None = None,
            ablate: Sequence[str] = (), fill: np.ndarray | jax.Array | None = None,
            exits: Mapping[str, ExitRule] | None = None, schedules: Mapping[str, Any] | None = None,
            by_difficulty: Mapping[str, tuple[float, float, int]] | None = None, histogram: bool = False,
            compact: bool | None = None) -> Row:
        """Evaluate one setting on one split: a row of the shared schema, with ``mean_loops`` (iterations
        each circuit ran per real token) and, with exit rules, ``exit`` {circuit: rule} (text runs add
        bits_per_byte and perplexity); ``schedules``: layer schedules of the prelude / coda;
        ``by_difficulty``: circuits whose counts follow each example's difficulty (``loops`` says "auto");
        ``histogram``: also ``histogram`` {circuit: {iterations: real tokens}} from the same pass;
        ``compact``: compacted (True) or masked (False) execution of stopping tokens, None: by batch size."""
        full = self.info.full_loops(loops)
        m = self.evaluator.evaluate(self.params, batches, full, ablate, fill, exits, schedules, by_difficulty,
                                    histogram=histogram, compact=compact)
        full = full | {c: "auto" for c in by_difficulty or {}}
        row = {"split": split, "loops": full, "ablated": list(ablate), "loss": m["loss"], "accuracy": m["accuracy"],
               "token_accuracy": m["token_accuracy"], "examples": m["examples"], "mean_loops": m["mean_loops"],
               "computed_loops": m["computed_loops"]}
        if exits:
            row["exit"] = {c: str(r) for c, r in exits.items()}
        if histogram:
            row["histogram"] = m["histogram"]
        bytes_per_token = self.info.data.bytes_per_token(batches)  # None unless the split is text
        if bytes_per_token is not None:
            extra = text_metrics({"loss": m["loss"]}, bytes_per_token)
            row.update({k: v for k, v in extra.items() if k != "loss"})
        return row


def load_run(info: RunInfo, step: int | None = None, *, raw: bool = False) -> LoadedRun:
    """Restore the latest checkpoint of ``info`` (or ``step``): its EMA weights when the run has them
    (train.ema; the log line says so), else or with ``raw`` the params the optimizer trained."""
    model, params, restored, weights = restore_weights(info.cfg, step, info.data, raw=raw)
    if raw and weights == ONLY_WEIGHTS:  # the flag would be accepted and change nothing
        why = "train.ema was off when it was saved" if info.cfg.train.ema else "train.ema is off"  # turned on since
        raise AnalysisError(f"--raw-weights: {info.path} keeps no EMA weights at step {restored} ({why}), "
                            f"so the weights the optimizer trained are the only ones; drop --raw-weights")
    log(f"loaded {info.path} at step {restored}" + (f" ({weights})" if weights != ONLY_WEIGHTS else ""))
    return LoadedRun(info, model, params, restored, evaluator_for(model), weights)


def real_rows(batch: Batch) -> Batch:
    """The rows of ``batch`` that are examples (not the padding rows that fill the last batch)."""
    keep = np.asarray(batch["mask"]).sum(-1) > 0
    return {k: np.asarray(v)[keep] for k, v in batch.items()}
