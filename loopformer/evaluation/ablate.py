"""Circuit ablation: remove circuits (runtime gate 0) and measure what the model loses.

A removed circuit's output is replaced by zeros (``zero``) or by its mean output over the split's
eval set (``mean``: keeps the average offset the rest of the model expects, removes the
example-specific information). The settings are the baseline, each circuit removed alone, each
circuit kept alone (every other one removed) and, with two or more circuits, all removed; a set of
removed circuits that two settings share is evaluated once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from loopformer.evaluation.run import Batch, LoadedRun, Row
from loopformer.runs.log import log, progress

MODES = ("zero", "mean")


def ablation_sets(circuits: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(label, removed circuits) for each distinct setting, baseline first.

    ``["X", "Y", "Z"]`` -> baseline, -X, -Y, -Z, only X, only Y, only Z, none.
    """
    settings = [("baseline", [])] + [(f"-{c}", [c]) for c in circuits]
    if len(circuits) > 1:
        settings += [(f"only {c}", [o for o in circuits if o != c]) for c in circuits]
        settings.append(("none", list(circuits)))
    seen: set[tuple[str, ...]] = set()
    out = []
    for label, removed in settings:
        key = tuple(sorted(removed))
        if key not in seen:
            seen.add(key)
            out.append((label, removed))
    return out


def mean_fill(run: LoadedRun, batches: Sequence[Batch]) -> np.ndarray:
    """[num_circuits, d_model]: each circuit's output averaged over the batches that hold no padding
    rows (all of them if none is full), at the default loop counts. Returned on the host, like the
    default zero fill, so that zero and mean ablation run the same compiled program."""
    full = [b for b in batches if bool((np.asarray(b["mask"]).sum(-1) > 0).all())] or list(batches)
    return run.evaluator.circuit_means(run.params, full, run.info.full_loops())


def ablate(run: LoadedRun, eval_sets: Mapping[str, Sequence[Batch]], mode: str = "zero") -> list[Row]:
    """Rows (the shared schema plus label, mode, kept, delta_loss, delta_accuracy, and on a text split
    delta_bits_per_byte) per split and setting; deltas are against the split's baseline (negative delta_accuracy,
    positive delta_bits_per_byte: the circuit was needed)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    circuits = run.info.circuits
    rows = []
    for split, batches in eval_sets.items():
        fill = mean_fill(run, batches) if mode == "mean" else None
        base = None
        for label, removed in progress(ablation_sets(circuits), f"ablate {split}"):
            row = run.row(split, batches, None, removed, fill)
            base = base or row
            row.update(label=label, mode=mode, kept=[c for c in circuits if c not in removed],
                       delta_loss=row["loss"] - base["loss"], delta_accuracy=row["accuracy"] - base["accuracy"])
            if "bits_per_byte" in row:  # a text split's number (its windows' exact match is 0 either way)
                row["delta_bits_per_byte"] = row["bits_per_byte"] - base["bits_per_byte"]
            rows.append(row)
        log(f"ablate {split}: done")
    return rows
