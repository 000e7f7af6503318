"""Duplicate, convert, or loop from the start? The comparison `loopformer rys` / `convert` exist for.

For each setting (parity, and the shipped text), four models of the same weights budget:

  plain      a plain transformer of L = 6 layers trained normally (model.stages: [])
  rys        the plain model with its best block [i, j) duplicated r times, no training: the scan of
             `loopformer rys` (every range, r = 1, 2, 3), the best chosen on the 2x split (text: val),
             the most favourable choice for it; then that block run 1..4 times
  converted  the plain model turned into prelude [0, 2) + core [2, 4) looped + coda [4, 6)
             (`loopformer convert --core 2:4 --inject concat`: exact at 1 loop) and trained on briefly
             with a loop curriculum
  looped     prelude 2 + a 2-block circuit + coda 2 (the same 6 blocks of weights) trained looped from
             the start for as many steps as plain + converted together

each swept over loop counts (rys: the number of times the block runs), on every eval split: parity
accuracy on train lengths [1, 6], 2x [12] and 4x [24] bits; text bits per byte on train and val.

Settings are declared below before the first run and not tuned on its result. Every model trains in a
few minutes on 2 CPU cores; the whole bench takes about half an hour.

    python bench/surgery.py [--json] [--out DIR] [--only parity|text]

JSON: {"settings": {...}, "rows": [{"setting", "model", "loops", "split", "metric", "value"}], "winner": {...},
       "wall_s": {...}}
"""

from __future__ import annotations

import contextlib
import io
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loopformer.cli import main as cli  # noqa: E402
from loopformer.config import load_config  # noqa: E402
from loopformer.evaluation import rys  # noqa: E402
from loopformer.evaluation.run import load_run  # noqa: E402
from loopformer.evaluation.tables import format_table  # noqa: E402
from loopformer.model.schedule import duplication, longest, padded  # noqa: E402
from loopformer.runs.layout import RunDir  # noqa: E402
from loopformer.runs.read import read_run  # noqa: E402
from loopformer.runs.stop import Terminated  # noqa: E402
from loopformer.train.trainer import train  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAYERS, CORE, REPEATS = 6, (2, 4), (1, 2, 3)

PARITY_LOOPED = ("model.stages=[{circuits: [{name: X, depth: 2, width: 64, heads: 4, window: 2, inject: add, "
                 "init: zeros, state_norm: true, loops: 'uniform(1, 6)', eval_loops: 3, backprop: 4}]}]")
TEXT_PLAIN = ["model.d_model=64", "model.heads=4", "model.prelude=6", "model.coda=0", "model.stages=[]",
              "model.tie_embeddings=false", "data.seq_len=128", "data.batch_size=16", "data.eval_examples=64",
              "data.eval_loops=[]", "train.eval_every=0", "train.lr=2e-3", "train.warmup_steps=50",
              "train.checkpoint_every=1000", "eval.sweep_loops=[]"]
TEXT_LOOPED = ("model.stages=[{circuits: [{name: X, depth: 2, width: 64, heads: 4, inject: add, init: zeros, "
               "loops: 'uniform(1, 3)', eval_loops: 2, backprop: 3}]}]")

SETTINGS: dict[str, dict[str, Any]] = {
    "parity": {
        "config": "configs/plain_parity.yaml",
        "plain": ["train.steps=1500", "train.eval_every=0"],
        "convert": {"loops": "uniform(1, 6)", "steps": 500, "lr": 1e-3},
        "looped": ["model.prelude=2", "model.coda=2", PARITY_LOOPED, "train.steps=2000", "train.eval_every=0"],
        "counts": [1, 2, 3, 4, 6, 8, 12, 16, 24],
        "select": "2x", "metric": "accuracy", "examples": 512,
    },
    "text": {
        "config": "configs/text_bytes.yaml",
        "plain": [*TEXT_PLAIN, "train.steps=500"],
        "convert": {"loops": "uniform(1, 3)", "steps": 200, "lr": 1e-3},
        "looped": [*TEXT_PLAIN, "model.prelude=2", "model.coda=2", TEXT_LOOPED, "train.steps=700"],
        "counts": [1, 2, 3, 4, 6, 8],
        "select": "val", "metric": "bits_per_byte", "examples": 64,
    },
}


def _quiet(fn: Any, *args: Any) -> Any:
    with contextlib.redirect_stdout(sys.stderr):
        return fn(*args)


