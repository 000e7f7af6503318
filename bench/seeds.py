"""A config's end-of-training loop sweep over several seeds: mean (min–max) accuracy per loop count.

Trains ``--config`` with seed = 0 .. N-1 (run ``<run.name>-seed<s>`` under ``--out``; an existing run
resumes, a finished one is only read back), then tabulates each split's accuracy (text: bits per
byte) at every count of ``eval.sweep_loops`` as the mean and range over seeds. A single seed is one
sample: this is the table README.md and docs/quickstart.md quote for the quickstart.

    python bench/seeds.py --config configs/quickstart.yaml --seeds 3 [--out DIR] [--json] [key=value ...]

JSON: {"config": str, "seeds": N, "metric": "accuracy" | "bits_per_byte",
       "rows": [{"seed": int, "loops": int, "split": str, "accuracy": float, ...}], "wall_s": {seed: float}}
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

from loopformer.config import load_config  # noqa: E402
from loopformer.config.load import repeated_override  # noqa: E402
from loopformer.evaluation.tables import format_table  # noqa: E402
from loopformer.train.trainer import train  # noqa: E402


def seed_configs(config: str, seeds: int, out: Path, overrides: list[str]) -> list:
    """The run config of every seed (run ``<run.name>-seed<s>`` under ``out``)."""
    base = load_config(config, overrides, once=True)
    return [load_config(config, [*overrides, f"seed={seed}", f"run.dir={out}", f"run.name={base.run.name}-seed{seed}"])
            for seed in range(seeds)]


def run_seeds(config: str, seeds: int, out: Path, overrides: list[str]) -> dict:
    base = load_config(config, overrides)
    rows, wall = [], {}
    for seed, cfg in enumerate(seed_configs(config, seeds, out, overrides)):
        t0 = time.time()
        with contextlib.redirect_stdout(sys.stderr):
            result = train(cfg)
        wall[seed] = time.time() - t0
        rows += [{"seed": seed, **r} for r in result.sweep]
        print(f"seed {seed}: {wall[seed]:.0f}s", file=sys.stderr, flush=True)
    metric = "bits_per_byte" if rows and "bits_per_byte" in rows[0] else "accuracy"
    circuits = base.model.circuits()
    doc = {"config": config, "overrides": overrides, "seeds": seeds, "metric": metric, "rows": rows, "wall_s": wall,
           "splits": {k: list(v) for k, v in base.data.eval_splits.items()} if metric == "accuracy" else {}}
    if metric == "bits_per_byte" and len(circuits) == 1:
        doc["text_criterion"] = text_criterion(rows, circuits[0].distribution().mean())
    return doc


# Issue #24's text criterion: on held-out text, bits per byte fall by >= GAIN from 1 loop to the best count,
# and at 4x the trained mean loops they are at most SLACK above the best.
GAIN, SLACK = 0.05, 0.01


def text_criterion(rows: list[dict], mean_loops: float, split: str = "val") -> dict:
    """Per seed on ``split``: bits per byte at 1 loop, the best count and its value, the value at 4x the
    training mean (the swept count nearest to it), and whether both parts of the criterion hold."""
    four = 4 * mean_loops
    out = {"split": split, "mean_loops": mean_loops, "gain": GAIN, "slack": SLACK, "seeds": []}
    for seed in sorted({r["seed"] for r in rows}):
        curve = {r["loops"]: r["bits_per_byte"] for r in rows if r["seed"] == seed and r["split"] == split
                 and isinstance(r["loops"], int)}
        if 1 not in curve:
            continue
        best = min(curve, key=curve.get)
        at4 = min(curve, key=lambda n: (abs(n - four), n))
        out["seeds"].append({"seed": seed, "at_1": curve[1], "best_loops": best, "best": curve[best], "loops_4x": at4,
                             "at_4x": curve[at4], "gain": curve[1] - curve[best], "excess_4x": curve[at4] - curve[best],
                             "holds": curve[1] - curve[best] >= GAIN and curve[at4] - curve[best] <= SLACK})
    return out


def markdown(doc: dict) -> str:
    """One row per loop count, one column per split: mean (min–max) over seeds (percent for accuracy)."""
    rows, metric = doc["rows"], doc["metric"]
    splits = list(dict.fromkeys(r["split"] for r in rows))
    counts = list(dict.fromkeys(r["loops"] for r in rows))
    scale, fmt = (100.0, "{:.1f}") if metric == "accuracy" else (1.0, "{:.3f}")

    def cell(n: int, split: str) -> str:
        v = scale * np.asarray([r[metric] for r in rows if r["loops"] == n and r["split"] == split])
        if not len(v):
            return "—"
        return fmt.format(v.mean()) + (f" ({fmt.format(v.min())}–{fmt.format(v.max())})" if len(v) > 1 else "")

    head = [f"{s} {doc['splits'][s]}" if s in doc.get("splits", {}) else s for s in splits]
    table = format_table(["loops", *head], [[n] + [cell(n, s) for s in splits] for n in counts], markdown=True)
    text = f"{metric} vs loop count, mean (min–max) over {doc['seeds']} seeds of {doc['config']}\n\n{table}"
    crit = doc.get("text_criterion")
    if crit and crit["seeds"]:
        lines = [f"Text criterion on {crit['split']} (gain from 1 loop to the best >= {crit['gain']}; at 4x the "
                 f"training mean {crit['mean_loops']:g} at most {crit['slack']} above the best):", ""]
        lines += [f"- seed {c['seed']}: 1 loop {c['at_1']:.4f}, best {c['best']:.4f} at {c['best_loops']} loops "
                  f"(gain {c['gain']:.4f}), {c['loops_4x']} loops {c['at_4x']:.4f} (+{c['excess_4x']:.4f}): "
                  + ("holds" if c["holds"] else "does not hold") for c in crit["seeds"]]
        text += "\n\n" + "\n".join(lines)
    return text


def main() -> int:
    p = C.ArgumentParser(description=C.about(__doc__))
    p.add_argument("--config", required=True, help="YAML config with eval.sweep_loops set")
    p.add_argument("--seeds", type=int, default=3, help="train seeds 0..N-1 (default 3)")
    p.add_argument("--out", type=C.out_folder, default="bench_runs/seeds", help="run directories (resumed if present)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every seed")
    args = p.parse_args()
    C.at_least(p, args, {"--seeds": 1})
    twice = repeated_override(args.overrides)
    if twice:  # the last one would win with no word
        p.error(twice)
    C.at_most(p, args, {"--seeds": C.SEEDS})  # 99999999999 trained seed after seed, its results written never
    for key, flag in (("seed", "--seeds"), ("run.dir", "--out")):
        given = next((o for o in args.overrides if o.split("=")[0].strip() == key), None)
        if given:  # each seed's run sets both: the override was accepted and not used
            p.error(f"{given}: every seed's run sets {key} (seeds 0..N-1 under --out); use {flag} instead")
    if not load_config(args.config, args.overrides).eval.sweep_loops:
        p.error(f"{args.config} has no eval.sweep_loops: nothing to tabulate (set eval.sweep_loops=[1,4,16])")
    # a finished run is read back: one trained past train.steps was swept as it is, under its steps (#27 pass 30)
    C.trained_past(p, seed_configs(args.config, args.seeds, Path(args.out), args.overrides),
                   "the config's train.steps, with the overrides")
    doc = run_seeds(args.config, args.seeds, Path(args.out), args.overrides)
    C.report(Path(args.out), "seeds", doc, markdown(doc), args.json)
    return 0


if __name__ == "__main__":
    C.run_main(main)  # a bad --config or override, an --out that is a file: one line, no traceback
