"""A trained run opened for analysis: config, task, model, restored params, evaluator, eval sets.

`read_run` only parses ``config.yaml`` (fast: flags are checked against it before anything heavy);
`load_run` also restores a checkpoint. Rows produced by the analysis commands share one schema::

    {"split": str, "loops": {circuit: int}, "ablated": [circuit], "loss": float, "accuracy": float,
     "token_accuracy": float, "examples": int}
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from loopformer.analysis.evaluate import Evaluator
from loopformer.config import Config
from loopformer.data.sources import DataSource, build_data, text_metrics
from loopformer.data.tasks import Task
from loopformer.errors import LoopformerError
from loopformer.model.transformer import LoopedTransformer
from loopformer.train.trainer import load_run_config, restore_params

Batch = dict[str, np.ndarray]
Row = dict[str, Any]


class AnalysisError(LoopformerError):
    """A flag of an analysis command does not fit the run (unknown split, impossible request)."""


def log(msg: str) -> None:
    """Progress messages go to stderr, so stdout carries only the table or the JSON document."""
    print(msg, file=sys.stderr, flush=True)


@dataclass
class RunInfo:
    """What ``config.yaml`` says about a run: enough to check flags before restoring anything.
    ``data`` is the run's data source (a synthetic task, or a text corpus read only when needed)."""

    path: Path
    cfg: Config
    data: DataSource
    circuits: list[str] = field(init=False)
    defaults: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.circuits = [c.name for c in self.cfg.model.circuits()]
        self.defaults = {c.name: c.eval_loops for c in self.cfg.model.circuits()}

    @property
    def splits(self) -> dict[str, tuple[int, int] | None]:
        """Eval split name -> difficulty range [lo, hi] (None for a text corpus's splits)."""
        ranges = self.cfg.data.eval_splits if self.data.task is not None else {}
        return {k: (int(ranges[k][0]), int(ranges[k][1])) if k in ranges else None for k in self.data.split_names}

    def training_range(self, circuit: str) -> tuple[int, int]:
        """The loop counts circuit ``circuit`` typically saw in training: [lo, hi] of its distribution."""
        c = next(c for c in self.cfg.model.circuits() if c.name == circuit)
        return c.distribution().typical_range()

    def training_label(self, circuit: str) -> str:
        c = next(c for c in self.cfg.model.circuits() if c.name == circuit)
        return str(c.distribution())

    def select_splits(self, names: Sequence[str] | None) -> list[str]:
        """``names`` (default: every eval split), checked against the run's eval splits."""
        if not names:
            return list(self.splits)
        for name in names:
            if name not in self.splits:
                where = f" (data.eval_splits in {self.path / 'config.yaml'})" if self.data.task is not None else ""
                raise AnalysisError(f"--split {name}: this run has no eval split '{name}'; its splits are "
                                    f"{', '.join(self.splits)}{where}")
        return list(dict.fromkeys(names))

    def full_loops(self, loops: Mapping[str, int] | None = None) -> dict[str, int]:
        """Every circuit's count: its eval_loops default, overridden by ``loops``."""
        return {**self.defaults, **{k: int(v) for k, v in (loops or {}).items()}}


def read_run(path: str | Path) -> RunInfo:
    """Parse ``<path>/config.yaml``; the config's run.dir/run.name are re-pointed at ``path`` so a
    moved or copied run directory still finds its own checkpoints."""
    path = Path(path)
    if not path.is_dir():
        raise AnalysisError(f"--run {path}: no such directory (point --run at a directory made by "
                            f"`loopformer train`, e.g. runs/quickstart)")
    cfg = load_run_config(path)
    cfg.run.dir, cfg.run.name = str(path.resolve().parent), path.resolve().name
    return RunInfo(path, cfg, build_data(cfg))


@dataclass
class LoadedRun:
    """A run with its params restored, ready to evaluate."""

    info: RunInfo
    model: LoopedTransformer
    params: Any
    step: int
    evaluator: Evaluator

    @property
    def task(self) -> Task | None:
        """The synthetic task (None for a text run)."""
        return self.info.data.task

    def eval_sets(self, splits: Sequence[str], examples: int) -> dict[str, list[Batch]]:
        """The first ``examples`` examples (text: windows) of each split, the trainer's eval examples
        first, in batches of at most data.eval_batch_size."""
        batch = min(self.info.cfg.data.eval_batch_size, examples)
        return self.info.data.eval_sets(splits, examples, batch)

    def row(self, split: str, batches: Sequence[Batch], loops: Mapping[str, int] | None = None,
            ablate: Sequence[str] = (), fill: np.ndarray | jax.Array | None = None) -> Row:
        """Evaluate one setting on one split: a row of the shared schema (text runs add
        bits_per_byte and perplexity)."""
        m = self.evaluator.evaluate(self.params, batches, loops, ablate, fill)
        row = {"split": split, "loops": self.info.full_loops(loops), "ablated": list(ablate),
               "loss": m["loss"], "accuracy": m["accuracy"], "token_accuracy": m["token_accuracy"],
               "examples": m["examples"]}
        if self.task is None:
            extra = text_metrics({"loss": m["loss"]}, self.info.data.bytes_per_token(batches))
            row.update({k: v for k, v in extra.items() if k != "loss"})
        return row


def restore(cfg: Config, data: DataSource, step: int | None = None) -> tuple[LoopedTransformer, Any, int]:
    """`trainer.restore_params` with the run's already-built data source."""
    return restore_params(cfg, step, data)


def load_run(info: RunInfo, step: int | None = None) -> LoadedRun:
    """Restore the latest checkpoint of ``info`` (or ``step``)."""
    model, params, restored_step = restore(info.cfg, info.data, step)
    log(f"loaded {info.path} at step {restored_step}")
    return LoadedRun(info, model, params, restored_step, evaluator_for(model))


_EVALUATORS: dict[str, Evaluator] = {}


def evaluator_for(model: LoopedTransformer) -> Evaluator:
    """The process's Evaluator for this model structure: runs of one architecture (and commands run
    one after another in a process, e.g. tests or a notebook) share its compiled programs."""
    key = repr((dataclasses.asdict(model.cfg), model.vocab_size))
    if key not in _EVALUATORS:
        _EVALUATORS[key] = Evaluator(model)
    return _EVALUATORS[key]


def real_rows(batch: Batch) -> Batch:
    """The rows of ``batch`` that are examples (not the padding rows that fill the last batch)."""
    keep = np.asarray(batch["mask"]).sum(-1) > 0
    return {k: np.asarray(v)[keep] for k, v in batch.items()}
