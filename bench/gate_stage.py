"""Ouro's stage II against more stage I, on the same stage-I model and the same extra steps (#25).

Setting, declared before its first run:
- Model and data: ``configs/adaptive/<task>_halting.yaml`` (think_longer's looped model with an Ouro
  halting head; prefix_parity and maze3), seeds 0..S-1 (``--seeds``), trained with stage I (the Ouro loss,
  every parameter) for the config's 1,500 steps.
- From that checkpoint, two continuations of ``--extra`` (500) steps each, with the same learning-rate
  schedule (train.steps raised to 2,000): "stage I" keeps the same objective; "stage II" trains only the
  halting head on the per-step loss improvement (train.stage=gate, halting.gate_k 50, gate_gamma 0.005,
  Ouro's values).
- Evaluation: held-out "val" and "test" sets (different examples, same generator) at the training
  difficulties and at 2x; the learned exit at q in QUANTILES with a cap of 8x the training mean (96), and
  each model's fixed count at the training mean (12). Per-token mean loops (every real token counted).
- Selection: per (seed, model, difficulty) the q with the fewest val mean loops among those within 1 point
  of that model's best val accuracy over q; reported on test.

    python bench/gate_stage.py [--tasks prefix_parity,maze3] [--seeds 1] [--extra 500] [--json] [--out DIR]

JSON: {"tasks": {T: {"rows": [{"seed", "model", "policy", "difficulty", "split", "accuracy", "mean_loops"}],
"selected": [{"seed", "model", "difficulty", "q", "val_accuracy", "test_accuracy", "test_mean_loops"}]}}}.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from pathlib import Path

from loopformer.config import load_config
from loopformer.data.pipeline import eval_batches
from loopformer.data.sources import build_data
from loopformer.evaluation.evaluator import evaluator_for
from loopformer.evaluation.tables import format_table
from loopformer.runs.layout import RunDir
from loopformer.runs.restore import restore_params
from loopformer.train.trainer import train
from loopformer.variants.exits import exit_rule

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASKS = {"prefix_parity": "parity", "maze3": "maze3"}  # -> configs/adaptive/<name>_halting.yaml
QUANTILES = (0.3, 0.5, 0.7, 0.9)
CAP, FIXED = 96, 12
SPLITS = ("val", "test")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _train(cfg) -> float:  # noqa: ANN001
    t0 = time.time()
    with contextlib.redirect_stdout(sys.stderr):
        train(cfg)
    return time.time() - t0


def configs(task: str, seed: int, out: Path, extra: int, examples: int) -> tuple[object, dict[str, object]]:
    """Stage I's config and the two continuations': (base, {"stage I": cfg, "stage II": cfg})."""
    path = ROOT / "configs" / "adaptive" / f"{TASKS[task]}_halting.yaml"
    common = [f"run.dir={out}", f"seed={seed}", "train.eval_every=0", f"data.eval_examples={examples}",
              "eval.sweep_loops=[]"]
    base = load_config(path, [*common, f"run.name={task}-s{seed}-stage1"])
    total = base.train.steps + extra
    cfgs = {}
    for model, over in (("stage I", []), ("stage II", ["train.stage=gate"])):
        name = f"{task}-s{seed}-{'stage1-more' if model == 'stage I' else 'stage2'}"
        cfgs[model] = load_config(path, [*common, f"run.name={name}", f"train.steps={total}",
                                         f"train.checkpoint_every={total}", *over])
    return base, cfgs


def runs(task: str, seed: int, out: Path, extra: int, examples: int) -> dict[str, object]:
    """Stage I for the config's steps, then the two continuations: {"stage I": cfg, "stage II": cfg}."""
    base, cfgs = configs(task, seed, out, extra, examples)
    # trained on when short of its steps: a stage I stopped part way was copied into both continuations as it was
    if (RunDir(base.run_dir).trained_to() or 0) < base.train.steps:  # (#27 pass 30)
        log(f"[{task} seed {seed}] stage I, {base.train.steps} steps: {_train(base):.0f}s")
    for model, cfg in cfgs.items():
        if not cfg.run_dir.exists():
            shutil.copytree(base.run_dir, cfg.run_dir, ignore=shutil.ignore_patterns("lock*", "*.lock"))
        # trained on when short of stage I + --extra: a continuation stopped part way, or one of a smaller --extra,
        # was scored as it was (it was trained only when its folder was new, #27 pass 30)
        if (RunDir(cfg.run_dir).trained_to() or 0) < cfg.train.steps:
            log(f"[{task} seed {seed}] {model}, {extra} more steps: {_train(cfg):.0f}s")
    return cfgs


