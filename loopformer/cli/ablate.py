"""``loopformer ablate``: remove each circuit alone and keep each alone; loss and accuracy deltas."""

from __future__ import annotations

import argparse
from typing import Any

from loopformer.cli.common import check_writable, command, emit, one_set, run_flags, write_png
from loopformer.cli.eval import mode_flag
from loopformer.errors import AnalysisError
from loopformer.evaluation import ablate, plots, tables
from loopformer.evaluation.run import load_run
from loopformer.runs.read import read_run


def _args(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Settings: baseline, '-X' (circuit X removed), 'only X' (every other circuit removed) and 'none' "
                "(all removed), each evaluated once (with two circuits 'only X' is '-Y'), at the default loop counts.")
    run_flags(p)
    mode_flag(p, "zero: a removed circuit outputs zeros; mean: its mean output over the split's eval set "
                 "(keeps the average offset, removes the per-example information)")


@command("ablate", "remove each circuit alone and keep each alone; loss/accuracy deltas (writes ablation.csv/.png)",
         _args)
def ablate_command(args: argparse.Namespace) -> int:
    def body() -> tuple[dict[str, Any], str]:
        info = read_run(args.run)
        if not info.circuits:
            raise AnalysisError(f"{info.path} has no circuits (model.stages: []): ablate removes looped circuits, so "
                                f"there is nothing to remove (`loopformer convert` makes one; `loopformer rys` scans a "
                                f"plain model's layers)")
        outputs = [info.path / "ablation.csv", info.path / "ablation.png"]
        check_writable(info.path, "ablation.csv and ablation.png", outputs)
        splits = info.select_splits(args.split)
        run = load_run(info, args.step, raw=args.raw_weights)
        rows = ablate.ablate(run, run.eval_sets(splits, args.examples), args.mode)
        png = plots.ablation(rows, info, run.step)  # rendered first: the two files are written one right after the other
        with one_set(info.path, outputs, "ablate"):
            tables.write_csv(info.path / "ablation.csv", rows)
            files = [str(info.path / "ablation.csv"), write_png(info.path / "ablation.png", png)]
        doc = {**run.provenance(), "mode": args.mode, "rows": rows, "files": files}
        return doc, "\n".join([tables.header_line(info, run.step, tables.scored(rows)), tables.ablation_table(rows, info),
                               "wrote " + ", ".join(files)])

    return emit(args, body)
