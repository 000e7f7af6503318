"""Plain-text tables and CSV files for the analysis commands' rows (schema in `analysis.run`)."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loopformer.evaluation.run import PROBE_SPLIT, Row
from loopformer.runs.layout import replace_file
from loopformer.runs.read import RunInfo


def _is_number(cell: str) -> bool:
    try:
        float(cell.strip().rstrip("%*").replace("e+", "e").replace(",", ""))
    except ValueError:
        return False
    return True


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, markdown: bool = False) -> str:
    """Columns padded to their widest cell: numbers right-aligned, text left-aligned. A cell with
    line breaks (a rendered maze) spans several lines; the other cells of its row sit on the first.
    ``markdown``: a Markdown table (``| a | b |``, separator ``|---|---:|``; no multi-line cells)."""
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(line) for r in cells for line in r[i].split("\n")) for i in range(len(header))]
    right = [all(_is_number(r[i]) or r[i] in ("-", "") for r in cells[1:]) for i in range(len(header))]
    pad = lambda r: [c.rjust(w) if ra else c.ljust(w) for c, w, ra in zip(r, widths, right, strict=True)]  # noqa: E731
    if markdown:
        widths = [max(w, 3) for w in widths]  # a Markdown rule needs three characters
        rule = ["-" * (w - 1) + (":" if ra else "-") for w, ra in zip(widths, right, strict=True)]
        return "\n".join("| " + " | ".join(pad(r) if r is not rule else r) + " |" for r in [cells[0], rule, *cells[1:]])

    def physical(row: list[str]) -> list[str]:
        parts = [c.split("\n") for c in row]
        height = max(map(len, parts))
        return ["  ".join(pad([p[k] if k < len(p) else "" for p in parts])).rstrip() for k in range(height)]

    return "\n".join(["  ".join(pad(cells[0])).rstrip(), "  ".join("-" * w for w in widths)] + [
        line for r in cells[1:] for line in physical(r)])


def score(row: Row) -> str:
    """A row's headline number: bits per byte on a text split (a probe's also its answers' exact match), else
    exact-match accuracy (a mixture of text and tasks has both kinds of split)."""
    if "bits_per_byte" not in row:
        return pct(row["accuracy"])
    return f"{row['bits_per_byte']:.4f}" + (f" ({pct(row['accuracy'])} exact)" if row.get("split") == PROBE_SPLIT else "")


def score_name(rows: Sequence[Row]) -> str:
    """The header of `score`'s column: bits/byte, accuracy, or both for a mixture of text and tasks."""
    text = [("bits_per_byte" in r) for r in rows]
    return "bits/byte" if all(text) and text else "accuracy / bits/byte" if any(text) else "accuracy"


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def loops_str(loops: Mapping[str, int]) -> str:
    """``X=4 Y=2``; "no loops" for a model without circuits (a blank label read as a bug)."""
    return " ".join(f"{k}={v}" for k, v in loops.items()) or "no loops"


def caps_note(model: Any, names: Sequence[str], form: str = " ({})") -> str:
    """``form`` holding "ACT halts X's tokens by its head: the counts are caps" for the circuits of ``names``
    that halt their tokens themselves in every evaluation (ACT, `Circuit.__call__`), else "": a header's "at
    loops X=8" read as 8 iterations where ACT ran 3.5 on average (eval's "loops (caps)" column said so)."""
    halting = [c for c in names if model.circuit(c).halting.rule().mixes_output]
    return form.format(f"ACT halts {' and '.join(halting)}'s tokens by its head: the counts are caps") if halting else ""


def split_label(info: RunInfo, split: str) -> str:
    rng = info.splits.get(split)  # None: text, or a probe set
    if rng is None:
        return split
    return f"{split} [{rng[0]}, {rng[1]}]" if rng[0] != rng[1] else f"{split} [{rng[0]}]"


def scored(counts: Mapping[str, int] | Sequence[Row]) -> int | str:
    """The examples scored per split ({split: count}, or rows with "split" and "examples") for `header_line`: one
    count, or a count per split where they differ (a text split may hold fewer windows than --examples asks for)."""
    if not isinstance(counts, Mapping):
        counts = {r["split"]: r["examples"] for r in counts}
    same = set(counts.values())
    return same.pop() if len(same) == 1 else " / ".join(f"{n} ({s})" for s, n in counts.items())


