"""Where a maze router goes wrong, and when its rooms stop: per kind of room, the share answered wrong and the mean
round at which it stopped, for each router run given.

A diagnosis of the maze3 routers of ``bench/adaptive.py`` (#25), not a bar: some of them learn a stop and solve
the 2x mazes, others, trained from the same seed and config, do not, and this says which rooms the second kind gets
wrong. Each router run is scored on one of adaptive.py's held-out sets (think_longer's val or test set of a
difficulty, 256 mazes drawn from the run's seed, batches of 64) at a cap on its rounds, compacted as adaptive.py's
``--compact on`` runs it. Its rooms are of three kinds, from the maze's own passages (`Maze.distances`):

- **near**: reachable, at most half the maze's farthest distance from the start;
- **far**: reachable, farther;
- **unreachable**: behind the closed passage (the answer NO, which no local step can confirm: such a room can only
  wait, or stop by a rule that does not read its neighbours).

Per kind: rooms, the share answered wrong, the mean round at which they stopped (the cap where they never exited);
per run: exact-match accuracy over the mazes.

    python bench/router_rooms.py --runs RUN [RUN ...] [--cap 48] [--difficulty 2x] [--split val] [--json] [--out DIR]

JSON: {"cap", "difficulty", "split", "examples", "runs": {RUN: {"seed", "accuracy", "mazes", "kinds": {KIND: {"rooms",
"wrong", "mean_stop"}}}}}; a Markdown table beside it (``router_rooms.{json,md}`` in --out).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from loopformer.data.sources import build_data
from loopformer.evaluation.evaluator import evaluator_for
from loopformer.model.plan import MAX_LOOPS
from loopformer.runs.read import load_run_config
from loopformer.runs.restore import restore_params

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import adaptive as A  # noqa: E402

KINDS = ("near", "far", "unreachable")


def room_kinds(task, inputs_T: np.ndarray) -> dict[int, str]:  # noqa: ANN001
    """{position: kind} for every room of one maze (`KINDS`; positions column-major, SEP after each column)."""
    right, _, _ = task.parse(inputs_T)
    h, d = right.shape
    dist = task.distances(inputs_T)
    far = max(dist.values())
    return {c * (h + 1) + r: ("unreachable" if (r, c) not in dist else "near" if dist[(r, c)] <= far / 2 else "far")
            for c in range(d) for r in range(h)}


def tally(task, inputs_BT: np.ndarray, targets_BT: np.ndarray, preds_BT: np.ndarray,  # noqa: ANN001
          stops_BT: np.ndarray) -> dict:
    """Per kind of room: rooms, wrong answers and the sum of their stop rounds; mazes, and those right whole."""
    out = {k: {"rooms": 0, "wrong": 0, "stops": 0.0} for k in KINDS} | {"mazes": 0, "right": 0}
    for x, y, p, s in zip(inputs_BT, targets_BT, preds_BT, stops_BT, strict=True):
        if not np.any(x):
            continue  # a padding row
        wrong = 0
        for pos, kind in room_kinds(task, x).items():
            bad = int(p[pos] != y[pos])
            out[kind]["rooms"] += 1
            out[kind]["wrong"] += bad
            out[kind]["stops"] += float(s[pos])
            wrong += bad
        out["mazes"] += 1
        out["right"] += int(wrong == 0)
    return out


def not_a_maze_router(cfg) -> str | None:  # noqa: ANN001
    """Why a run's config is not one this script scores (a maze3 run with one routed circuit), or None."""
    routed = any(s.router.routes for s in cfg.model.stages)
    if cfg.data.task != "maze" or dict(cfg.data.task_args) != A.think_longer.TASKS["maze3"].task_args or not routed:
        return (f"it trains {cfg.data.task} {dict(cfg.data.task_args)}{'' if routed else ' without a router'}; give "
                f"runs of maze3 ({A.think_longer.TASKS['maze3'].task_args}) with a router")
    if len(list(cfg.model.circuits())) != 1:
        return "it has several circuits; give runs with one routed circuit (bench/adaptive.py's routers)"
    return None


