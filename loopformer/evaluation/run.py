"""A run as the analysis sees it: what its config says (`RunInfo`) and, once restored, its params and
evaluator (`LoadedRun`). Opening a run directory is `loopformer.train.runs`; nothing here reads files.

Rows produced by the analysis commands share one schema::

    {"split": str, "loops": {circuit: int}, "ablated": [circuit], "loss": float, "accuracy": float,
     "token_accuracy": float, "examples": int}   (+ bits_per_byte, perplexity for text)
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np

from loopformer.config import Config
from loopformer.errors import LoopformerError
from loopformer.evaluation.evaluator import Evaluator
from loopformer.evaluation.metrics import text_metrics
from loopformer.model.exits import ExitRule
from loopformer.model.plan import resolve_loops
from loopformer.model.transformer import LoopedTransformer

Batch = dict[str, np.ndarray]
Row = dict[str, Any]


class AnalysisError(LoopformerError):
    """A flag of an analysis command does not fit the run (unknown split, impossible request)."""


def log(msg: str) -> None:
    """Progress messages go to stderr, so stdout carries only the table or the JSON document."""
    print(msg, file=sys.stderr, flush=True)


class EvalData(Protocol):
    """What the analysis reads of a run's data source (`loopformer.data.sources.DataSource`)."""

    task: Any  # the synthetic task, or None for text
    split_names: list[str]

    def eval_sets(self, splits: Sequence[str] | None = None, examples: int | None = None,
                  batch_size: int | None = None) -> dict[str, list[Batch]]: ...

    def bytes_per_token(self, batches: Sequence[Batch]) -> float | None: ...


@dataclass
class RunInfo:
    """What ``config.yaml`` says about a run: enough to check flags before restoring anything.
    ``data`` is the run's data source (a synthetic task, or a text corpus read only when needed)."""

    path: Path
    cfg: Config
    data: EvalData
    circuits: list[str] = field(init=False)
    defaults: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.circuits = [c.name for c in self.cfg.model.circuits()]
        self.defaults = {c.name: c.eval_loops for c in self.cfg.model.circuits()}

    @property
    def is_text(self) -> bool:
        """A text run (a mixture is not, even with a text entry: its text splits report bits per byte)."""
        return self.data.task is None and not self.cfg.data.mixture

    @property
    def splits(self) -> dict[str, tuple[int, int] | None]:
        """Eval split name (a mixture's: NAME/SPLIT) -> difficulty range [lo, hi] (None for text splits)."""
        ranges = self.cfg.data.split_ranges()
        return {k: (int(ranges[k][0]), int(ranges[k][1])) if ranges.get(k) else None for k in self.data.split_names}

    def training_range(self, circuit: str) -> tuple[int, int]:
        """The loop counts circuit ``circuit`` typically saw in training: [lo, hi] of its distribution."""
        return self.cfg.model.circuit(circuit).distribution().typical_range()

    def training_label(self, circuit: str) -> str:
        return str(self.cfg.model.circuit(circuit).distribution())

    def select_splits(self, names: Sequence[str] | None) -> list[str]:
        """``names`` (default: every eval split), checked against the run's eval splits."""
        if not names:
            return list(self.splits)
        for name in names:
            if name not in self.splits:
                key = "data.mixture" if self.cfg.data.mixture else "data.eval_splits"
                where = "" if self.is_text else f" ({key} in {self.path / 'config.yaml'})"
                raise AnalysisError(f"--split {name}: this run has no eval split '{name}'; its splits are "
                                    f"{', '.join(self.splits)}{where}")
        return list(dict.fromkeys(names))

    def full_loops(self, loops: Mapping[str, int] | None = None) -> dict[str, int]:
        """Every circuit's count: its eval_loops default, overridden by ``loops`` (checked)."""
        return resolve_loops(self.defaults, loops)


@dataclass
class LoadedRun:
    """A run with its params restored, ready to evaluate."""

    info: RunInfo
    model: LoopedTransformer  # abstract (shapes only): its structure; the weights are ``params``
    params: Any
    step: int
    evaluator: Evaluator

    @property
    def task(self) -> Any:
        """The synthetic task (None for a text run)."""
        return self.info.data.task

    def eval_sets(self, splits: Sequence[str], examples: int) -> dict[str, list[Batch]]:
        """The first ``examples`` examples (text: windows) of each split, the trainer's eval examples
        first, in batches of at most data.eval_batch_size."""
        batch = min(self.info.cfg.data.eval_batch_size, examples)
        return self.info.data.eval_sets(splits, examples, batch)

    def row(self, split: str, batches: Sequence[Batch], loops: Mapping[str, int] | None = None,
            ablate: Sequence[str] = (), fill: np.ndarray | jax.Array | None = None,
            exits: Mapping[str, ExitRule] | None = None, schedules: Mapping[str, Any] | None = None) -> Row:
        """Evaluate one setting on one split: a row of the shared schema, with ``mean_loops`` (iterations
        each circuit ran per real token) and, with exit rules, ``exit`` {circuit: rule} (text runs add
        bits_per_byte and perplexity); ``schedules``: layer schedules of the prelude / coda."""
        full = self.info.full_loops(loops)
        m = self.evaluator.evaluate(self.params, batches, full, ablate, fill, exits, schedules)
        row = {"split": split, "loops": full, "ablated": list(ablate), "loss": m["loss"], "accuracy": m["accuracy"],
               "token_accuracy": m["token_accuracy"], "examples": m["examples"], "mean_loops": m["mean_loops"]}
        if exits:
            row["exit"] = {c: str(r) for c, r in exits.items()}
        bytes_per_token = self.info.data.bytes_per_token(batches)  # None unless the split is text
        if bytes_per_token is not None:
            extra = text_metrics({"loss": m["loss"]}, bytes_per_token)
            row.update({k: v for k, v in extra.items() if k != "loss"})
        return row


def real_rows(batch: Batch) -> Batch:
    """The rows of ``batch`` that are examples (not the padding rows that fill the last batch)."""
    keep = np.asarray(batch["mask"]).sum(-1) > 0
    return {k: np.asarray(v)[keep] for k, v in batch.items()}
