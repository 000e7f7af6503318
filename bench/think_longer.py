"""The "think longer" benchmark: does a looped model trained on easy instances solve harder ones
when given more loops, and how does it compare with equal-parameter and equal-compute baselines?

For each task: train (1) a looped model (one circuit, loop count ~ U{2..6}, mean 4), (2) the same
model with loops fixed at 1 (equal parameters), (3) a non-looped model whose circuit has depth 4
= the looped model's mean effective depth (equal training compute), all with the same steps and
batch. Evaluate at the training difficulty and at 2x and 4x harder instances; the looped model at
loop counts 1 .. 8x its training mean.

    python bench/think_longer.py [--quick] [--json] [--tasks pointer_chase,p_hop] [--out DIR]

Prints Markdown tables (and with --json one JSON document on stdout, everything else on stderr):
{"tasks": {NAME: {"train_loops": int, "rows": [{"difficulty", "model", "loops", "accuracy"}]}}}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from loopformer.analysis.evaluate import Evaluator
from loopformer.config import load_config
from loopformer.data.pipeline import eval_batches
from loopformer.train.trainer import make_task_for, restore_params, train

BASE = Path(__file__).resolve().parent.parent / "configs" / "bench" / "think_longer.yaml"
TRAIN_LOOPS = 4  # mean of uniform(2, 6)

# Task settings: (task_args, train difficulty, {"train", "2x", "4x"} difficulties). Each follows a
# published setting scaled to a 2-core CPU (see README, "Think longer").
TASKS = {
    "pointer_chase": ({"num_nodes": 20, "num_symbols": 20, "edge_tokens": True}, [1, 4],
                      {"train": [1, 4], "2x": [8, 8], "4x": [16, 16]}),
    "p_hop": ({"length": 48, "alphabet": 4}, [1, 4], {"train": [1, 4], "2x": [8, 8], "4x": [16, 16]}),
    "addition": ({}, [1, 4], {"train": [1, 4], "2x": [8, 8], "4x": [16, 16]}),
    "prefix_parity": ({}, [1, 8], {"train": [1, 8], "2x": [16, 16], "4x": [32, 32]}),
}

MODELS = {
    "looped": [],
    "equal_params": ["model.stages.0.circuits.X.loops=fixed(1)", "model.stages.0.circuits.X.eval_loops=1",
                     "model.stages.0.circuits.X.backprop=1"],
    "equal_compute": [f"model.stages.0.circuits.X.depth={TRAIN_LOOPS}", "model.stages.0.circuits.X.loops=fixed(1)",
                      "model.stages.0.circuits.X.eval_loops=1", "model.stages.0.circuits.X.backprop=1"],
}


def run_task(name: str, steps: int, out: Path, examples: int) -> dict:
    task_args, train_diff, splits = TASKS[name]
    rows = []
    for model_name, overrides in MODELS.items():
        cfg = load_config(BASE, [
            f"run.dir={out}", f"run.name={name}-{model_name}", f"data.task={name}",
            f"data.task_args={json.dumps(task_args)}", f"data.train_difficulty={train_diff}",
            f"data.eval_splits={json.dumps(splits)}", f"train.steps={steps}", f"data.eval_examples={examples}",
            *overrides])
        t0 = time.time()
        with contextlib.redirect_stdout(sys.stderr):
            train(cfg)
        wall = time.time() - t0
        model, params, step = restore_params(cfg)
        task = make_task_for(cfg)
        evaluator = Evaluator(model)
        counts = sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, 32}) if model_name == "looped" else [1]
        for split, (lo, hi) in splits.items():
            batches = eval_batches(task, split, (lo, hi), examples, 256, cfg.seed)
            for n in counts:
                m = evaluator.evaluate(params, batches, {"X": n})
                rows.append({"difficulty": split, "model": model_name, "loops": n, "accuracy": m["accuracy"],
                             "wall_s": wall, "tokens_seen": step * cfg.data.batch_size * task.seq_len(train_diff[1])})
        print(f"[{name}] {model_name}: trained {steps} steps in {wall:.0f}s", file=sys.stderr)
    return {"train_loops": TRAIN_LOOPS, "rows": rows}


def markdown(name: str, result: dict) -> str:
    rows = result["rows"]
    splits = list(dict.fromkeys(r["difficulty"] for r in rows))
    looped = [r for r in rows if r["model"] == "looped"]
    counts = list(dict.fromkeys(r["loops"] for r in looped))
    acc = {(r["model"], r["difficulty"], r["loops"]): r["accuracy"] for r in rows}
    head = "| model | loops | " + " | ".join(splits) + " |"
    lines = [f"### {name} (trained at mean {result['train_loops']} loops)", "", head,
             "|" + "---|" * (len(splits) + 2)]
    for n in counts:
        mark = " (train mean)" if n == result["train_loops"] else ""
        lines.append(f"| looped | {n}{mark} | " + " | ".join(f"{100 * acc[('looped', s, n)]:.1f}" for s in splits) + " |")
    for m in ("equal_params", "equal_compute"):
        lines.append(f"| {m} | 1 | " + " | ".join(f"{100 * acc[(m, s, 1)]:.1f}" for s in splits) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small budgets (300 steps, 128 eval examples)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS))
    p.add_argument("--out", default="bench_runs/think_longer", help="run directories and results")
    args = p.parse_args()
    steps, examples = (300, 128) if args.quick else (1500, 256)
    out = Path(args.out)
    results = {}
    t0 = time.time()
    for name in args.tasks.split(","):
        if name not in TASKS:
            p.error(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
        results[name] = run_task(name, steps, out, examples)
    doc = {"tasks": results, "steps": steps, "wall_s": time.time() - t0}
    out.mkdir(parents=True, exist_ok=True)
    (out / "think_longer.json").write_text(json.dumps(doc, indent=1))
    text = "\n\n".join(markdown(n, r) for n, r in results.items())
    (out / "think_longer.md").write_text(text + "\n")
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(doc))
    else:
        print(text)
        print(f"\nwall time {doc['wall_s']:.0f}s; results in {out}/think_longer.{{md,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
