"""The analysis subcommands: ``loopformer eval | ablate | sweep | generate --run runs/<name>``.

Each prints a readable table, or with ``--json`` exactly one JSON document on stdout (progress
goes to stderr). Flags are checked against the run's config.yaml before the checkpoint is restored.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from loopformer.analysis import ablate as ablate_mod
from loopformer.analysis import plots, tables
from loopformer.analysis import sweep as sweep_mod
from loopformer.analysis.loopspec import LoopSpecError, parse_loops
from loopformer.analysis.run import AnalysisError, LoadedRun, RunInfo, load_run, log, read_run, real_rows
from loopformer.cli import command

DEFAULT_EXAMPLES = 2500
EXAMPLES_HELP = (f"examples per split (default {DEFAULT_EXAMPLES}: the standard error of an accuracy p is "
                 f"sqrt(p(1-p)/N) <= 0.5/sqrt(N) = 1 point at N=2500, so ±1%% at one sigma for any accuracy; "
                 f"comparisons of settings on the same examples are tighter; use 10000 for a ±1%% 95%% interval)")
MAX_GENERATE_SETTINGS = 16


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _common(p: argparse.ArgumentParser, *, examples: bool = True) -> None:
    p.add_argument("--run", required=True, help="run directory made by `loopformer train`, e.g. runs/quickstart")
    p.add_argument("--step", type=_positive, help="checkpoint step to load (default: the latest)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout instead of tables")
    if examples:
        p.add_argument("--split", action="append", metavar="NAME",
                       help="eval split of the run (data.eval_splits; repeatable; default: all)")
        p.add_argument("--examples", type=_positive, default=DEFAULT_EXAMPLES, metavar="N", help=EXAMPLES_HELP)


def _mode_arg(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--mode", choices=ablate_mod.MODES, default="zero", help=help_text)


def _strict(value: Any) -> Any:
    """``value`` with NaN / inf floats (a diverging loop) replaced by None: strict JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def _run_command(args: argparse.Namespace, body: Callable[[], tuple[dict[str, Any], str]]) -> int:
    """Run ``body`` -> (JSON document, text); print one of them. In --json mode anything written to
    stdout on the way is sent to stderr, so stdout holds exactly the document."""
    out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr if args.json else out):
        doc, text = body()
    print(json.dumps(_strict(doc), allow_nan=False) if args.json else text, file=out, flush=True)
    return 0


def _open(args: argparse.Namespace) -> tuple[RunInfo, list[str]]:
    info = read_run(args.run)
    return info, info.select_splits(args.split)


def _header(run: LoadedRun, examples: int) -> str:
    return tables.header_line(run.info, run.step, examples)


def _write_png(path: Path, png: bytes) -> str:
    path.write_bytes(png)
    log(f"wrote {path}")
    return str(path)


# ----------------------------------------------------------------------------- eval


def _eval_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--loops", action="append", metavar="CIRCUIT=N",
                   help="loop count of a circuit, e.g. --loops X=16 (repeatable; any 1..1000; others: eval_loops)")
    p.add_argument("--ablate", action="append", metavar="CIRCUIT", help="remove a circuit (repeatable)")
    _mode_arg(p, "what replaces an ablated circuit's output: zeros, or its mean output over the split")


@command("eval", "loss and accuracy of a trained run at chosen loop counts and ablations", _eval_args)
def eval_command(args: argparse.Namespace) -> int:
    def body() -> tuple[dict[str, Any], str]:
        info, splits = _open(args)
        loops = {c: v[0] for c, v in parse_loops(args.loops, info.circuits, grid=False).items()}
        ablated = list(dict.fromkeys(args.ablate or []))
        for c in ablated:
            if c not in info.circuits:
                raise LoopSpecError(f"--ablate {c}: unknown circuit; this run's circuits are {', '.join(info.circuits)}")
        run = load_run(info, args.step)
        rows = []
        for split, batches in run.eval_sets(splits, args.examples).items():
            fill = ablate_mod.mean_fill(run, batches) if ablated and args.mode == "mean" else None
            row = run.row(split, batches, loops, ablated, fill)
            rows.append({**row, "mode": args.mode} if ablated else row)
        doc = {"run": str(info.path), "step": run.step, "rows": rows}
        return doc, _header(run, args.examples) + "\n" + tables.eval_table(rows, info)

    return _run_command(args, body)


# ----------------------------------------------------------------------------- ablate


def _ablate_args(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Settings: baseline, '-X' (circuit X removed), 'only X' (every other circuit removed) and 'none' "
                "(all removed), each evaluated once (with two circuits 'only X' is '-Y'), at the default loop counts.")
    _common(p)
    _mode_arg(p, "zero: a removed circuit outputs zeros; mean: its mean output over the split's eval set "
                 "(keeps the average offset, removes the per-example information)")


@command("ablate", "remove each circuit alone and keep each alone; loss/accuracy deltas (writes ablation.csv/.png)",
         _ablate_args)
