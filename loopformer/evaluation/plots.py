"""Matplotlib figures for the analysis commands, returned as PNG bytes (for files and tensorboard).

Figures are built with `matplotlib.figure.Figure` and rendered by the Agg canvas, so no GUI
backend or global pyplot state is involved. Each loop-count axis marks the circuit's default
eval count (dashed line) and shades the range of counts it was trained on.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from loopformer.evaluation.run import Row
from loopformer.evaluation.sweep import verdict
from loopformer.evaluation.tables import caps_note, split_label
from loopformer.runs.read import RunInfo

DPI = 110


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _circuit_axis_label(info: RunInfo, circuit: str) -> str:
    depth = next(c.depth for c in info.cfg.model.circuits() if c.name == circuit)
    body = "∘".join(f"{circuit}{i + 1}" for i in range(depth))
    return f"{circuit} loop count (iterations of {body})"


def _mark_training(ax: Any, info: RunInfo, circuit: str, *, label: bool = True) -> None:
    """Shade the trained range and draw the default eval count of ``circuit`` on a loop-count x axis."""
    lo, hi = info.training_range(circuit)
    ax.axvspan(lo - 0.5 if lo == hi else lo, hi + 0.5 if lo == hi else hi, color="0.85", zorder=0,
               label=f"trained: {info.training_label(circuit)}" if label else None)
    ax.axvline(info.defaults[circuit], color="0.3", ls="--", lw=1,
               label=f"default eval_loops={info.defaults[circuit]}" if label else None)


def _loop_xscale(ax: Any, counts: Sequence[int]) -> None:
    if max(counts) / max(min(counts), 1) >= 8:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter("{x:g}")


def _title(info: RunInfo, step: int, what: str) -> str:
    return f"{info.path.name} @ step {step}: {what}"


def sweep_1d(rows: Sequence[Row], circuit: str, info: RunInfo, step: int) -> bytes:
    """Accuracy and loss vs the loop count of ``circuit``, one line per split."""
    fig = Figure(figsize=(11, 4.2))
    ax_acc, ax_loss = fig.subplots(1, 2)
    splits = list(dict.fromkeys(r["split"] for r in rows))
    counts: list[int] = []
    for s in splits:
        pts = sorted((r["loops"][circuit], r["accuracy"], r["loss"]) for r in rows if r["split"] == s)
        n, acc, loss = (np.asarray(v) for v in zip(*pts, strict=True))
        counts += list(n)
        name = split_label(info, s)
        ax_acc.plot(n, 100 * acc, marker="o", ms=3, label=name)
        ax_loss.plot(n, loss, marker="o", ms=3, label=name)
    for ax, ylabel in ((ax_acc, "accuracy (% exact match)"), (ax_loss, "loss (cross-entropy per answer token, nats)")):
        _mark_training(ax, info, circuit, label=ax is ax_acc)
        _loop_xscale(ax, counts)
        ax.set_xlabel(_circuit_axis_label(info, circuit))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_acc.set_ylim(-2, 102)
    ax_acc.legend(fontsize=8)
    others = {c: n for c, n in info.defaults.items() if c != circuit}
    fixed = f" ({', '.join(f'{c}={n}' for c, n in others.items())} fixed)" if others else ""
    fig.suptitle(_title(info, step, f"sweep of {circuit}{fixed}{caps_note(info.cfg.model, info.circuits)}"))
    return _png(fig)


def _cell_span(values: Sequence[int], lo: int, hi: int) -> tuple[float, float] | None:
    idx = [i for i, v in enumerate(values) if lo <= v <= hi]
    return (idx[0] - 0.5, idx[-1] + 0.5) if idx else None


def sweep_2d(rows: Sequence[Row], grid: Mapping[str, Sequence[int]], info: RunInfo, step: int) -> bytes:
    """One accuracy heatmap per split over the two swept circuits (rows: first, columns: second)."""
    a, b = list(grid)
    ga, gb = list(grid[a]), list(grid[b])
    splits = list(dict.fromkeys(r["split"] for r in rows))
    fig = Figure(figsize=(0.6 + 4.6 * len(splits), 4.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(splits)))
    at = {(r["split"], r["loops"][a], r["loops"][b]): r["accuracy"] for r in rows}
    image = None
    for ax, s in zip(axes, splits, strict=True):
        acc = np.array([[100 * at[s, m, n] for n in gb] for m in ga])
        image = ax.imshow(acc, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=100)
        if acc.size <= 160:
            for (i, j), v in np.ndenumerate(acc):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 60 else "k")
        ax.set_xticks(range(len(gb)), [str(n) for n in gb], fontsize=7)
        ax.set_yticks(range(len(ga)), [str(n) for n in ga], fontsize=7)
        ax.set_xlabel(_circuit_axis_label(info, b))
        ax.set_ylabel(_circuit_axis_label(info, a))
        ax.set_title(split_label(info, s), fontsize=10)
        span_a, span_b = _cell_span(ga, *info.training_range(a)), _cell_span(gb, *info.training_range(b))
        if span_a and span_b:
            ax.add_patch(_rect(span_b, span_a, edgecolor="w", ls="--", lw=1.5, label="trained range"))
        if info.defaults[a] in ga and info.defaults[b] in gb:
            ax.add_patch(_rect((gb.index(info.defaults[b]) - 0.5, gb.index(info.defaults[b]) + 0.5),
                               (ga.index(info.defaults[a]) - 0.5, ga.index(info.defaults[a]) + 0.5),
                               edgecolor="red", lw=2, label="default eval_loops"))
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=len(handles), fontsize=8, facecolor="0.6")
    fig.colorbar(image, ax=list(axes), label="accuracy (% exact match)")
    fig.suptitle(_title(info, step, f"accuracy over {a} × {b} loop counts{caps_note(info.cfg.model, info.circuits)}"))
    return _png(fig)


def _rect(xspan: tuple[float, float], yspan: tuple[float, float], **kw: Any) -> Any:
    from matplotlib.patches import Rectangle

    inset = 0.04  # keep the outline inside the image so an edge cell's border stays visible
    return Rectangle((xspan[0] + inset, yspan[0] + inset), xspan[1] - xspan[0] - 2 * inset,
                     yspan[1] - yspan[0] - 2 * inset, fill=False, **kw)


def convergence(conv: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]], info: RunInfo, step: int) -> bytes:
    """Per circuit (columns): relative state change (log y) and state norm vs iteration, one line per split."""
    splits = list(conv)
    circuits = list(next(iter(conv.values())))
    fig = Figure(figsize=(max(8.0, 5 * len(circuits)), 6.4), layout="constrained")
    axes = np.asarray(fig.subplots(2, len(circuits), squeeze=False))
    for j, c in enumerate(circuits):
        ax_r, ax_n = axes[0, j], axes[1, j]
        for s in splits:
            r = np.asarray(conv[s][c]["rel_change"], float)
            it = np.arange(1, len(r) + 1)
            reading = verdict(r, conv[s][c]["state_norm"], info.defaults[c])
            ax_r.plot(it, np.maximum(r, 1e-9), lw=1.2, label=s if reading == "-" else f"{s}: {reading}")
            ax_n.plot(it, conv[s][c]["state_norm"], lw=1.2, label=s)
        for ax in (ax_r, ax_n):
            _mark_training(ax, info, c, label=ax is ax_r)
            ax.set_xlabel(f"iteration of {c} (1 = first pass)")
            ax.grid(alpha=0.3, which="both")
        ax_r.set_yscale("log")
        ax_r.set_ylabel("relative state change ‖hᵢ − hᵢ₋₁‖ / ‖h‖")
        ax_n.set_ylabel("mean per-token state norm ‖hᵢ‖")
        ax_r.set_title(f"circuit {c}", fontsize=10)
        ax_r.legend(fontsize=7)
    fig.suptitle(_title(info, step, "does each loop settle? (flat low Δ: fixed point; "
                                    "flat high Δ: oscillation; rising norm: drift)"), fontsize=10)
    return _png(fig)


def ablation(rows: Sequence[Row], info: RunInfo, step: int) -> bytes:
    """Grouped bars: accuracy and loss of each ablation setting (x) for each split (colour)."""
    settings = list(dict.fromkeys(r["label"] for r in rows))
    splits = list(dict.fromkeys(r["split"] for r in rows))
    at = {(r["split"], r["label"]): r for r in rows}
    fig = Figure(figsize=(max(7.0, 1.3 * len(settings) * 2), 4.2), layout="constrained")
    ax_acc, ax_loss = fig.subplots(1, 2)
    width = 0.8 / len(splits)
    x = np.arange(len(settings))
    # a text split's exact match is 0 with or without a circuit: a text run shows bits per byte, a mixture the
    # accuracy of its task splits (every split's loss is beside it)
    text = all("bits_per_byte" in r for r in rows)
    for i, s in enumerate(splits):
        score = [at[s, lab]["bits_per_byte"] if text else 100 * at[s, lab]["accuracy"] for lab in settings]
        loss = [at[s, lab]["loss"] for lab in settings]
        if text or "bits_per_byte" not in at[s, settings[0]]:
            ax_acc.bar(x + (i - (len(splits) - 1) / 2) * width, score, width, label=s)
        ax_loss.bar(x + (i - (len(splits) - 1) / 2) * width, loss, width, label=s)
    mode = rows[0]["mode"]
    for ax, ylabel in ((ax_acc, "bits per byte" if text else "accuracy (% exact match)"),
                       (ax_loss, "loss (cross-entropy per answer token)")):
        ax.set_xticks(x, settings)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
    if not text:
        ax_acc.set_ylim(0, 102)
    ax_acc.legend(fontsize=8, title="split")
    what = "zeros" if mode == "zero" else "its mean output"
    fig.supxlabel(f"setting: '-X' = circuit X removed, 'only X' = every other circuit removed, 'none' = all removed "
                  f"({mode} ablation: a removed circuit outputs {what})", fontsize=9)
    loops = ", ".join(f"{c}={n}" for c, n in info.defaults.items())
    fig.suptitle(_title(info, step, f"circuit ablation at loops {loops}{caps_note(info.cfg.model, info.circuits)}"))
    return _png(fig)


def activity(examples: Sequence[Mapping[str, Any]], thresholds: Mapping[str, float], info: RunInfo,
             step: int) -> bytes:
    """Tokens x circuits for a few examples: each circuit's write norm per token (left; on = above the
    split's threshold, outlined) and the change in the token's loss when it is removed (right; answer
    tokens only, red = the circuit helped)."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import MaxNLocator

    n = max(len(examples), 1)
    fig = Figure(figsize=(12, 0.6 + 1.5 * n), layout="constrained")
    axes = np.asarray(fig.subplots(n, 2, squeeze=False))
    for (ax_w, ax_d), ex in zip(axes, examples, strict=False):
        circuits = list(ex["write_norm"])
        norms = np.asarray([ex["write_norm"][c] for c in circuits], float)
        answer = np.asarray(ex["answer"], bool)
        delta = np.where(answer[None], np.asarray([ex["delta_loss"][c] for c in circuits], float), np.nan)
        im = ax_w.imshow(norms, aspect="auto", cmap="viridis", interpolation="nearest")
        on = norms > thresholds[ex["split"]]
        if on.any() and not on.all():
            if min(on.shape) >= 2:
                ax_w.contour(on.astype(float), levels=[0.5], colors="w", linewidths=0.6)
            else:  # a contour needs 2 x 2 cells: one circuit (a routed one) was a TypeError
                ys, xs = np.nonzero(on)
                ax_w.scatter(xs, ys, s=6, c="w", marker="o")
        fig.colorbar(im, ax=ax_w, pad=0.01).ax.tick_params(labelsize=7)
        span = max(float(np.nanmax(np.abs(delta))) if answer.any() else 0.0, 1e-6)
        im = ax_d.imshow(delta, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -span, span),
                         interpolation="nearest")
        fig.colorbar(im, ax=ax_d, pad=0.01).ax.tick_params(labelsize=7)
        for ax in (ax_w, ax_d):
            ax.set_yticks(range(len(circuits)), circuits)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=7)
        ax_w.set_title(f"{ex['split']} · example {ex['index']}: write norm ‖g·out‖ per token", fontsize=8)
        ax_d.set_title(f"{ex['split']} · example {ex['index']}: Δ loss with the circuit removed (answer tokens)",
                       fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("token position (real tokens)", fontsize=8)
    fig.suptitle(_title(info, step, "circuit activity per token"), fontsize=10)
    return _png(fig)


def rys_heatmap(rows: Sequence[Mapping[str, Any]], baseline: Mapping[str, Any], split: str, layers: int,
                stack: str, info: RunInfo, step: int) -> bytes:
    """One panel per repeat count: the change against the unmodified model of duplicating [start, end)
    (rows: start layer, columns: end layer), as the RYS blog drew its scan; blue is better."""
    text = info.is_text
    key = "bits_per_byte" if text else "accuracy"
    scale = 1.0 if text else 100.0
    mine = [r for r in rows if r["split"] == split]
    repeats = sorted({r["repeats"] for r in mine})
    grids = {}
    for rep in repeats:
        g = np.full((layers, layers), np.nan)
        for r in mine:
            if r["repeats"] == rep:
                g[r["start"], r["end"] - 1] = scale * (r[key] - baseline[key])
        grids[rep] = g
    # the colour scale spans at least 1 point of accuracy (0.01 bits per byte): a change far below that, the
    # noise of a few examples, stays pale instead of saturating the map
    span = max([float(np.nanmax(np.abs(g))) for g in grids.values() if np.isfinite(g).any()] + [0.01 if text else 1.0])
    fig = Figure(figsize=(0.8 + 4.2 * len(repeats), 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(repeats)))
    image = None
    for ax, rep in zip(axes, repeats, strict=True):
        g = grids[rep]
        image = ax.imshow(g, origin="lower", cmap="RdBu_r" if text else "RdBu", vmin=-span, vmax=span)
        if layers <= 12:
            for (i, j), v in np.ndenumerate(g):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:+.2f}" if text else f"{v:+.0f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(layers), [str(j + 1) for j in range(layers)], fontsize=7)
        ax.set_yticks(range(layers), [str(i) for i in range(layers)], fontsize=7)
        ax.set_xlabel("end layer j (block [i, j) is duplicated)")
        ax.set_ylabel("start layer i")
        ax.set_title(f"repeats {rep}: the block runs {rep + 1} times", fontsize=10)
    what = "Δ bits per byte (lower is better)" if text else "Δ accuracy (points)"
    fig.colorbar(image, ax=list(axes), label=f"{what} vs the unmodified model")
    base = f"{baseline[key]:.4f} bpb" if text else f"{100 * baseline[key]:.1f}%"
    fig.suptitle(_title(info, step, f"duplicating {stack} layers [i, j) on {split_label(info, split)} "
                                    f"(unmodified: {base})"), fontsize=10)
    return _png(fig)
