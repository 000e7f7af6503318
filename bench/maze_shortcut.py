"""Does a looped maze model use the start? Erase the start marker (the start room becomes a plain
room) and compare exact match with and without it at the training mean of loops, per eval split.

A model that floods reachability from the start must fail without it; a model that decides rooms
from the maze alone (e.g. labelling a small closed-in pocket NO and the rest YES) keeps its accuracy.

    python bench/think_longer.py --tasks maze_exit --out DIR      # train first
    python bench/maze_shortcut.py --tasks maze_exit --out DIR [--json]
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np

from loopformer.data.pipeline import eval_batches
from loopformer.data.sources import build_data
from loopformer.errors import AnalysisError
from loopformer.evaluation.evaluator import evaluator_for
from loopformer.runs.layout import RunDir
from loopformer.runs.restore import restore_params

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

_spec = importlib.util.spec_from_file_location("think_longer", Path(__file__).with_name("think_longer.py"))
think_longer = importlib.util.module_from_spec(_spec)
sys.modules["think_longer"] = think_longer
_spec.loader.exec_module(think_longer)


def erase_start(inputs: np.ndarray, room: int) -> np.ndarray:
    """Maze inputs [batch, seq] with every start room (tokens room+4 .. room+7) made a plain room."""
    return np.where(inputs >= room + 4, inputs - 4, inputs)


def check(name: str, out: Path, examples: int) -> list[dict]:
    setting = think_longer.TASKS[name]
    cfg = trained(name, out, examples)
    data = build_data(cfg)
    model, params, _ = restore_params(cfg, data=data)
    task, evaluator = data.task, evaluator_for(model)
    loops = {"X": setting.train_loops}
    rows = []
    for split, (lo, hi) in setting.splits.items():
        batches = eval_batches(task, split, (lo, hi), examples, 256, cfg.seed)
        erased = [{**b, "inputs": erase_start(np.asarray(b["inputs"]), task.ROOM)} for b in batches]
        rows.append({"task": name, "difficulty": split, "loops": setting.train_loops,
                     "with_start": float(evaluator.correct(params, batches, loops).mean()),
                     "start_erased": float(evaluator.correct(params, erased, loops).mean())})
    return rows


def trained(name: str, out: Path, examples: int) -> Any:
    """The config of ``name``'s looped run under ``out``; AnalysisError (one ``error:`` line, exit 2) when it has not
    been trained (it was status 1 without "error:", and a second setting's was found after the first was scored)."""
    cfg = think_longer.config(name, "looped", think_longer.TASKS[name].steps[1], out, examples)
    if RunDir(cfg.run_dir).trained_to() is None:  # no checkpoint (an empty checkpoints/: killed before its first)
        raise AnalysisError(f"--out {out}: no trained run at {cfg.run_dir}; train it first with "
                            f"`python bench/think_longer.py --tasks {name} --out {out}`")
    return cfg


def main() -> int:
    p = C.ArgumentParser(description=C.about(__doc__))
    p.add_argument("--tasks", default="maze_exit", help="comma-separated maze settings of think_longer")
    p.add_argument("--out", type=C.folder, default="bench_runs/think_longer",
                   help="think_longer's --out holding the runs")
    p.add_argument("--examples", type=int, default=256, help="eval examples per split (think_longer's: 256)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args()
    C.at_least(p, args, {"--examples": 1})
    C.at_most(p, args, {"--examples": C.EXAMPLES})
    rows = []
    mazes = [n for n in think_longer.TASKS if think_longer.task_of(n) == "maze"]
    names = args.tasks.split(",")
    for name in names:  # all of them before the first is read
        if name not in mazes:
            p.error(f"{name!r} is not a maze setting of think_longer; choose from {', '.join(mazes)}")
    C.once(p, "--tasks", names)  # scored and reported twice
    for name in names:  # every run before the first is scored
        trained(name, Path(args.out), args.examples)
    for name in names:
        rows += check(name, Path(args.out), args.examples)
    if args.json:
        print(C.dumps({"rows": rows}))
        return 0
    print("| setting | split | loops | exact match with S | S erased |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['difficulty']} | {r['loops']} | {100 * r['with_start']:.1f} | "
              f"{100 * r['start_erased']:.1f} |")
    return 0


if __name__ == "__main__":
    C.run_main(main)