def evaluate(cfg, model_name: str, seed: int, examples: int) -> list[dict]:  # noqa: ANN001
    data = build_data(cfg)
    model, params, _ = restore_params(cfg, data=data)
    ev = evaluator_for(model)
    rows = []
    splits = {"train": tuple(cfg.data.train_difficulty), "2x": tuple(cfg.data.eval_splits["2x"])}
    policies = [(f"learned:q={q:g}", {"X": CAP}, {"X": exit_rule("learned", q)}) for q in QUANTILES]
    policies.append((f"fixed:{FIXED}", {"X": FIXED}, None))
    for difficulty, (lo, hi) in splits.items():
        for held_out in SPLITS:
            batches = eval_batches(data.task, f"{difficulty}/{held_out}", (lo, hi), examples, 256, cfg.seed)
            for policy, loops, exits in policies:
                ex = ev.examples(params, batches, loops, exits)
                hist = ex["histogram"]["X"]
                tokens = sum(hist.values())
                rows.append({"seed": seed, "model": model_name, "policy": policy, "difficulty": difficulty,
                             "split": held_out, "accuracy": float(ex["correct"].mean()),
                             "mean_loops": float(sum(int(k) * v for k, v in hist.items()) / max(tokens, 1))})
    for r in rows[-len(policies) * len(splits) * len(SPLITS):]:
        if r["split"] == "test":
            log(f"  {model_name} seed {seed} {r['difficulty']} {r['policy']}: {100 * r['accuracy']:.1f}% "
                f"@ {r['mean_loops']:.1f}")
    return rows


def select(rows: list[dict]) -> list[dict]:
    """Per (seed, model, difficulty): the quantile with the fewest val mean loops within 1 point of the best
    val accuracy over quantiles, and its test numbers."""
    out = []
    keys = sorted({(r["seed"], r["model"], r["difficulty"]) for r in rows}, key=str)
    for seed, model, difficulty in keys:
        mine = [r for r in rows if (r["seed"], r["model"], r["difficulty"]) == (seed, model, difficulty)
                and r["policy"].startswith("learned:")]
        val = {r["policy"]: r for r in mine if r["split"] == "val"}
        test = {r["policy"]: r for r in mine if r["split"] == "test"}
        best = max(r["accuracy"] for r in val.values())
        pick = min((r for r in val.values() if r["accuracy"] >= best - 0.01), key=lambda r: r["mean_loops"])
        t = test[pick["policy"]]
        out.append({"seed": seed, "model": model, "difficulty": difficulty, "q": float(pick["policy"].split("=")[1]),
                    "val_accuracy": pick["accuracy"], "val_mean_loops": pick["mean_loops"],
                    "test_accuracy": t["accuracy"], "test_mean_loops": t["mean_loops"]})
    return out


def markdown(task: str, result: dict) -> str:
    head = ["seed", "model", "difficulty", "q (val)", "val acc", "test acc", "test mean loops"]
    body = [[s["seed"], s["model"], s["difficulty"], f"{s['q']:g}", f"{100 * s['val_accuracy']:.1f}",
             f"{100 * s['test_accuracy']:.1f}", f"{s['test_mean_loops']:.1f}"] for s in result["selected"]]
    test = [r for r in result["rows"] if r["split"] == "test"]
    grid = [[r["seed"], r["model"], r["difficulty"], r["policy"], f"{100 * r['accuracy']:.1f}",
             f"{r['mean_loops']:.1f}"] for r in test]
    return (f"### {task}: the quantile chosen on val, scored on test\n\n" + format_table(head, body, markdown=True)
            + f"\n\n### {task}: every policy on test\n\n"
            + format_table(["seed", "model", "difficulty", "policy", "accuracy", "mean loops"], grid, markdown=True))


def main() -> int:
    ap = C.ArgumentParser(description=C.about(__doc__))
    ap.add_argument("--tasks", default="prefix_parity,maze3")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--extra", type=int, default=500, help="steps of each continuation")
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=C.out_folder, default=Path("runs/bench_gate_stage"))
    args = ap.parse_args()
    C.at_least(ap, args, {"--seeds": 1, "--extra": 1, "--examples": 1})
    C.at_most(ap, args, {"--seeds": C.SEEDS, "--examples": C.EXAMPLES})
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        ap.error(f"--tasks: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(TASKS)}")
    C.once(ap, "--tasks", tasks)
    # each continuation trains to stage I's steps + --extra: past the step counter the library refused it only after
    # stage I had trained (#27 pass 22)
    base = max(load_config(ROOT / "configs" / "adaptive" / f"{TASKS[t]}_halting.yaml").train.steps for t in tasks)
    C.at_most(ap, args, {"--extra": (C.STEPS[0] - base, f"the continuations train to stage I's {base:,} steps + "
                                                         f"--extra, and {C.STEPS[1]}")})
    # a continuation trained past stage I + --extra (a larger --extra before) was scored as it is (#27 pass 30)
    C.trained_past(ap, [cfg for task in tasks for seed in range(args.seeds)
                        for cfg in configs(task, seed, args.out, args.extra, args.examples)[1].values()],
                   f"stage I's steps + --extra {args.extra}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"tasks": {}, "setting": {"quantiles": QUANTILES, "cap": CAP, "fixed": FIXED, "extra": args.extra,
                                       "seeds": args.seeds, "examples": args.examples}}
    for task in tasks:
        rows = []
        for seed in range(args.seeds):
            for model, cfg in runs(task, seed, args.out, args.extra, args.examples).items():
                rows += evaluate(cfg, model, seed, args.examples)
                C.write_out(args.out / f"{task}.rows.partial.json", C.dumps(rows),
                            "in its runs, which a rerun with this --out scores again")
        result["tasks"][task] = {"rows": rows, "selected": select(rows)}
        md = markdown(task, result["tasks"][task])
        print(md, file=sys.stderr if args.json else sys.stdout, flush=True)
        C.write_out(args.out / f"{task}.md", md + "\n", "printed above")  # whole (#27 pass 24)
    if args.json:
        print(C.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    C.run_main(main)
