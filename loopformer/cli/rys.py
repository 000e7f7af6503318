"""``loopformer rys``: scan layer duplications of a plain stack ("repeat yourself")."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loopformer.cli import ascii_digits
from loopformer.cli.common import (
    check_probe,
    check_writable,
    command,
    emit,
    integer,
    one_set,
    probe_flag,
    probe_sets,
    run_flags,
    write_png,
)
from loopformer.errors import AnalysisError, PlanError
from loopformer.evaluation import plots, rys, tables
from loopformer.evaluation.run import PROBE_SPLIT, load_run
from loopformer.runs.log import log
from loopformer.runs.read import RunInfo, read_run

TOP = 5
SCREEN = 256  # examples per split the whole scan runs on by default; the TOP best are rescored on --examples
MAX_REPEATS = 64  # far past the 1-3 extra runs the duplication experiments use; a typo would build a huge schedule


def _repeats(text: str) -> list[int]:
    ascii_digits(text)  # `--repeats ٢` scanned 2 (#27 pass 40's leftover)
    if "" in (x.strip() for x in text.split(",")) and text.strip():  # 1,,2 was read as 1,2
        raise argparse.ArgumentTypeError(f"an empty item between commas in '{text}'; write counts like 1,2,3")
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected counts like 1,2,3, got '{text}'") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected counts >= 1 like 1,2,3, got '{text}'")
    return counts


def _args(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Every contiguous block [i, j) of the stack's L layers (L (L + 1) / 2 of them) runs r extra times "
                "(layers 0..j-1, then i..j-1 r times, then j..L-1), with no training, and is scored against the "
                "unmodified model. Writes rys.csv and rys_<split>.png (start x end, the change) into the run, replacing an "
                "earlier scan's set (its plots of splits this scan does not score are removed); two scans at once "
                "write one after the other, and the last to finish wins. With --probe, --examples takes the first N "
                "probes. Every setting is a runtime layer schedule: the scan runs on one compiled program per batch "
                "shape.")
    run_flags(p)
    p.add_argument("--stack", choices=rys.STACKS, help="the stack to duplicate in (default: prelude, or coda "
                                                        "when the prelude is empty)")
    probe_flag(p)
    p.add_argument("--repeats", type=_repeats, default=[1], metavar="R1,R2,...",
                   help="extra runs of the block (default 1: the block runs twice)")
    p.add_argument("--screen", type=integer, default=SCREEN, metavar="N",
                   help=f"score every setting on the first N examples of each split, then the {TOP} best of each "
                        f"(and the unmodified model) on all --examples (default {SCREEN}; 0: every setting on all)")


def _fmt(row: dict[str, Any], text: bool) -> str:
    if text and row.get("accuracy") is not None:  # a probe: answers' bits per byte, and greedy exact match
        return f"{row['bits_per_byte']:.4f} ({100 * row['accuracy']:.1f}% exact)"
    return f"{row['bits_per_byte']:.4f}" if text else f"{100 * row['accuracy']:.1f}%"


def _table(rows: list[dict[str, Any]], baseline: list[dict[str, Any]], text: bool, scanned: int,
           screened: dict[str, int] | None) -> str:
    key = rys.metric(text)
    out = []
    for base in baseline:
        split = base["split"]
        mine = [r for r in rows if r["split"] == split]
        ranked = rys.ranked(mine, text)[:TOP]
        of = (f"the best {len(mine)} of {scanned} settings scored on {screened[split]} examples, rescored on "
              f"{base['examples']}" if screened else f"best of {len(mine)} settings")
        head = f"split {split}: unmodified {_fmt(base, text)} (loss {base['loss']:.4f}); {of}:"
        cells = [[f"[{r['start']}, {r['end']})", r["repeats"], _fmt(r, text),
                  f"{(r[key] - base[key]) * (1 if text else 100):+.{4 if text else 1}f}", f"{r['loss']:.4f}"]
                 for r in ranked]
        what = "bits/byte" if text else "accuracy"
        out.append(head + "\n" + tables.format_table(["block", "repeats", what, "change", "loss"], cells))
    return "\n\n".join(out)


def _outputs(info: RunInfo) -> list[Path]:
    """Every file a scan writes, replaces or removes: rys.csv, and rys_<split>.png of each eval split and of a
    probe set."""
    return [info.path / "rys.csv"] + [_png(info, s) for s in dict.fromkeys([*info.splits, PROBE_SPLIT])]


def _png(info: RunInfo, split: str) -> Path:
    """rys_<split>.png; a mixture's split NAME/SPLIT is written as rys_NAME_SPLIT.png (the '/' named a folder that
    is not there, and the scan failed after its work)."""
    return info.path / f"rys_{split.replace('/', '_')}.png"


def _write(info: RunInfo, rows: list[dict[str, Any]], pngs: dict[str, bytes]) -> list[str]:
    """Write rys.csv and a plot per split (rendered beforehand: the set's writes follow each other at once) and
    remove the plots of splits this scan did not score, which rys.csv no longer holds; the files written."""
    outputs = _outputs(info)
    with one_set(info.path, outputs, "rys"):
        written = {_png(info, s) for s in pngs}
        stale = [p for p in outputs[1:] if p not in written and p.is_file()]  # under the lock
        tables.write_csv(info.path / "rys.csv", rows)
        files = [str(info.path / "rys.csv")] + [write_png(_png(info, s), png) for s, png in pngs.items()]
        for path in stale:
            path.unlink()
            log(f"removed {path} (an earlier scan's; rys.csv now holds {', '.join(pngs)})")
    return files


def _header(info: RunInfo, step: int, baseline: Sequence[dict[str, Any]], probe: str | None) -> str:
    """The table's first line with the examples the scan scored (a text split may hold fewer windows than
    --examples asks for)."""
    counts = {b["split"]: b["examples"] for b in baseline}
    if probe:
        return tables.header_line(info, step, 0, probe) + f" · {counts[PROBE_SPLIT]} probes"
    return tables.header_line(info, step, tables.scored(counts))  # a count per split, when they differ


@command("rys", "scan duplications of every contiguous block of layers of a plain stack (writes rys.csv, "
                "rys_<split>.png)", _args)
def rys_command(args: argparse.Namespace) -> int:
    def body() -> tuple[dict[str, Any], str]:
        twice = next((r for r in args.repeats if args.repeats.count(r) > 1), None)
        if twice is not None:  # scanned once, with no word, where every other list refuses a repeat
            raise PlanError(f"--repeats {','.join(map(str, args.repeats))} lists {twice} twice; give each count once")
        args.repeats = sorted(args.repeats)
        if max(args.repeats) > MAX_REPEATS:
            raise PlanError(f"--repeats {max(args.repeats)}: at most {MAX_REPEATS} extra runs of a block (each adds "
                            f"the block's layers to every schedule); ask for fewer, e.g. --repeats 1,2,3")
        if args.screen < 0:
            raise PlanError(f"--screen {args.screen}: give a number of examples >= 1, or 0 to score every setting on "
                            f"all --examples")
        info = read_run(args.run)
        stack = args.stack or ("prelude" if info.cfg.model.prelude else "coda")
        layers = rys.stack_layers(info, stack)
        check_writable(info.path, "rys.csv and rys_<split>.png", _outputs(info))
        check_probe(args, info)
        splits = [] if args.probe else info.select_splits(args.split)
        run = load_run(info, args.step, raw=args.raw_weights)
        eval_sets = probe_sets(args, run) or run.eval_sets(splits, args.examples)
        before = run.evaluator.compiles
        subset = rys.screen(eval_sets, args.screen) if args.screen else eval_sets
        screening = any(rys.count_examples(subset[s]) < rys.count_examples(eval_sets[s]) for s in eval_sets)
        rows, baseline = rys.scan(run, subset if screening else eval_sets, stack, args.repeats)
        best_rows, best_base = rys.rescore(run, eval_sets, stack, rows, TOP) if screening else (rows, baseline)
        compiles = run.evaluator.compiles - before
        if not rows:
            raise AnalysisError("nothing to scan")
        key = rys.metric(info.is_text)
        pngs = {b["split"]: plots.rys_heatmap(rows, b, b["split"], layers, stack, info, run.step) for b in baseline}
        files = _write(info, [dict(r, change=r[key] - b[key]) for b in baseline for r in rows if r["split"] == b["split"]],
                       pngs)
        doc = {**run.provenance(), "stack": stack, "layers": layers, "repeats": args.repeats,
               "probe": args.probe,
               "rows": rows, "baseline": baseline, "compiles": compiles, "files": files,
               "screen": ({"examples": {b["split"]: b["examples"] for b in baseline}, "rescored": best_rows,
                           "baseline": best_base} if screening else None)}
        scanned = f"duplicating blocks of the {layers} {stack} layer{'s' if layers > 1 else ''}, repeats {args.repeats}"
        if info.circuits:  # a looped run: only its plain stacks have layers to duplicate
            other = "coda" if stack == "prelude" else "prelude"
            # only a stack with layers: --stack coda on a run without a coda is refused (#27 pass 26)
            hint = f"--stack {other} scans the other stack, and " if getattr(info.cfg.model, other) else ""
            scanned += (f" (a looped run: rys duplicates layers of its plain {stack}, not its circuits "
                        f"{', '.join(info.circuits)}, which loop already; {hint}`loopformer convert` loops a block of "
                        f"a plain model)")
            doc["note"] = scanned
        evaluations = len(rows) + len(baseline) + (len(best_rows) + len(best_base) if screening else 0)
        text = "\n".join([_header(info, run.step, best_base, args.probe), scanned,
                          _table(best_rows, best_base, info.is_text, len(rows) // max(len(baseline), 1),
                                 {b["split"]: b["examples"] for b in baseline} if screening else None),
                          f"programs compiled for these {evaluations} evaluations: {compiles} "
                          f"(layer schedules are runtime inputs)", "wrote " + ", ".join(files)])
        return doc, text

    return emit(args, body)