def _train(config: str, overrides: list[str]) -> tuple[Path, float]:
    cfg = load_config(ROOT / config, overrides)
    t0 = time.time()
    _quiet(train, cfg)
    return cfg.run_dir, time.time() - t0


def _rows(setting: str, model: str, run: Any, eval_sets: dict, metric: str, loops: dict | None = None,
          schedules: dict | None = None, count: int | None = None) -> list[dict[str, Any]]:
    out = []
    for split, batches in eval_sets.items():
        r = run.row(split, batches, loops, schedules=schedules)
        out.append({"setting": setting, "model": model, "loops": count, "split": split, "metric": metric,
                    "value": r[metric], "loss": r["loss"]})
    return out


def _smoke(s: dict[str, Any]) -> dict[str, Any]:
    """The same pipeline at a few steps (checks the script, measures nothing)."""
    cut = lambda o: [f"train.steps={max(2, int(x.split('=')[1]) // 100)}" if x.startswith("train.steps=") else x
                     for x in o]  # noqa: E731
    return {**s, "plain": cut(s["plain"]), "looped": cut(s["looped"]), "examples": 16, "counts": s["counts"][:2],
            "convert": {**s["convert"], "steps": 2}}


def converted(plain_dir: Path, target: Path, loops: str) -> None:
    """``loopformer convert`` of the plain run into ``target`` (beside it), unless an earlier run of the script
    converted it there (reused, as the plain and looped runs are). The command's exit status was ignored: a rerun
    printed convert's "already holds a run" error and went on, and a Ctrl-C or SIGTERM during the conversion went on
    to the next stage (#27 pass 30); now a failure ends the script with convert's line and status."""
    if (target / "config.yaml").is_file():
        return
    code = _quiet(cli, ["convert", "--run", str(plain_dir), "--core", f"{CORE[0]}:{CORE[1]}", "--out", target.name,
                        "--inject", "concat", "--loops", loops, "--max-loops", "64"])
    if code == 130:
        raise KeyboardInterrupt
    if code == 128 + signal.SIGTERM:
        raise Terminated
    if code:
        raise SystemExit(code)  # convert printed its one line


def run_setting(name: str, out: Path, smoke: bool = False
                ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, float]]:
    s = _smoke(SETTINGS[name]) if smoke else SETTINGS[name]
    metric, wall, rows = s["metric"], {}, []
    base = [f"run.dir={out}"]
    plain_dir, wall[f"{name}/plain"] = _train(s["config"], [*base, f"run.name={name}_plain", *s["plain"]])
    info = read_run(plain_dir)
    run = load_run(info)
    eval_sets = run.eval_sets(info.select_splits(None), s["examples"])
    rows += _rows(name, "plain", run, eval_sets, metric)
    # the RYS scan: every block, r = 1..3; the best on the selection split
    t0 = time.time()
    scan, baseline = rys.scan(run, eval_sets, "prelude", REPEATS)
    wall[f"{name}/rys_scan"] = time.time() - t0
    best = rys.best(scan, s["select"], info.is_text)
    block = (best["start"], best["end"])
    length = longest(LAYERS, [3])
    for r in range(4):
        order = padded(duplication(LAYERS, *block, r), length)
        rows += _rows(name, f"rys [{block[0]}, {block[1]})", run, eval_sets, metric, schedules={"prelude": order},
                      count=r + 1)
    # converted and trained on
    conv = f"{name}_converted"
    c = s["convert"]
    converted(plain_dir, out / conv, c["loops"])
    conv_cfg = out / conv / "config.yaml"
    _, wall[f"{name}/converted"] = _train(str(conv_cfg), [f"train.steps={c['steps']}", f"train.lr={c['lr']}",
                                                          "train.warmup_steps=20", "train.eval_every=0",
                                                          "eval.sweep_loops=[]"])
    # looped from the start
    looped_dir, wall[f"{name}/looped"] = _train(s["config"], [*base, f"run.name={name}_looped", *s["looped"],
                                                              "eval.sweep_loops=[]"])
    for model, path in (("converted", out / conv), ("looped", looped_dir)):
        linfo = read_run(path)
        lrun = load_run(linfo)
        lsets = lrun.eval_sets(linfo.select_splits(None), s["examples"])
        for n in s["counts"]:
            rows += _rows(name, model, lrun, lsets, metric, loops={"X": n}, count=n)
    return rows, {"scan_best": best, "baseline": baseline, "scan_size": len(scan)}, wall


