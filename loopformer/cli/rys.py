"""``loopformer rys``: scan layer duplications of a plain stack ("repeat yourself")."""

from __future__ import annotations

import argparse
from typing import Any

from loopformer.cli.common import check_writable, command, emit, probe_flag, probe_sets, run_flags, write_png
from loopformer.errors import AnalysisError, PlanError
from loopformer.evaluation import plots, rys, tables
from loopformer.evaluation.run import load_run
from loopformer.runs.read import read_run

TOP = 5
MAX_REPEATS = 64  # far past the 1-3 extra runs the duplication experiments use; a typo would build a huge schedule


def _repeats(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected counts like 1,2,3, got '{text}'") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected counts >= 1 like 1,2,3, got '{text}'")
    return sorted(set(counts))


def _args(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Every contiguous block [i, j) of the stack's L layers (L (L + 1) / 2 of them) runs r extra times "
                "(layers 0..j-1, then i..j-1 r times, then j..L-1), with no training, and is scored against the "
                "unmodified model. Writes rys.csv and rys_<split>.png (start x end, the change) into the run. Every "
                "setting is a runtime layer schedule: the scan runs on one compiled program per batch shape.")
    run_flags(p)
    p.add_argument("--stack", choices=rys.STACKS, help="the stack to duplicate in (default: prelude, or coda "
                                                        "when the prelude is empty)")
    probe_flag(p)
    p.add_argument("--repeats", type=_repeats, default=[1], metavar="R1,R2,...",
                   help="extra runs of the block (default 1: the block runs twice)")


def _fmt(row: dict[str, Any], text: bool) -> str:
    return f"{row['bits_per_byte']:.4f}" if text else f"{100 * row['accuracy']:.1f}%"


def _table(rows: list[dict[str, Any]], baseline: list[dict[str, Any]], text: bool) -> str:
    key = rys.metric(text)
    out = []
    for base in baseline:
        split = base["split"]
        mine = [r for r in rows if r["split"] == split]
        ranked = sorted(mine, key=lambda r: r[key], reverse=not text)[:TOP]
        head = f"split {split}: unmodified {_fmt(base, text)} (loss {base['loss']:.4f}); best of {len(mine)} settings:"
        cells = [[f"[{r['start']}, {r['end']})", r["repeats"], _fmt(r, text),
                  f"{(r[key] - base[key]) * (1 if text else 100):+.{4 if text else 1}f}", f"{r['loss']:.4f}"]
                 for r in ranked]
        what = "bits/byte" if text else "accuracy"
        out.append(head + "\n" + tables.format_table(["block", "repeats", what, "change", "loss"], cells))
    return "\n\n".join(out)


@command("rys", "scan duplications of every contiguous block of layers of a plain stack (writes rys.csv, "
                "rys_<split>.png)", _args)
def rys_command(args: argparse.Namespace) -> int:
    def body() -> tuple[dict[str, Any], str]:
        if max(args.repeats) > MAX_REPEATS:
            raise PlanError(f"--repeats {max(args.repeats)}: at most {MAX_REPEATS} extra runs of a block (each adds "
                            f"the block's layers to every schedule); ask for fewer, e.g. --repeats 1,2,3")
        info = read_run(args.run)
        stack = args.stack or ("prelude" if info.cfg.model.prelude else "coda")
        layers = rys.stack_layers(info, stack)
        check_writable(info.path, "rys.csv and rys_<split>.png")
        splits = [] if args.probe else info.select_splits(args.split)
        run = load_run(info, args.step, raw=args.raw_weights)
        eval_sets = probe_sets(args, run) or run.eval_sets(splits, args.examples)
        before = run.evaluator.compiles
        rows, baseline = rys.scan(run, eval_sets, stack, args.repeats)
        compiles = run.evaluator.compiles - before
        tables.write_csv(info.path / "rys.csv", [dict(r, **{"change": r[rys.metric(info.is_text)] - b[
            rys.metric(info.is_text)]}) for b in baseline for r in rows if r["split"] == b["split"]])
        files = [str(info.path / "rys.csv")]
        for base in baseline:
            png = plots.rys_heatmap(rows, base, base["split"], layers, stack, info, run.step)
            files.append(write_png(info.path / f"rys_{base['split']}.png", png))
        doc = {"run": str(info.path), "step": run.step, "stack": stack, "layers": layers, "repeats": args.repeats,
               "probe": args.probe,
               "rows": rows, "baseline": baseline, "compiles": compiles, "files": files}
        if not rows:
            raise AnalysisError("nothing to scan")
        scanned = f"duplicating blocks of the {layers} {stack} layer{'s' if layers > 1 else ''}, repeats {args.repeats}"
        if info.circuits:  # a looped run: only its plain stacks have layers to duplicate
            other = "coda" if stack == "prelude" else "prelude"
            scanned += (f" (a looped run: rys duplicates layers of its plain {stack}, not its circuits "
                        f"{', '.join(info.circuits)}, which loop already; --stack {other} scans the other stack, and "
                        f"`loopformer convert` loops a block of a plain model)")
            doc["note"] = scanned
        text = "\n".join([tables.header_line(info, run.step, args.examples), scanned,
                          _table(rows, baseline, info.is_text),
                          f"programs compiled for these {len(rows) + len(baseline)} evaluations: {compiles} "
                          f"(layer schedules are runtime inputs)", "wrote " + ", ".join(files)])
        return doc, text

    return emit(args, body)
