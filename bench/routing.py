"""Gradient routing: can a user decide at training time which circuit owns a skill, and check it by ablation?

Three models on one mixture of running parity (prefix_parity, 1-8 bits) and 3-row mazes (maze3, 1-8
columns), each a bank of two identical looped circuits X and Y (configs/routing.yaml):

  routed     parity examples update only X, maze examples only Y, and neither updates the shared layers
             (embeddings, prelude, coda, norms: route_shared false, so they stay at initialisation)
  unrouted   the same model and data, every example updating every parameter
  routed_shared  (declared after the first run, see DEFAULT_MODELS) the routed model with route_shared
             true: the shared layers learn from both tasks, only the circuits are routed

For each: the ablation matrix (each task's accuracy with no circuit, X or Y removed: zero ablation, at
the default 12 loops) and the activity table (`loopformer activity`: on-rate, mean write norm, mean
Δloss per token). The bar (issue #16), on the train splits: in the routed model removing X drops parity
by >= 50 points while maze moves <= 5, removing Y does the reverse, and with nothing removed both tasks
are within 3 points of the unrouted model. The unrouted matrix answers: does a skill settle in one
circuit without routing?

    python bench/routing.py [--json] [--quick] [--out DIR] [--models routed,unrouted,routed_shared]

Prints Markdown tables (--json: one JSON document on stdout, everything else on stderr):
{"models": {"routed" | "unrouted" | "routed_shared": {"ablation": [{"removed": CIRCUIT | null, "split": "TASK/SPLIT",
 "accuracy": float}], "activity": [...], "train_wall_s": float}}, "verdict": {...} (routed),
 "verdict_routed_shared": {...}, "steps": int}
Text is not in the mixture: mazes need bidirectional attention (model.causal=false) and a language
model cannot have it, so the shipped corpus does not fit this model.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from loopformer import jsontext
from loopformer.config import Config, load_config
from loopformer.evaluation.activity import activity
from loopformer.evaluation.run import load_run
from loopformer.evaluation.tables import format_table
from loopformer.runs.read import read_run
from loopformer.train.trainer import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "routing.yaml"
MODELS = ("routed", "unrouted", "routed_shared")
DEFAULT_MODELS = MODELS  # routed and unrouted were declared before the first run; routed_shared after it
# routed_shared: declared AFTER the first run, whose routed model (shared layers frozen at initialisation)
# did not learn either task in 2,000 steps while the unrouted one did: the same routes with route_shared
# true, so the shared layers learn from both tasks and only the circuits are routed.
ROUTED = ("routed", "routed_shared")
CIRCUITS = ("X", "Y")
TASKS = {"prefix_parity": "X", "maze": "Y"}  # the circuit each task is routed to
OTHER = {"prefix_parity": "maze", "maze": "prefix_parity"}
STEPS = (60, 2000)  # training steps per model: --quick, full (batch 64: ~1,000 examples of each task per 32 steps)
EXAMPLES = (64, 1000)  # eval examples per split: ±1.6 points standard error at 50 %, less near 0 or 100
ACTIVITY_EXAMPLES = (32, 256)


def config(model: str, steps: int, out: Path) -> Config:
    """configs/routing.yaml at ``steps``; the unrouted model drops both routes, routed sets route_shared false,
    routed_shared true (nothing else changes)."""
    overrides = [f"run.dir={out}", f"run.name=routing-{model}", f"train.steps={steps}", "train.eval_every=0",
                 f"train.checkpoint_every={steps}", "eval.sweep_loops=[]"]
    if model == "unrouted":
        overrides += ["data.mixture.prefix_parity.route=null", "data.mixture.maze.route=null"]
    shared = "true" if model == "routed_shared" else "false"  # the shipped config routes the shared layers too
    overrides += [f"data.mixture.prefix_parity.route_shared={shared}", f"data.mixture.maze.route_shared={shared}"]
    return load_config(CONFIG, overrides)


def train_timed(cfg: Config) -> float:
    """Train (or resume) a run; its total training wall time, kept in the run directory."""
    record = cfg.run_dir / "routing_train_wall.json"
    spent = C.read_wall(record)
    t0 = time.time()
    with contextlib.redirect_stdout(sys.stderr):
        result = train(cfg)
    if result.step >= cfg.train.steps and (not record.is_file() or time.time() - t0 > 5):
        spent += time.time() - t0
        C.write_wall(record, spent, cfg.train.steps)
    return spent


def measure(cfg: Config, examples: int, activity_examples: int) -> dict:
    """The ablation matrix and the activity table of a trained run."""
    run = load_run(read_run(cfg.run_dir))
    splits = run.info.select_splits(None)
    eval_sets = run.eval_sets(splits, examples)
    ablation = [{"removed": removed, "split": split,
                 "accuracy": run.row(split, batches, ablate=[removed] if removed else [])["accuracy"]}
                for split, batches in eval_sets.items() for removed in (None, *CIRCUITS)]
    rows, thresholds, _ = activity(run, run.eval_sets(splits, activity_examples))
    return {"ablation": ablation, "activity": rows, "on_threshold": thresholds}


def accuracy(result: dict, removed: str | None, split: str) -> float:
    return next(r["accuracy"] for r in result["ablation"] if r["removed"] == removed and r["split"] == split)


def verdict(models: dict, name: str = "routed") -> dict:
    """The bar on the train splits for the routed model ``name``, in points: each circuit's drop on its
    own task and move on the other, and the gap to the unrouted model with nothing removed."""
    routed, out = models[name], {}
    for task, circuit in TASKS.items():
        own, cross = f"{task}/train", f"{OTHER[task]}/train"
        out[f"remove_{circuit}"] = {
            "own_task": task, "drop": 100 * (accuracy(routed, None, own) - accuracy(routed, circuit, own)),
            "other_task": OTHER[task], "move": 100 * abs(accuracy(routed, circuit, cross) - accuracy(routed, None, cross))}
    if "unrouted" in models:
        out["gap_to_unrouted"] = {t: 100 * (accuracy(routed, None, f"{t}/train")
                                            - accuracy(models["unrouted"], None, f"{t}/train")) for t in TASKS}
    ablations = all(out[f"remove_{c}"]["drop"] >= 50 and out[f"remove_{c}"]["move"] <= 5 for c in TASKS.values())
    gaps = "gap_to_unrouted" in out and all(abs(g) <= 3 for g in out["gap_to_unrouted"].values())
    out["holds"] = ablations and gaps
    return out


def markdown(doc: dict) -> str:
    lines = []
    for model, result in doc["models"].items():
        splits = list(dict.fromkeys(r["split"] for r in result["ablation"]))
        cells = [[removed or "nothing"] + [f"{100 * accuracy(result, removed, s):.1f}" for s in splits]
                 for removed in (None, *CIRCUITS)]
        lines += [f"### {model} ({doc['steps']} steps, {result['train_wall_s']:.0f} s): accuracy (%) with a circuit "
                  f"removed", "", format_table(["removed", *splits], cells, markdown=True), ""]
        act = [[r["split"], r["circuit"], f"{100 * r['on_rate']:.0f}", f"{r['mean_write_norm']:.3g}",
                f"{r['mean_ablation_delta_loss']:+.3f}"] for r in result["activity"]]
        lines += ["Activity (on = write norm above 10 % of the split's largest per-circuit median; Δloss per answer "
                  "token when the circuit is removed):", "",
                  format_table(["split", "circuit", "on-rate %", "mean write norm", "mean Δloss"], act, markdown=True),
                  ""]
    for name in ROUTED:
        v = doc.get("verdict" if name == "routed" else f"verdict_{name}")
        if v is None:
            continue
        parts = [f"removing {c}: {v[f'remove_{c}']['own_task']} -{v[f'remove_{c}']['drop']:.1f} points, "
                 f"{v[f'remove_{c}']['other_task']} moves {v[f'remove_{c}']['move']:.1f}" for c in TASKS.values()]
        if "gap_to_unrouted" in v:
            parts.append(f"{name} - unrouted with nothing removed: " + ", ".join(
                f"{t} {g:+.1f}" for t, g in v["gap_to_unrouted"].items()))
        lines.append(f"Bar for {name} (train splits): " + "; ".join(parts)
                     + f": the bar {'holds' if v['holds'] else 'does not hold'}.")
    return "\n".join(lines)


def models_dropped(record: Path, models: list[str]) -> list[str]:
    """The models whose results the routing.json at ``record`` holds and a run of ``models`` would not score again
    (none for a damaged record: nothing in it to lose)."""
    try:
        held = jsontext.loads(record.read_text(encoding="utf-8"))["models"] if record.is_file() else {}
        return [m for m in held if m not in models]
    except (OSError, ValueError, TypeError, KeyError):
        return []


def main() -> int:
    p = C.ArgumentParser(description=C.about(__doc__))
    p.add_argument("--quick", action="store_true", help=f"{STEPS[0]} steps per model and {EXAMPLES[0]} examples: "
                   "a smoke run, not the result")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--out", type=C.out_folder, default="bench_runs/routing", help="run directories and results")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"comma-separated subset of {','.join(MODELS)} (default: all three; routed and unrouted "
                        "were declared before the first run, routed_shared after it)")
    args = p.parse_args()
    models = args.models.split(",")
    if not models or not set(models) <= set(MODELS) or not set(models) & set(ROUTED):
        p.error(f"--models {args.models}: choose from {','.join(MODELS)}, including a routed one")
    C.once(p, "--models", models)  # trained twice, the second replacing the first
    steps, examples, act = (STEPS[0], EXAMPLES[0], ACTIVITY_EXAMPLES[0]) if args.quick else (
        STEPS[1], EXAMPLES[1], ACTIVITY_EXAMPLES[1])
    out = Path(args.out)
    dropped = models_dropped(out / "routing.json", models)
    if dropped:  # its record replaced that one: those models' results were lost with no word (#27 pass 30)
        p.error(f"--out {out} holds a routing.json with the results of {', '.join(dropped)}, which this run (--models "
                f"{','.join(models)}) does not score, and its record replaces that one; add them to --models (their "
                f"runs are reused), move {out / 'routing.json'} aside, or choose another --out")
    # a run --out holds trained past these steps was scored as it is, under a record of them (#27 pass 30)
    C.trained_past(p, [config(model, steps, out) for model in models],
                   "--quick" if args.quick else "the full steps, without --quick")
    t0 = time.time()
    results = {}
    for model in models:
        cfg = config(model, steps, out)
        wall = train_timed(cfg)
        results[model] = {**measure(cfg, examples, act), "train_wall_s": wall}
        print(f"[routing] {model}: trained {steps} steps in {wall:.0f}s", file=sys.stderr)
    doc = {"models": results, "steps": steps, "examples": examples, "quick": args.quick, "wall_s": time.time() - t0,
           "environment": C.environment()}
    for name in ROUTED:
        if name in results:
            doc["verdict" if name == "routed" else f"verdict_{name}"] = verdict(results, name)
    text = markdown(doc)
    if args.json:  # printed first: a write that fails (a full disk) is one line, and the results are above it
        print(text, file=sys.stderr)
        print(C.dumps(doc), flush=True)
    else:
        print(text, flush=True)
    C.write_out(out / "routing.json", C.dumps(doc, indent=1), "printed above")  # whole (#27 pass 24)
    C.write_out(out / "routing.md", text + "\n", "printed above")
    if not args.json:
        print(f"\nwall time {doc['wall_s']:.0f}s; results in {out}/routing.{{md,json}}")
    return 0


if __name__ == "__main__":
    C.run_main(main)