def ablate_command(args: argparse.Namespace) -> int:
    def body() -> tuple[dict[str, Any], str]:
        info, splits = _open(args)
        run = load_run(info, args.step)
        rows = ablate_mod.ablate(run, run.eval_sets(splits, args.examples), args.mode)
        tables.write_csv(info.path / "ablation.csv", rows)
        png = plots.ablation(rows, info, run.step)
        files = [str(info.path / "ablation.csv"), _write_png(info.path / "ablation.png", png)]
        doc = {"run": str(info.path), "step": run.step, "mode": args.mode, "rows": rows, "files": files}
        return doc, "\n".join([_header(run, args.examples), tables.ablation_table(rows, info),
                               "wrote " + ", ".join(files)])

    return _run_command(args, body)


# ----------------------------------------------------------------------------- sweep


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Also traces each swept circuit's state, iteration by iteration up to the largest count swept, on "
                "the first batch of each split: the relative change ||h_i - h_(i-1)|| / ||h|| and the state norm "
                "(sweep_convergence.png, log y). Readings: fixed-point (the change falls below 0.1%%), settling "
                "(the step keeps shrinking), drifting (the norm keeps growing), moving (steady steps at a steady "
                "norm: oscillation or chaos, the 'overthinking' regime). All settings run on one compiled program.")
    _common(p)
    p.add_argument("--loops", action="append", metavar="CIRCUIT=SPEC", required=True,
                   help="counts to sweep for one or two circuits: A:B (1:64 -> 1,2,3,4,6,8,12,16,24,32,48,64), "
                        "A:B:STEP (linear) or N1,N2,...; unswept circuits stay at eval_loops")


def _log_tensorboard(run: LoadedRun, rows: list[dict[str, Any]], grid: dict[str, list[int]],
                     pngs: dict[str, bytes]) -> Path:
    """Write the sweep as its own tensorboard run, ``<run>/sweeps/<circuits>/tb`` (replacing the
    previous sweep of those circuits, so repeated sweeps never pile up points): scalars
    ``sweep/<split>/{accuracy,loss}`` at step = loop count of the first circuit (two circuits: one
    curve per count n of the second, ``.../accuracy/<b>=<n>``), and the plots at the checkpoint's step.
    Kept apart from ``<run>/tb`` because its steps are loop counts, not training steps."""
    from loopformer.train.metrics import MetricsWriter

    names = list(grid)
    out = run.info.path / "sweeps" / "_".join(names)
    shutil.rmtree(out, ignore_errors=True)
    by_step: dict[int, dict[str, float]] = {}
    for r in rows:
        suffix = "" if len(names) == 1 else f"/{names[1]}={r['loops'][names[1]]}"
        for k in ("accuracy", "loss"):
            by_step.setdefault(r["loops"][names[0]], {})[f"sweep/{r['split']}/{k}{suffix}"] = r[k]
    with MetricsWriter(out) as writer:
        for n in sorted(by_step):
            writer.scalars(n, by_step[n])
        for name, png in pngs.items():
            writer.image(run.step, f"sweep/{name}", png)
    log(f"logged the sweep to {out} (tensorboard --logdir {run.info.path})")
    return out


@command("sweep", "accuracy/loss over loop counts of one or two circuits, and loop convergence "
                  "(writes sweep.csv, sweep_*.png, and tensorboard under sweeps/)", _sweep_args)
def sweep_command(args: argparse.Namespace) -> int:
    def body() -> tuple[dict[str, Any], str]:
        info, splits = _open(args)
        grid = parse_loops(args.loops, info.circuits, grid=True)
        if len(grid) > 2:
            raise LoopSpecError(f"sweep takes one or two circuits (got {', '.join(grid)}); fix the others at "
                                f"their eval_loops or evaluate single settings with `loopformer eval`")
        run = load_run(info, args.step)
        eval_sets = run.eval_sets(splits, args.examples)
        before = run.evaluator.compiles
        rows = sweep_mod.sweep(run, eval_sets, grid)
        compiles = run.evaluator.compiles - before  # one per batch shape (0 if this process has it already)
        conv = sweep_mod.convergence(run, eval_sets, {c: max(v) for c, v in grid.items()})
        summary = sweep_mod.summarize_convergence(conv, info.defaults)
        name = "_".join(grid)
        pngs = {name: plots.sweep_1d(rows, name, info, run.step) if len(grid) == 1 else
                plots.sweep_2d(rows, grid, info, run.step), "convergence": plots.convergence(conv, info, run.step)}
        tables.write_csv(info.path / "sweep.csv", rows)
        files = [str(info.path / "sweep.csv")] + [_write_png(info.path / f"sweep_{k}.png", v) for k, v in pngs.items()]
        tb_dir = _log_tensorboard(run, rows, grid, pngs)
        doc = {"run": str(info.path), "step": run.step, "grid": grid, "rows": rows, "convergence": conv,
               "convergence_summary": summary, "compiles": compiles, "files": files, "tensorboard": str(tb_dir)}
        text = "\n".join([_header(run, args.examples), tables.sweep_table(rows, grid, info), "",
                          tables.convergence_table(summary),
                          f"programs compiled for these {len(rows)} evaluations: {compiles} "
                          f"(loop counts are runtime inputs: one program per batch shape)",
                          "wrote " + ", ".join(files)])
        return doc, text

    return _run_command(args, body)


