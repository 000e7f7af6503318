"""``loopformer activity``: per token, each circuit's write norm (on-indicator) and the change in the
token's loss when it is removed; per split, each circuit's on-rate and mean effect."""

from __future__ import annotations

import argparse
from typing import Any

from loopformer.cli.common import check_writable, command, emit, one_set, run_flags, write_png
from loopformer.cli.eval import mode_flag
from loopformer.cli.loopspec import parse_loops
from loopformer.errors import AnalysisError
from loopformer.evaluation import activity, plots, tables
from loopformer.evaluation.run import load_run, real_rows
from loopformer.model.plan import MAX_LOOPS
from loopformer.runs.read import read_run


def _args(p: argparse.ArgumentParser) -> None:
    p.epilog = (f"A circuit is on at a token when its write norm exceeds {100 * activity.ON_FRACTION:g}% of the "
                "split's largest per-circuit median write norm. Δloss is measured at answer tokens (mask 1). "
                "Writes activity.csv and activity.png (the first examples of each split: circuits x tokens).")
    run_flags(p)
    p.add_argument("--loops", action="append", metavar="CIRCUIT=N",
                   help=f"loop count of a circuit (repeatable; 1..{MAX_LOOPS}; others: eval_loops)")
    mode_flag(p, "what replaces a removed circuit's output: zeros, or its mean output over the split")


@command("activity", "per-token circuit activity: write norms (on-indicators) and the loss change when each circuit "
                     "is removed; per split, on-rates and mean effects (writes activity.csv/.png)", _args)
def activity_command(args: argparse.Namespace) -> int:
    def body() -> tuple[dict[str, Any], str]:
        info = read_run(args.run)
        if not info.circuits:
            raise AnalysisError(f"{info.path} has no circuits (model.stages: []): activity measures what each looped "
                                f"circuit does, so there is nothing to measure (`loopformer convert` makes one)")
        outputs = [info.path / "activity.csv", info.path / "activity.png"]
        check_writable(info.path, "activity.csv and activity.png", outputs)
        splits = info.select_splits(args.split)
        loops = {c: v[0] for c, v in parse_loops(args.loops, info.circuits, grid=False).items()}
        run = load_run(info, args.step, raw=args.raw_weights)
        sets = run.eval_sets(splits, args.examples)
        counts = {s: sum(len(real_rows(b)["mask"]) for b in batches) for s, batches in sets.items()}
        rows, thresholds, examples = activity.activity(run, sets, loops, args.mode)
        png = plots.activity(examples, thresholds, info, run.step)  # first: the files are written one after the other
        with one_set(info.path, outputs, "activity"):
            tables.write_csv(info.path / "activity.csv", rows)
            files = [str(info.path / "activity.csv"), write_png(info.path / "activity.png", png)]
        doc = {**run.provenance(), "mode": args.mode, "loops": info.full_loops(loops),
               "examples_per_split": counts, "on_fraction": activity.ON_FRACTION, "on_threshold": thresholds,
               "rows": rows, "examples": examples, "files": files}
        return doc, "\n".join([tables.header_line(info, run.step, tables.scored(counts)),
                               tables.activity_table(rows, thresholds, info, args.mode, loops), "wrote " + ", ".join(files)])

    return emit(args, body)
