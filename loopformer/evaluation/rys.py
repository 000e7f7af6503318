"""Layer-duplication scans ("repeat yourself", RYS): every contiguous block [start, end) of a plain stack
(prelude or coda) run ``repeats`` extra times, scored on a run's eval splits against the unmodified
model. Each setting is a layer schedule (`loopformer.model.schedule`), a runtime input of the
evaluator's program padded to one length, so the whole scan runs on the programs compiled for its
first setting (one per batch shape).

Rows: {"start", "end", "repeats", "split", "loss", "accuracy" (None for text), "bits_per_byte" (None for
tasks), "examples"}; the baseline rows have the same fields without start / end / repeats.

A scan over L (L + 1) / 2 blocks times the repeat counts is many evaluations; `screen` takes the first
batches of each split, so that the whole scan runs on a subset, and `rescore` scores the best settings of
the screen (and the unmodified model) again on every example.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from loopformer.errors import AnalysisError
from loopformer.evaluation.run import PROBE_SPLIT, Batch, LoadedRun
from loopformer.model.schedule import duplication, longest, padded, ranges
from loopformer.runs.log import log, progress
from loopformer.runs.read import RunInfo

STACKS = ("prelude", "coda")


def stack_layers(info: RunInfo, stack: str) -> int:
    """Layers of the run's ``stack``; AnalysisError when it has none to duplicate."""
    if stack not in STACKS:
        raise AnalysisError(f"--stack {stack}: choose prelude or coda")
    layers = getattr(info.cfg.model, stack)
    if layers < 1:
        other = "coda" if stack == "prelude" else "prelude"
        if getattr(info.cfg.model, other) < 1:  # each stack pointed at the other, both empty
            raise AnalysisError(f"{info.path} has no plain layers to duplicate (model.prelude and model.coda: 0): "
                                f"every layer is in its circuits, which loop already; rys scans the plain layers of a "
                                f"prelude or coda (`loopformer sweep` varies a circuit's loops)")
        raise AnalysisError(f"{info.path} has no {stack} layers to duplicate (model.{stack}: 0); try --stack {other}")
    return layers


def same_length(eval_sets: Mapping[str, Sequence[Batch]]) -> dict[str, list[Batch]]:
    """Every batch right-padded to the longest sequence of any split (padding: token 0, mask 0, segment 0,
    which attention keeps apart and no metric counts), so splits of different lengths share one program."""
    target = max(np.shape(b["inputs"])[1] for batches in eval_sets.values() for b in batches)

    def pad(b: Batch) -> Batch:
        have = np.shape(b["inputs"])[1]
        if have >= target or "segment_ids" not in b:  # without segment ids, padding would be attended to
            return b
        return {k: np.pad(np.asarray(v), [(0, 0), (0, target - have)]) if np.ndim(v) == 2 else v for k, v in b.items()}

    return {split: [pad(b) for b in batches] for split, batches in eval_sets.items()}


def _score(row: Mapping[str, Any], text: bool) -> dict[str, Any]:
    """A scored setting's numbers; a text split's exact match of whole windows means nothing (None), a probe
    split's is the share of answers greedy decoding reproduces (`loopformer.data.probes`)."""
    exact = not text or row["split"] == PROBE_SPLIT
    return {"split": row["split"], "loss": row["loss"], "accuracy": row["accuracy"] if exact else None,
            "bits_per_byte": row.get("bits_per_byte") if text else None, "examples": row["examples"]}


def count_examples(batches: Sequence[Batch]) -> int:
    """The examples in ``batches``: the rows with any unmasked position (padding rows have none)."""
    return sum(int(np.sum(np.asarray(b["mask"]).sum(-1) > 0)) for b in batches)