# ----------------------------------------------------------------------------- generate


def _generate_args(p: argparse.ArgumentParser) -> None:
    _common(p, examples=False)
    p.add_argument("--loops", action="append", metavar="CIRCUIT=SPEC",
                   help="loop counts, e.g. X=32; a list or range (X=2,6,32) answers at each count, side by side")
    p.add_argument("--example-split", metavar="NAME",
                   help="synthetic tasks: answer examples of this eval split (default: the first split)")
    p.add_argument("--count", type=_positive, default=4, metavar="K", help="examples to show (default 4)")
    p.add_argument("--prompt", metavar="TEXT", help="text runs: continue this prompt")
    p.add_argument("--max-new-tokens", type=_positive, default=64, metavar="N", help="--prompt: tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="--prompt: 0 = greedy (default), > 0 samples")
    p.add_argument("--seed", type=int, default=0, help="--prompt: sampling seed")


def _format_examples(examples: list[dict[str, Any]]) -> str:
    lines = []
    for ex in examples:
        lines.append(f"#{ex['index']}  " + ex["prompt"].replace("\n", "\n" + " " * (len(str(ex["index"])) + 3)))
        truth = ex["answer"]
        rows = [["true answer", truth["text"], " ".join(map(str, truth["tokens"])), ""]]
        rows += [[tables.loops_str(p["loops"]), p["text"], " ".join(map(str, p["tokens"])), "✓" if p["correct"] else "✗"]
                 for p in ex["predictions"]]
        lines += ["    " + line for line in tables.format_table(["loops", "answer", "token ids", ""], rows).splitlines()]
    return "\n".join(lines)


@command("generate", "show a run's answers at chosen loop counts (synthetic examples, or --prompt for text runs)",
         _generate_args)
def generate_command(args: argparse.Namespace) -> int:
    def body() -> tuple[dict[str, Any], str]:
        info = read_run(args.run)
        points = sweep_mod.grid_points(parse_loops(args.loops, info.circuits, grid=True))
        if len(points) > MAX_GENERATE_SETTINGS:
            raise LoopSpecError(f"--loops asks for {len(points)} settings; generate shows at most "
                                f"{MAX_GENERATE_SETTINGS} side by side (use `loopformer sweep` for more)")
        if args.prompt is not None and args.example_split is not None:
            raise AnalysisError("give either --prompt TEXT or --example-split NAME, not both")
        if args.temperature < 0:
            raise AnalysisError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
        if info.data.task is None:
            if args.prompt is None:
                raise AnalysisError(f"{info.path} trains on text: give --prompt TEXT to continue "
                                    f"(--example-split is for synthetic tasks)")
            return _generate_text(args, load_run(info, args.step), points)
        if args.prompt is not None:
            raise AnalysisError(f"--prompt needs a text run, but {info.path} trains on the synthetic task "
                                f"'{info.cfg.data.task}' (no tokenizer); use --example-split NAME to see its "
                                f"examples answered (splits: {', '.join(info.splits)})")
        split = info.select_splits([args.example_split or next(iter(info.splits))])[0]
        return _answer_examples(args, load_run(info, args.step), points, split)

    return _run_command(args, body)


def _generate_text(args: argparse.Namespace, run: LoadedRun, points: list[dict[str, int]]) -> tuple[dict, str]:
    from loopformer.generate import generate_text, make_logits_fn, tokenizer_of

    tokenizer, logits_fn = tokenizer_of(run.info.data), make_logits_fn(run.model)
    if tokenizer is None:
        raise AnalysisError(f"{run.info.path}: its data source has no tokenizer to encode --prompt")
    outs = []
    for p in points:
        text = generate_text(run.model, run.params, tokenizer, args.prompt, p, args.max_new_tokens,
                             args.temperature, args.seed, logits_fn)
        outs.append({"loops": run.info.full_loops(p), "text": text})
    doc = {"run": str(run.info.path), "step": run.step, "prompt": args.prompt, "temperature": args.temperature,
           "generations": outs}
    return doc, "\n".join(f"[{tables.loops_str(o['loops'])}] {args.prompt}{o['text']}" for o in outs)


def _answer_examples(args: argparse.Namespace, run: LoadedRun, points: list[dict[str, int]],
                     split: str) -> tuple[dict, str]:
    from loopformer.generate import answer_examples, loop_vector, make_logits_fn

    info, task = run.info, run.task
    assert task is not None
    parts = [real_rows(b) for b in run.eval_sets([split], args.count)[split]]
    batch = {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
    settings = [(info.full_loops(p), loop_vector(run.model, p)) for p in points]
    examples = answer_examples(make_logits_fn(run.model), run.params, task, batch, settings)
    for ex in examples:
        ex["split"] = split
    doc = {"run": str(info.path), "step": run.step, "split": split, "decoding": "autoregressive greedy",
           "examples": examples}
    head = (f"{info.path} @ step {run.step} · task {info.cfg.data.task} · split {tables.split_label(info, split)} · "
            f"answers decoded greedily, token by token from the prompt (not teacher-forced)")
    return doc, head + "\n" + _format_examples(examples)