def winner(rows: list[dict[str, Any]], setting: str, split: str, metric: str) -> dict[str, Any]:
    mine = [r for r in rows if r["setting"] == setting and r["split"] == split]
    if metric == "bits_per_byte":
        return min(mine, key=lambda r: r["value"])
    return max(mine, key=lambda r: (r["value"], -r["loss"]))  # ties: the lower loss


def markdown(doc: dict[str, Any]) -> str:
    parts = []
    for setting in dict.fromkeys(r["setting"] for r in doc["rows"]):
        mine = [r for r in doc["rows"] if r["setting"] == setting]
        splits = list(dict.fromkeys(r["split"] for r in mine))
        metric = mine[0]["metric"]
        fmt = (lambda v: f"{100 * v:.1f}") if metric == "accuracy" else (lambda v: f"{v:.4f}")
        keys = list(dict.fromkeys((r["model"], r["loops"]) for r in mine))
        at = {(r["model"], r["loops"], r["split"]): r["value"] for r in mine}
        cells = [[m, "-" if n is None else n] + [fmt(at[m, n, sp]) for sp in splits] for m, n in keys]
        what = "accuracy %" if metric == "accuracy" else "bits per byte (lower is better)"
        parts.append(f"**{setting}** ({what}; loops: the circuit's count, for rys the times the block runs)\n\n"
                     + format_table(["model", "loops", *splits], cells, markdown=True))
        w = doc["winner"][setting]
        parts.append(f"winner on {w['split']}: {w['model']} at loops {w['loops']} ({fmt(w['value'])})")
    return "\n\n".join(parts)


def checked(p: Any, names: list[str], out: Path, smoke: bool) -> None:
    """Refuse, before any work, an --out whose runs this run would score as they are under other steps (a --smoke run
    into the --out of a full one: the trainer said "already trained"), or whose converted run was made from the plain
    run before this run trains it on (a full run into a --smoke run's --out scored the conversion of the smoke model;
    #27 pass 30)."""
    how = "--smoke" if smoke else "the full steps, without --smoke"
    for name in names:
        s = _smoke(SETTINGS[name]) if smoke else SETTINGS[name]
        plain, looped = (load_config(ROOT / s["config"], [f"run.dir={out}", f"run.name={name}_{m}", *s[m]])
                         for m in ("plain", "looped"))
        conv = out / f"{name}_converted"
        cfgs = [plain, looped]
        if (conv / "config.yaml").is_file():
            cfgs.append(load_config(conv / "config.yaml", [f"train.steps={s['convert']['steps']}"]))
            if (RunDir(plain.run_dir).trained_to() or 0) < plain.train.steps:
                p.error(f"--out {out}: {conv.name} was converted from {name}_plain before the {plain.train.steps:,} "
                        f"steps this run ({how}) trains it to; remove it (rm -r {shlex.quote(str(conv))}) to convert "
                        f"it again, or choose another --out")
        C.trained_past(p, cfgs, how)


def main() -> int:
    p = C.ArgumentParser(description=C.about(__doc__))
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--out", type=C.out_folder, default=Path("runs/bench_surgery"), help="where the runs go")
    p.add_argument("--only", choices=sorted(SETTINGS), action="append", help="run only these settings")
    p.add_argument("--smoke", action="store_true", help="a few steps per model: checks the script, measures nothing")
    args = p.parse_args()
    names = args.only or list(SETTINGS)
    checked(p, names, args.out, args.smoke)
    rows, extra, wall, wins = [], {}, {}, {}
    for name in names:
        r, e, w = run_setting(name, args.out, args.smoke)
        rows += r
        extra[name], wall = e, {**wall, **w}
        s = SETTINGS[name]
        wins[name] = winner(r, name, s["select"], s["metric"])
        print(f"{name}: done ({sum(v for k, v in w.items() if k.startswith(name)):.0f}s)", file=sys.stderr, flush=True)
    # a --smoke record named neither --smoke nor its settings: it read as the full one (#27 pass 30)
    doc = {"command": "python bench/surgery.py" + (" --only " + " --only ".join(args.only) if args.only else "")
           + (" --smoke" if args.smoke else ""), "smoke": args.smoke,
           "settings": {k: dict(_smoke(v) if args.smoke else v) for k, v in SETTINGS.items()}, "rows": rows,
           "scan": extra, "winner": wins, "wall_s": wall}
    if args.json:
        print(C.dumps(doc, default=str))
    else:
        buf = io.StringIO()
        print(markdown(doc), file=buf)
        print(buf.getvalue())
    return 0


if __name__ == "__main__":
    C.run_main(main)