def header_line(info: RunInfo, step: int, examples: int | str, probe: str | None = None) -> str:
    if probe:
        return (f"{info.path} @ step {step} · probe {probe} · loss = the answers' loss per token; accuracy = answers "
                f"greedy decoding reproduces exactly; token acc = answer tokens right")
    if info.is_text:
        return (f"{info.path} @ step {step} · text · {examples} windows per split · loss per token; "
                f"token acc = next-token accuracy")
    return (f"{info.path} @ step {step} · task {info.cfg.data.task_label()} · {examples} examples per split "
            f"(difficulty in brackets) · accuracy = exact match of every answer token")


def exit_str(row: Row) -> str:
    """``X=latent_diff:0.01`` for a row's exit rules ('-' without)."""
    return " ".join(f"{c}={r}" for c, r in (row.get("exit") or {}).items()) or "-"


def mean_loops_str(row: Row) -> str:
    return " ".join(f"{c}={v:.2f}" for c, v in row.get("mean_loops", {}).items())


def computed_str(row: Row) -> str:
    return " ".join(f"{c}={v:.2f}" for c, v in row.get("computed_loops", {}).items()) or "-"


def stops_early(row: Row) -> bool:
    """Whether some circuit's tokens ran fewer iterations than its count (an exit rule, a router's exits, or
    counts per difficulty, ``auto``): its loops are then caps, and the mean loops run say what ran."""
    return bool(row.get("exit")) or any(not isinstance(n, int) or row.get("mean_loops", {}).get(c, n) < n - 1e-6
                                        for c, n in row["loops"].items())


def eval_table(rows: Sequence[Row], info: RunInfo) -> str:
    exits = any(stops_early(r) for r in rows)  # a routed stage's rounds, too: its loops are only the caps
    body = [[split_label(info, r["split"]), loops_str(r["loops"])]
            + ([exit_str(r), mean_loops_str(r), computed_str(r)] if exits else [])
            + [",".join(r["ablated"]) or "-", f"{r['loss']:.4f}", score(r), pct(r["token_accuracy"]), r["examples"]]
            for r in rows]
    header = (["split", "loops (caps)" if exits else "loops"] + (["exit", "mean loops", "computed"] if exits else [])
              + ["ablated", "loss", score_name(rows), "token acc", "examples"])
    return format_table(header, body)


def exit_table(rows: Sequence[Row], info: RunInfo) -> str:
    """A sweep over exit thresholds: a row per split and rule, with the iterations actually run."""
    body = [[split_label(info, r["split"]), exit_str(r), loops_str(r["loops"]), mean_loops_str(r), computed_str(r),
             f"{r['loss']:.4f}", score(r)] for r in rows]
    return ("exit rules: each token stops when its rule fires (loops = the caps; mean loops = iterations run per "
            "real token; computed = token-iterations executed per real token, with waiting and padding)\n"
            + format_table(["split", "exit", "loops (caps)", "mean loops", "computed", "loss", score_name(rows)], body))


def ablation_table(rows: Sequence[Row], info: RunInfo) -> str:
    mode = rows[0]["mode"] if rows else "zero"
    what = "zeros" if mode == "zero" else "its mean output over the split"
    lines = [f"ablation ({mode}: a removed circuit's output is replaced by {what}); "
             f"loops {loops_str(info.defaults)}{caps_note(info.cfg.model, info.circuits)}; Δ vs baseline"]
    # text splits: bits per byte (a window's exact match is 0 with or without a circuit); task splits: accuracy
    delta = lambda r: (f"{r['delta_bits_per_byte']:+.4f}" if "delta_bits_per_byte" in r else
                       f"{100 * r['delta_accuracy']:+.1f}")
    body = [[split_label(info, r["split"]), r["label"], ",".join(r["kept"]) or "-", f"{r['loss']:.4f}",
             f"{r['delta_loss']:+.4f}", score(r), delta(r)] for r in rows]
    name = score_name(rows)
    what = {"accuracy": "Δacc (pts)", "bits/byte": "Δbits/byte"}.get(name, "Δacc (pts) / Δbits/byte")
    lines.append(format_table(["split", "setting", "circuits on", "loss", "Δloss", name, what], body))
    return "\n".join(lines)


