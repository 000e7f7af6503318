"""``loopformer eval``: loss and accuracy of a trained run at chosen loop counts and ablations."""

from __future__ import annotations

import argparse
from typing import Any

from loopformer.cli.common import (
    check_probe,
    command,
    compact_choice,
    compact_note,
    emit,
    exit_caps,
    exit_flags,
    probe_flag,
    probe_sets,
    run_flags,
)
from loopformer.cli.loopspec import circuits_phrase, parse_exits, parse_loops, split_auto
from loopformer.config import ModelConfig
from loopformer.errors import PlanError
from loopformer.evaluation import ablate, tables
from loopformer.evaluation.run import load_run
from loopformer.model.plan import MAX_LOOPS, difficulty_rules
from loopformer.runs.log import log, progress
from loopformer.runs.read import read_run


def mode_flag(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--mode", choices=ablate.MODES, default="zero", help=help_text)


def _args(p: argparse.ArgumentParser) -> None:
    run_flags(p)
    p.add_argument("--loops", action="append", metavar="CIRCUIT=N",
                   help=f"loop count of a circuit, e.g. --loops X=16 (repeatable; 1..{MAX_LOOPS}; others: eval_loops); "
                        f"X=auto gives each example the count of X's training rule loops: per_difficulty(a, b)")
    p.add_argument("--ablate", action="append", metavar="CIRCUIT", help="remove a circuit (repeatable)")
    mode_flag(p, "what replaces an ablated circuit's output: zeros, or its mean output over the split")
    exit_flags(p, many=False)
    probe_flag(p)


def auto_rules(model: ModelConfig, auto: list[str], loops: dict[str, int]) -> dict[str, tuple[float, float, int]]:
    """The per-difficulty rules of the circuits given as ``--loops X=auto`` (PlanError for a circuit given a
    count too, or trained without such a rule)."""
    rules = difficulty_rules(model, auto)
    for c in auto:
        if c in loops or auto.count(c) > 1:
            raise PlanError(f"--loops {c}: circuit '{c}' is given twice; pass one --loops per circuit")
        if c not in rules:
            raise PlanError(f"--loops {c}=auto: circuit {c} was trained with loops {model.circuit(c).loops}, not a rule "
                            f"per difficulty (loops: per_difficulty(a, b)); give a count, e.g. --loops {c}=16")
    return rules


@command("eval", "loss and accuracy of a trained run at chosen loop counts and ablations", _args)
def eval_command(args: argparse.Namespace) -> int:
    def body() -> tuple[dict[str, Any], str]:
        info = read_run(args.run)
        check_probe(args, info)
        splits = [] if args.probe else info.select_splits(args.split)
        specs, auto = split_auto(args.loops, info.circuits)
        loops = {c: v[0] for c, v in parse_loops(specs, info.circuits, grid=False).items()}
        rules = auto_rules(info.cfg.model, auto, loops)
        exits = (parse_exits(args.exit, info.circuits, many=False, max_loops=args.max_loops, heads=info.heads,
                             routed=info.routed) or [{}])[0]
        both = [c for c in rules if c in exits]
        if both:
            raise PlanError(f"--loops {both[0]}=auto and --exit for {both[0]}: an exit rule sets its own counts; "
                            f"drop one")
        loops = exit_caps(info, exits, args.max_loops, loops)
        stopping = [*exits, *rules]  # circuits whose tokens may stop early (a one-circuit router's too)
        compact = compact_choice(args, info, stopping, routed=True)
        ablated = list(args.ablate or [])
        if args.mode != "zero" and not ablated:
            raise PlanError(f"--mode {args.mode} sets what replaces an ablated circuit's output, and no --ablate is "
                            f"given; add --ablate CIRCUIT, or drop --mode")
        for c in ablated:
            if c not in info.circuits:
                parts = [x.strip() for x in c.split(",")]
                several = len(parts) > 1 and all(x in info.circuits for x in parts)  # --ablate X,Y: one flag each
                hint = f"; to remove several, give --ablate once each: {' '.join(f'--ablate {x}' for x in parts)}"
                raise PlanError(f"--ablate {c}: unknown circuit; {circuits_phrase(info.circuits, c)}"
                                + (hint if several else ""))
            if ablated.count(c) > 1:
                raise PlanError(f"--ablate {c} is given twice; pass each circuit once")
            if c in exits or c in rules:
                how = f"--exit {c}=..." if c in exits else f"--loops {c}=auto"
                raise PlanError(f"--ablate {c} removes circuit {c}, so {how} (how long it runs) means nothing; drop one")
        run = load_run(info, args.step, raw=args.raw_weights)
        rows = []
        sets = probe_sets(args, run) or run.eval_sets(splits, args.examples)
        for split, batches in progress(sets.items(), "eval", total=len(sets)):
            fill = ablate.mean_fill(run, batches) if ablated and args.mode == "mean" else None
            row = run.row(split, batches, loops, ablated, fill, exits, by_difficulty=rules, histogram=bool(exits),
                          compact=compact)
            rows.append({**row, "mode": args.mode} if ablated else row)
            if exits:  # an exit sweep of one setting can take minutes: say where it is
                log(f"eval {split}: {tables.score(row)} at {tables.mean_loops_str(row)} loops per token")
        doc = {**run.provenance(), "rows": rows} | ({"probe": args.probe} if args.probe else {})
        doc |= compact_note(args, info, stopping, routed=True)
        head = tables.header_line(info, run.step, tables.scored(rows), args.probe)
        return doc, head + "\n" + tables.eval_table(rows, info)

    return emit(args, body)
