"""``loopformer sweep``: accuracy and loss over loop counts of one or two circuits, and loop convergence."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

from loopformer.cli.common import (
    check_writable,
    command,
    compact_choice,
    compact_note,
    emit,
    exit_caps,
    exit_flags,
    one_set,
    run_flags,
    write_png,
)
from loopformer.cli.loopspec import parse_exits, parse_loops
from loopformer.errors import AnalysisError, PlanError
from loopformer.evaluation import plots, sweep, tables
from loopformer.evaluation.run import LoadedRun, load_run
from loopformer.runs.layout import dead_siblings, through_link
from loopformer.runs.log import log, progress
from loopformer.runs.read import read_run
from loopformer.runs.scalars import MetricsWriter

TB_WRITTEN = re.compile(r"metrics\.jsonl|tb")  # what a sweep's tensorboard run holds (`_log_tensorboard`)
MAX_SETTINGS = 4096  # grid points per split (64 x 64): more would run for hours, and 10,000 x 10,000 filled memory


def _args(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Also traces each swept circuit's state, iteration by iteration up to the largest count swept, on "
                "the first batch of each split: the relative change ||h_i - h_(i-1)|| / ||h|| and the state norm "
                "(sweep_convergence.png, log y). Readings: fixed-point (the change falls below 0.1%), settling "
                "(the step keeps shrinking), drifting (the norm keeps growing), moving (steady steps at a steady "
                "norm: oscillation or chaos, the 'overthinking' regime). All settings share one compiled program per batch "
                "shape (each split length compiles its own).")
    run_flags(p)
    p.add_argument("--loops", action="append", metavar="CIRCUIT=SPEC",
                   help="counts to sweep for one or two circuits: A:B (1:64 -> 1,2,3,4,6,8,12,16,24,32,48,64), "
                        "A:B:STEP (linear) or N1,N2,...; unswept circuits stay at eval_loops. With --exit: one "
                        "count per circuit (the caps)")
    exit_flags(p, many=True)


def _log_tensorboard(run: LoadedRun, rows: list[dict[str, Any]], grid: dict[str, list[int]],
                     pngs: dict[str, bytes]) -> Path:
    """Write the sweep as its own tensorboard run, ``<run>/sweeps/<circuits>/tb`` (replacing the
    previous sweep of those circuits, so repeated sweeps never pile up points): scalars
    ``sweep/<split>/{accuracy,loss}`` at step = loop count of the first circuit (two circuits: one
    curve per count n of the second, ``.../accuracy/<b>=<n>``), and the plots at the checkpoint's step.
    Kept apart from ``<run>/tb`` because its steps are loop counts, not training steps. Written whole into a
    temporary sibling renamed into place (in place, a disk that filled was a traceback from tensorboard's writer
    after the earlier sweep's run was deleted, #27 pass 26): AnalysisError naming it, the earlier run kept."""
    names = list(grid)
    out = run.info.path / "sweeps" / "_".join(names)
    out = through_link(out)  # a link to a shared disk: renamed onto, it became a folder and its set-aside link stayed
    tmp, old = (out.with_name(f".{out.name}.{kind}-{os.getpid()}") for kind in ("tmp", "old"))
    for leftover in dead_siblings(out, ("old",), TB_WRITTEN):  # a sweep killed between its two renames below
        if out.exists():
            shutil.rmtree(leftover, ignore_errors=True)
        else:  # the earlier run, set aside: put it back
            leftover.rename(out)
    for leftover in dead_siblings(out, ("tmp",), TB_WRITTEN):  # of a sweep killed with kill -9 while it wrote
        shutil.rmtree(leftover, ignore_errors=True)
    by_step: dict[int, dict[str, float]] = {}
    for r in rows:
        suffix = "" if len(names) == 1 else f"/{names[1]}={r['loops'][names[1]]}"
        for k in ("accuracy", "loss"):
            by_step.setdefault(r["loops"][names[0]], {})[f"sweep/{r['split']}/{k}{suffix}"] = r[k]
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        with MetricsWriter(tmp) as writer:
            for n in sorted(by_step):
                writer.scalars(n, by_step[n])
            for name, png in pngs.items():
                writer.image(run.step, f"sweep/{name}", png)
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():  # set aside, not deleted: at every instant one whole run (the earlier or the new) has a name
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        if old.exists() and not out.exists():
            with contextlib.suppress(OSError):
                old.rename(out)
        raise AnalysisError(f"cannot write {out} ({e.strerror or e}): make it and its folder writable (or free disk "
                            f"space) and run the command again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"logged the sweep to {out} (tensorboard --logdir {run.info.path})")
    return out


@command("sweep", "accuracy/loss over loop counts of one or two circuits, and loop convergence "
                  "(writes sweep.csv, sweep_*.png, and tensorboard under sweeps/)", _args)
def sweep_command(args: argparse.Namespace) -> int:
    def body() -> tuple[dict[str, Any], str]:
        info = read_run(args.run)
        check_writable(info.path, "sweep_exits.csv" if args.exit else "sweep.csv, sweep_*.png and sweeps/",
                       [info.path / "sweep_exits.csv"] if args.exit else [info.path / "sweep.csv", *_plots(info),
                                                                           *_tensorboard_folders(info)])
        splits = info.select_splits(args.split)
        if args.exit:
            return _sweep_exits(args, info, splits)
        parse_exits(None, info.circuits, many=True, max_loops=args.max_loops, routed=info.routed)  # --max-loops needs --exit
        if args.compact != "auto" and compact_note(args, info, [], routed=True):
            # a routed stage's or an ACT circuit's tokens stop early in a loop sweep too, which runs them as eval does
            # by default: "none can: add --exit" was said of them, and --exit is refused on a routed stage (#27 pass 38)
            raise PlanError(f"--compact {args.compact}: a sweep over loop counts runs the tokens that stop early as "
                            f"`loopformer eval` does by default (by batch size), and takes --compact only with --exit; "
                            f"drop --compact (or evaluate one count with `loopformer eval --compact {args.compact}`)")
        compact_choice(args, info, [], how="--exit", halting=False)  # --compact too (not passed on here)
        if not args.loops:
            raise PlanError("sweep needs --loops CIRCUIT=A:B (loop counts) or --exit RULE (exit thresholds)")
        grid = parse_loops(args.loops, info.circuits, grid=True)
        if len(grid) > 2:
            raise PlanError(f"sweep takes one or two circuits (got {', '.join(grid)}); fix the others at "
                            f"their eval_loops or evaluate single settings with `loopformer eval`")
        settings = math.prod(len(v) for v in grid.values())
        if settings > MAX_SETTINGS:
            raise PlanError(f"--loops {' --loops '.join(args.loops)}: {settings:,} settings per split, and a sweep "
                            f"evaluates at most {MAX_SETTINGS:,} (e.g. 64 x 64 counts); give fewer counts, e.g. "
                            f"{next(iter(grid))}=A:B (a grid of about two counts per doubling)")
        run = load_run(info, args.step, raw=args.raw_weights)
        eval_sets = run.eval_sets(splits, args.examples)
        before = run.evaluator.compiles
        rows = sweep.sweep(run, eval_sets, grid)
        compiles = run.evaluator.compiles - before  # one per batch shape (0 if this process has it already)
        conv = sweep.convergence(run, eval_sets, {c: max(v) for c, v in grid.items()})
        summary = sweep.summarize_convergence(conv, info.defaults)
        name = "_".join(grid)
        pngs = {name: plots.sweep_1d(rows, name, info, run.step) if len(grid) == 1 else
                plots.sweep_2d(rows, grid, info, run.step)}
        if any(conv.values()):  # circuits in a routed stage keep no per-iteration trace: nothing to plot
            pngs["convergence"] = plots.convergence(conv, info, run.step)
        with one_set(info.path, [info.path / "sweep.csv", *_plots(info)], "sweep"):
            tables.write_csv(info.path / "sweep.csv", rows)
            files = [str(info.path / "sweep.csv")] + [write_png(info.path / f"sweep_{k}.png", v) for k, v in pngs.items()]
            _remove_stale_plots(info, set(pngs))
            tb_dir = _log_tensorboard(run, rows, grid, pngs)  # in the set: a failure puts the earlier files back
        doc = {**run.provenance(), "grid": grid, "rows": rows, "convergence": conv,
               "convergence_summary": summary, "compiles": compiles, "files": files, "tensorboard": str(tb_dir)
               } | compact_note(args, info, [])
        text = "\n".join([tables.header_line(info, run.step, tables.scored(rows)), tables.sweep_table(rows, grid, info), "",
                          tables.convergence_table(summary) if any(conv.values()) else
                          "convergence: none traced (the circuits of a routed stage keep no per-iteration trace)",
                          f"programs compiled for these {len(rows)} evaluations: {compiles} "
                          f"(loop counts are runtime inputs: one program per batch shape)",
                          "wrote " + ", ".join(files)])
        return doc, text

    return emit(args, body)


def _plot_names(info: Any) -> set[str]:
    """The names of every plot a sweep of this run may write (sweep_<name>.png): one circuit, two, convergence."""
    return ({"convergence"} | {a for a in info.circuits}
            | {f"{a}_{b}" for a in info.circuits for b in info.circuits if a != b})


def _tensorboard_folders(info: Any) -> list[Path]:
    """sweeps/ and the folders under it, which a sweep replaces (`_log_tensorboard`): one read-only was found after the
    new CSV and plots were written, beside the earlier sweep's tensorboard run."""
    tb = info.path / "sweeps"
    return [tb, *sorted(p for p in tb.rglob("*") if p.is_dir())] if tb.is_dir() else []


def _plots(info: Any) -> list[Path]:
    return [info.path / f"sweep_{name}.png" for name in sorted(_plot_names(info))]


def _remove_stale_plots(info: Any, written: set[str]) -> None:
    """Remove the plots an earlier sweep over other circuits left (sweep_X_Y.png beside a new sweep_X.png):
    they would sit beside a sweep.csv that no longer holds their numbers."""
    for name in sorted(_plot_names(info) - written):
        stale = info.path / f"sweep_{name}.png"
        if stale.is_file():
            stale.unlink()
            log(f"removed {stale} (an earlier sweep's; sweep.csv now holds {' x '.join(sorted(written - {'convergence'}))})")


def _sweep_exits(args: argparse.Namespace, info: Any, splits: list[str]) -> tuple[dict[str, Any], str]:
    """A row per split and exit threshold, at the caps (--max-loops, --loops, or each circuit's max_loops)."""
    settings = parse_exits(args.exit, info.circuits, many=True, max_loops=args.max_loops, heads=info.heads,
                           routed=info.routed)
    loops = {c: v[0] for c, v in parse_loops(args.loops, info.circuits, grid=False, single=(
        "with --exit, --loops gives each circuit one count, its cap; a range of counts is a sweep without --exit")).items()}
    compact = compact_choice(args, info, [c for s in settings for c in s])
    for exits in settings:  # each setting's caps checked before the run is loaded
        exit_caps(info, exits, args.max_loops, loops)
    run = load_run(info, args.step, raw=args.raw_weights)
    eval_sets = run.eval_sets(splits, args.examples)
    before = run.evaluator.compiles
    rows = []
    for split, batches in eval_sets.items():
        for exits in progress(settings, f"sweep {split}"):
            caps = exit_caps(info, exits, args.max_loops, loops)
            row = run.row(split, batches, caps, exits=exits, histogram=True, compact=compact)
            rows.append(row)
        log(f"sweep {split}: {len(settings)} exit settings")
    compiles = run.evaluator.compiles - before
    tables.write_csv(info.path / "sweep_exits.csv", [{k: v for k, v in r.items() if k != "histogram"} for r in rows])
    doc = {**run.provenance(), "rows": rows, "compiles": compiles,
           "files": [str(info.path / "sweep_exits.csv")]} | compact_note(args, info, [c for s in settings for c in s])
    text = "\n".join([tables.header_line(info, run.step, tables.scored(rows)), tables.exit_table(rows, info),
                      f"programs compiled: {compiles} (thresholds are runtime inputs)",
                      f"wrote {info.path / 'sweep_exits.csv'}"])
    return doc, text