def sweep_table(rows: Sequence[Row], grid: Mapping[str, Sequence[int]], info: RunInfo) -> str:
    """One circuit: a row per count, accuracy and loss per split. Two: an accuracy matrix per split."""
    names = list(grid)
    splits = list(dict.fromkeys(r["split"] for r in rows))
    fixed = {c: n for c, n in info.defaults.items() if c not in grid}
    notes = [f"{c}: trained on {info.training_label(c)}, default {info.defaults[c]} (*)" for c in names]
    head = (f"sweep over {' × '.join(names)} loops" + (f" ({loops_str(fixed)} fixed)" if fixed else "")
            + caps_note(info.cfg.model, info.circuits))
    lines = [head + "; " + "; ".join(notes)]
    at = {(r["split"], tuple(r["loops"][c] for c in names)): r for r in rows}
    star = lambda c, n: f"{n}*" if n == info.defaults[c] else f"{n} "
    # text splits: bits per byte (a window's exact match means nothing); task splits: exact-match accuracy
    first = {s: next(r for r in rows if r["split"] == s) for s in splits}
    key = {s: ("bits/byte", lambda r: f"{r['bits_per_byte']:.4f}") if "bits_per_byte" in first[s] else
           ("acc", lambda r: pct(r["accuracy"])) for s in splits}
    if len(names) == 1:
        (c,) = names
        header = [c] + [f"{split_label(info, s)} {k}" for s in splits for k in (key[s][0], "loss")]
        body = [[star(c, n)] + [v for s in splits for v in (key[s][1](at[s, (n,)]), f"{at[s, (n,)]['loss']:.4f}")]
                for n in grid[c]]
        lines.append(format_table(header, body))
        return "\n".join(lines)
    a, b = names
    for s in splits:
        what = "bits per byte" if key[s][0] == "bits/byte" else "accuracy"
        lines.append(f"\n{split_label(info, s)}: {what}, rows {a}, columns {b}")
        body = [[star(a, m)] + [key[s][1](at[s, (m, n)]) for n in grid[b]] for m in grid[a]]
        lines.append(format_table([f"{a} \\ {b}"] + [star(b, n) for n in grid[b]], body))
    return "\n".join(lines)


def convergence_table(summary: Sequence[Mapping[str, Any]]) -> str:
    at = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731  (None: the sweep stopped before it)
    body = [[s["split"], s["circuit"], s["iterations"], at(s["rel_change_default"], ".2e"), f"{s['rel_change_last']:.2e}",
             at(s["norm_default"], ".3g"), f"{s['norm_last']:.3g}", s["verdict"]] for s in summary]
    return ("convergence: relative state change per iteration at the default count and at the last iteration swept\n"
            + format_table(["split", "circuit", "iterations", "Δ@default", "Δ@last", "norm@default", "norm@last",
                            "reading"], body))


def flat_row(row: Row) -> dict[str, Any]:
    """A row with mappings (``loops``, ``mean_loops``) spread into <key>_<circuit> columns and lists joined
    by ';' (for CSV)."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, Mapping):
            out.update({f"{k}_{c}": n for c, n in v.items()})
        elif isinstance(v, list | tuple):
            out[k] = ";".join(map(str, v))
        else:
            out[k] = v
    return out


def write_csv(path: Path, rows: Sequence[Row]) -> None:
    """``rows`` (`flat_row`) as a CSV file at ``path``, replaced whole (`replace_file`)."""
    flat = [flat_row(r) for r in rows]
    fields = list(dict.fromkeys(k for r in flat for k in r))
    text = io.StringIO()  # the csv module's "\r\n" line ends, as a file opened with newline="" keeps them
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(flat)
    replace_file(path, text.getvalue().encode("utf-8"))


def activity_table(rows: Sequence[Row], thresholds: Mapping[str, float], info: RunInfo, mode: str,
                   loops: Mapping[str, int] | None = None) -> str:
    """Per split and circuit at ``loops`` (None: the eval_loops): on-rate, mean write norm, mean Δloss when the
    circuit is removed."""
    what = "zeros" if mode == "zero" else "its mean output"
    lines = [f"circuit activity at loops {loops_str(info.full_loops(loops))}{caps_note(info.cfg.model, info.circuits)}"
             f": on = write norm ||g·out|| above 10% of the "
             f"split's largest per-circuit median write norm; Δloss = CE with the circuit removed ({mode}: "
             f"{what}) - CE, per answer token"]
    body = [[split_label(info, r["split"]), r["circuit"], pct(r["on_rate"]), f"{r['mean_write_norm']:.4g}",
             f"{thresholds[r['split']]:.3g}", f"{r['mean_ablation_delta_loss']:+.4f}"] for r in rows]
    lines.append(format_table(["split", "circuit", "on-rate", "mean write norm", "on above", "mean Δloss"], body))
    return "\n".join(lines)
