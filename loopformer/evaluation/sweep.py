"""Loop-count sweeps: metrics over a grid of counts for one or two circuits, and the convergence
view (per-iteration state change) that says whether a loop settles, drifts or keeps moving.

Loop counts are traced inputs of the evaluator's program, so a whole sweep runs on the programs
compiled for its first point (one per batch shape; `Evaluator.compiles` counts them).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from loopformer.evaluation.run import Batch, LoadedRun, Row, real_rows
from loopformer.runs.log import log, progress

Convergence = dict[str, dict[str, dict[str, list[float]]]]  # split -> circuit -> stat -> [iteration]


def grid_points(grid: Mapping[str, Sequence[int]]) -> list[dict[str, int]]:
    """Every combination of the swept counts: {"X": [1, 2], "Y": [3]} -> [{X: 1, Y: 3}, {X: 2, Y: 3}]."""
    names = list(grid)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(grid[n] for n in names))]


def sweep(run: LoadedRun, eval_sets: Mapping[str, Sequence[Batch]], grid: Mapping[str, Sequence[int]]) -> list[Row]:
    """One row per split and grid point; circuits not in ``grid`` stay at their eval_loops."""
    rows, points = [], grid_points(grid)
    for split, batches in eval_sets.items():
        for i, loops in enumerate(progress(points, f"sweep {split}")):
            rows.append(run.row(split, batches, loops))
            if (i + 1) % 10 == 0 or i + 1 == len(points):
                log(f"sweep {split}: {i + 1}/{len(points)} settings")
    return rows


def convergence(run: LoadedRun, eval_sets: Mapping[str, Sequence[Batch]], loops: Mapping[str, int]) -> Convergence:
    """Per split and circuit of ``loops`` (each run to its count there; the others at their
    defaults), iterations 1..n of rel_change ||h_i - h_{i-1}|| / max(||h_i||, ||h_{i-1}||),
    state_norm ||h_i|| and token_cosine, on the split's first batch (padding rows dropped)."""
    full = run.info.full_loops(loops)
    trace_len = max(full.values())
    out: Convergence = {}
    for split, batches in eval_sets.items():
        diag = run.evaluator.diagnostics(run.params, real_rows(batches[0]), full, trace_len)
        out[split] = {c: diag[c] for c in loops if c in diag}  # a routed bank keeps no per-iteration trace
    return out


def verdict(rel_change: Sequence[float], state_norm: Sequence[float], default: int) -> str:
    """A one-word reading of a convergence trace past the default count (a heuristic for the table;
    the plot is the evidence). With the step size s_i = rel_change_i * norm_i (~ ||h_i - h_{i-1}||):
    'fixed-point' (the last step moves the state by < 0.1%), 'settling' (the step shrank below 1/4
    of its size at the default count), 'drifting' (steps persist and the norm grew by > 50%), else
    'moving' (persistent steps at a steady norm: oscillation or chaos). '-' when not run past the
    default."""
    r, norms = np.asarray(rel_change, float), np.asarray(state_norm, float)
    if len(r) <= default:
        return "-"
    at = default - 1
    if r[-1] < 1e-3:
        return "fixed-point"
    if r[-1] * norms[-1] < 0.25 * r[at] * norms[at]:
        return "settling"
    if norms[-1] > 1.5 * max(norms[at], 1e-12):
        return "drifting"
    return "moving"


def summarize_convergence(conv: Convergence, defaults: Mapping[str, int]) -> list[dict[str, Any]]:
    """Rows {split, circuit, iterations, rel_change_default, rel_change_last, norm_default, norm_last, verdict};
    the values at the default count are None when the sweep stopped before it (it was the last swept's)."""
    out = []
    for split, per_circuit in conv.items():
        for circuit, stats in per_circuit.items():
            r, norms = stats["rel_change"], stats["state_norm"]
            at = defaults[circuit] - 1 if defaults[circuit] <= len(r) else None
            out.append({"split": split, "circuit": circuit, "iterations": len(r),
                        "rel_change_default": None if at is None else r[at], "rel_change_last": r[-1],
                        "norm_default": None if at is None else norms[at], "norm_last": norms[-1],
                        "verdict": verdict(r, norms, defaults[circuit])})
    return out