def score(run: Path, cap: int, difficulty: str, split: str, examples: int) -> dict:
    """One router run on its seed's held-out set (difficulty, split) at ``cap`` rounds, compacted."""
    cfg = load_run_config(run)
    data = build_data(cfg)
    model, params, _ = restore_params(cfg, data=data)
    sets = A.held_out(data.task, A.think_longer.TASKS["maze3"], examples, cfg.seed)
    ev = evaluator_for(model)
    (name,) = [c.name for c in cfg.model.circuits()]
    batches = sets[(difficulty, split)]
    runs = [ev.logits_used(params, b["inputs"], {name: cap}, b["segment_ids"], compact=True) for b in batches]
    total = tally(data.task, *(np.concatenate([np.asarray(b[k]) for b in batches]) for k in ("inputs", "targets")),
                  np.concatenate([np.asarray(logits).argmax(-1) for logits, _ in runs]),
                  np.concatenate([np.asarray(used[name]) for _, used in runs]))
    return {"seed": cfg.seed, "accuracy": total["right"] / max(total["mazes"], 1), "mazes": total["mazes"],
            "kinds": {k: {"rooms": total[k]["rooms"], "wrong": total[k]["wrong"] / max(total[k]["rooms"], 1),
                          "mean_stop": total[k]["stops"] / max(total[k]["rooms"], 1)} for k in KINDS}}


def markdown(doc: dict) -> str:
    rows = [[run, r["seed"], f"{100 * r['accuracy']:.1f}",
             *(f"{100 * r['kinds'][k]['wrong']:.1f} % @ {r['kinds'][k]['mean_stop']:.1f}" for k in KINDS)]
            for run, r in doc["runs"].items()]
    return C.table(f"### maze routers at cap {doc['cap']}, {doc['difficulty']} {doc['split']}: rooms wrong @ mean stop "
                   f"round, per kind", ["run", "seed", "mazes right %", *(f"{k}: wrong @ stop" for k in KINDS)], rows)


def main() -> int:
    p = C.ArgumentParser(description=C.about(__doc__))
    p.add_argument("--runs", nargs="+", type=C.folder, required=True, help="router run directories (maze3's)")
    p.add_argument("--cap", type=int, default=48, help="the most rounds a room may run (default 48, adaptive.py's 4m)")
    p.add_argument("--difficulty", default="2x", help="held-out difficulty: train, 2x or 4x (default 2x)")
    p.add_argument("--split", choices=A.SPLITS, default="val", help="held-out set (default val)")
    p.add_argument("--examples", type=int, default=256, help="mazes in the set (default 256, adaptive.py's)")
    p.add_argument("--out", type=C.out_folder, default="bench_runs/router_rooms", help="where the record goes")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = p.parse_args()
    C.at_least(p, args, {"--cap": 1, "--examples": 1})
    # a cap past the loop limit ran for hours, past SIGTERM (one compiled call); a run named two ways (mr, ./mr) was
    # scored and reported twice (#27 pass 41)
    C.at_most(p, args, {"--examples": C.EXAMPLES, "--cap": (MAX_LOOPS, "the loop limit")})
    C.once(p, "--runs", [str(r.resolve()) for r in args.runs])
    difficulties = A.think_longer.TASKS["maze3"].splits
    if args.difficulty not in difficulties:
        p.error(f"--difficulty {args.difficulty}: choose from {', '.join(difficulties)}")
    for run in args.runs:  # every run before any work
        why = not_a_maze_router(load_run_config(run))
        if why:
            p.error(f"--runs {run}: {why}")
    t0 = time.time()
    runs = {}
    for run in args.runs:
        runs[str(run)] = score(Path(run), args.cap, args.difficulty, args.split, args.examples)
        print(f"  {run}: {100 * runs[str(run)]['accuracy']:.1f} % of the mazes", file=sys.stderr, flush=True)
    doc = {"cap": args.cap, "difficulty": args.difficulty, "split": args.split, "examples": args.examples,
           "runs": runs, "wall_s": time.time() - t0}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    C.report(out, "router_rooms", doc, markdown(doc), args.json)
    return 0


if __name__ == "__main__":
    C.run_main(main)
