"""``loopformer eval``: loss and accuracy of a trained run at chosen loop counts and ablations."""

from __future__ import annotations

import argparse
from typing import Any

from loopformer.cli.common import command, emit, exit_caps, exit_flags, run_flags
from loopformer.cli.loopspec import parse_exits, parse_loops
from loopformer.errors import PlanError
from loopformer.evaluation import ablate, tables
from loopformer.evaluation.run import load_run
from loopformer.model.plan import MAX_LOOPS
from loopformer.runs.read import read_run


def mode_flag(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--mode", choices=ablate.MODES, default="zero", help=help_text)


def _args(p: argparse.ArgumentParser) -> None:
    run_flags(p)
    p.add_argument("--loops", action="append", metavar="CIRCUIT=N",
                   help=f"loop count of a circuit, e.g. --loops X=16 (repeatable; 1..{MAX_LOOPS}; others: eval_loops)")
    p.add_argument("--ablate", action="append", metavar="CIRCUIT", help="remove a circuit (repeatable)")
    mode_flag(p, "what replaces an ablated circuit's output: zeros, or its mean output over the split")
    exit_flags(p, many=False)


@command("eval", "loss and accuracy of a trained run at chosen loop counts and ablations", _args)
def eval_command(args: argparse.Namespace) -> int:
    def body() -> tuple[dict[str, Any], str]:
        info = read_run(args.run)
        splits = info.select_splits(args.split)
        loops = {c: v[0] for c, v in parse_loops(args.loops, info.circuits, grid=False).items()}
        exits = (parse_exits(args.exit, info.circuits, many=False) or [{}])[0]
        loops = exit_caps(info, exits, args.max_loops, loops)
        ablated = list(dict.fromkeys(args.ablate or []))
        for c in ablated:
            if c not in info.circuits:
                raise PlanError(f"--ablate {c}: unknown circuit; this run's circuits are {', '.join(info.circuits)}")
        run = load_run(info, args.step)
        rows = []
        for split, batches in run.eval_sets(splits, args.examples).items():
            fill = ablate.mean_fill(run, batches) if ablated and args.mode == "mean" else None
            row = run.row(split, batches, loops, ablated, fill, exits)
            if exits:
                row["histogram"] = run.evaluator.examples(run.params, batches, info.full_loops(loops), exits)["histogram"]
            rows.append({**row, "mode": args.mode} if ablated else row)
        doc = {"run": str(info.path), "step": run.step, "rows": rows}
        return doc, tables.header_line(info, run.step, args.examples) + "\n" + tables.eval_table(rows, info)

    return emit(args, body)