def screen(eval_sets: Mapping[str, Sequence[Batch]], examples: int) -> dict[str, list[Batch]]:
    """The first ``examples`` examples of each split, in the batches that hold them (whole batches: the screen runs
    on the programs the full scan compiles); the examples past ``examples`` in the last one are masked out, as the
    padding rows are (`--screen 8` under a batch of 64 scored all 64; #27 pass 40's leftover)."""
    out = {}
    for split, batches in eval_sets.items():
        taken, count = [], 0
        for b in batches:
            if count >= examples:
                break
            mask = np.asarray(b["mask"])
            rows = np.flatnonzero(mask.sum(-1) > 0)
            if count + len(rows) > examples:
                mask = mask.copy()
                mask[rows[examples - count:]] = 0
                b = {**b, "mask": mask}
            taken.append(b)
            count += min(len(rows), examples - count)
        out[split] = taken
    return out


def rescore(run: LoadedRun, eval_sets: Mapping[str, Sequence[Batch]], stack: str, rows: Sequence[Mapping[str, Any]],
            keep: int, loops: Mapping[str, int] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows, baseline) on every example of ``eval_sets``: the unmodified model and, per split, the ``keep`` best
    settings of ``rows`` (a screen's: ranked as `best` ranks)."""
    layers = stack_layers(run.info, stack)
    repeats = sorted({r["repeats"] for r in rows})
    length = longest(layers, repeats)
    text = run.info.is_text
    eval_sets = same_length(eval_sets)
    out, baseline = [], []
    for split, batches in eval_sets.items():
        baseline.append(_score(run.row(split, batches, loops, schedules={stack: padded(list(range(layers)), length)}),
                               text))
        for r in ranked([r for r in rows if r["split"] == split], text)[:keep]:
            order = padded(duplication(layers, r["start"], r["end"], r["repeats"]), length)
            row = run.row(split, batches, loops, schedules={stack: order})
            out.append({"start": r["start"], "end": r["end"], "repeats": r["repeats"]} | _score(row, text))
    return out, baseline


def scan(run: LoadedRun, eval_sets: Mapping[str, Sequence[Batch]], stack: str, repeats: Sequence[int],
         loops: Mapping[str, int] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows, baseline): every range of ``stack`` at every repeat count, on every split; circuits (if
    any) at ``loops`` (default: their eval_loops). Splits of different lengths are padded to one
    (`same_length`): the scan compiles one program per batch shape, usually one."""
    layers = stack_layers(run.info, stack)
    if not repeats or min(repeats) < 1:
        raise AnalysisError(f"--repeats: counts must be >= 1, got {list(repeats)}")
    length = longest(layers, repeats)
    text = run.info.is_text
    eval_sets = same_length(eval_sets)
    baseline, rows = [], []
    for split, batches in eval_sets.items():
        base = run.row(split, batches, loops, schedules={stack: padded(list(range(layers)), length)})
        baseline.append(_score(base, text))
        settings = [(r, start, end) for r in repeats for start, end in ranges(layers)]
        for done, (r, start, end) in enumerate(progress(settings, f"rys {split}"), 1):
            order = padded(duplication(layers, start, end, r), length)
            row = run.row(split, batches, loops, schedules={stack: order})
            rows.append({"start": start, "end": end, "repeats": r} | _score(row, text))
            if done % 20 == 0 or done == len(settings):
                log(f"rys {split}: {done}/{len(settings)} duplications")
    return rows, baseline


def metric(text: bool) -> str:
    """The score a scan ranks by: bits per byte (lower is better) for text, else accuracy."""
    return "bits_per_byte" if text else "accuracy"


def ranked(rows: Sequence[Mapping[str, Any]], text: bool) -> list[Mapping[str, Any]]:
    """``rows`` best first: lowest bits per byte, or highest accuracy then lowest loss."""
    if text:
        return sorted(rows, key=lambda r: r["bits_per_byte"])
    return sorted(rows, key=lambda r: (-r["accuracy"], r["loss"]))


def best(rows: Sequence[Mapping[str, Any]], split: str, text: bool) -> Mapping[str, Any]:
    """The best row of ``split`` (lowest bits per byte, or highest accuracy then lowest loss)."""
    return ranked([r for r in rows if r["split"] == split], text)[0]
