"""Does screening keep `rys` right while making it fast? One run, both ways, on a trained plain run.

Screened (the default of `loopformer rys`): every setting on the first ``--screen`` examples of each split,
the 5 best and the unmodified model rescored on all ``--examples``. Full (rys's ``--screen 0``): every setting
on every example. Per split: the wall time of each, and the best setting and top 5 of each by the full
examples' scores.

    python bench/rys_screen.py --run runs/plain_parity [--repeats 1,2,3] [--examples 2500] [--screen 256]
        [--json] [--out FILE]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

from loopformer.cli.rys import MAX_REPEATS, TOP  # noqa: E402
from loopformer.evaluation import rys  # noqa: E402
from loopformer.evaluation.run import load_run  # noqa: E402
from loopformer.runs.read import read_run  # noqa: E402


def key(r: dict) -> tuple:
    return r["start"], r["end"], r["repeats"]


def compare(split: str, by_full: list[dict], mine: list[dict]) -> dict[str, Any]:
    """One split's row: the full scan's best and top `TOP` (``by_full``, ranked) against the screened and rescored
    ones (``mine``); its overlap is out of the top's length, which is below `TOP` where the run has fewer settings
    (it was written "1/5" of a top of one; #27 pass 34)."""
    top = [key(r) for r in by_full[:TOP]]
    return {"split": split, "best_full": key(by_full[0]), "best_screened": key(mine[0]),
            "same_best": key(by_full[0]) == key(mine[0]), "top_full": top, "top_screened": [key(r) for r in mine],
            "top_overlap": len(set(top) & {key(r) for r in mine})}


def main() -> None:
    p = C.parser(C.about(__doc__))
    p.add_argument("--run", required=True, help="a trained run with a plain prelude (e.g. configs/plain_parity.yaml)")
    p.add_argument("--repeats", default="1,2,3")
    p.add_argument("--examples", type=int, default=2500)
    p.add_argument("--screen", type=int, default=256)
    args = p.parse_args()
    # --screen 0 (rys's "no screening") left the screened scan no examples: a ValueError traceback from max() after the
    # run was loaded (#27 pass 22); the script compares a screen against the full scan, which it runs anyway
    C.at_least(p, args, {"--examples": 1, "--screen": 1})
    C.at_most(p, args, {"--examples": C.EXAMPLES})  # (it built 1e11 examples without end)
    repeats = C.int_list(p, "--repeats", args.repeats, maximum=(MAX_REPEATS, "rys's limit: each adds the block's "
                                                                 "layers to every schedule"))
    info = read_run(args.run)
    run = load_run(info)
    sets = run.eval_sets(info.select_splits(None), args.examples)
    text = info.is_text
    run.row(next(iter(sets)), sets[next(iter(sets))][:1])  # compile outside the timings

    t0 = time.perf_counter()
    screened, _ = rys.scan(run, rys.screen(sets, args.screen), "prelude", repeats)
    rescored, base = rys.rescore(run, sets, "prelude", screened, TOP)
    t_screen = time.perf_counter() - t0
    t0 = time.perf_counter()
    full, full_base = rys.scan(run, sets, "prelude", repeats)
    t_full = time.perf_counter() - t0

    splits: list[dict[str, Any]] = []
    for b in base:
        split = b["split"]
        by_full = rys.ranked([r for r in full if r["split"] == split], text)
        mine = rys.ranked([r for r in rescored if r["split"] == split], text)
        splits.append(compare(split, by_full, mine))
    result = {"bench": "rys_screen", "env": C.environment(), "run": str(info.path), "repeats": repeats,
              "examples": args.examples, "screen": args.screen, "settings": len(full) // max(len(base), 1),
              "seconds_screened": t_screen, "seconds_full": t_full, "speedup": t_full / t_screen, "splits": splits}
    body = [[s["split"], str(s["best_full"]), str(s["best_screened"]), s["same_best"],
             f"{s['top_overlap']}/{len(s['top_full'])}"]
            for s in splits]
    C.emit(result, [f"rys_screen on {info.path}: {result['settings']} settings per split, screen {args.screen} of "
                    f"{args.examples} examples: {t_screen:.1f} s vs full {t_full:.1f} s ({result['speedup']:.2f}x)",
                    C.table("best setting (start, end, repeats) per split", ["split", "full scan", "screened",
                                                                              "same best", "top-5 overlap"], body)],
           args)


if __name__ == "__main__":
    C.run_main(main)
