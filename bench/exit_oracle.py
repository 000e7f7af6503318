"""Stops that read the labels: how much would stopping each token once its answer is right save, on
bench/adaptive.py's looped models?

#25's bar asks a policy to match the best fixed loop count within 1 point at <= 0.6x its executed FLOPs. This
script stops each token by its own label on the same models, sets and compacted execution, to see what the
answers alone say about when a token may stop. It is a reference, not a policy; the first runs showed it is not a
ceiling either (a token's state is read by other tokens after its own answer is right, and maze3's trained router
stopped better: 88.7 % at 0.54x the FLOPs, against 82.0 % at 0.95x here; docs/adaptive.md).

Setting (declared 2026-12-06 00:30 UTC, before its first run). Per task (prefix_parity, maze3) and seed, the looped
model of ``bench/adaptive.py`` (think_longer's run, trained if missing) at 2x, on think_longer's val and test sets
(256 examples each, batches of 64):

- **best fixed count** N: the count of think_longer's sweep with the best val accuracy (ties: the fewest loops),
  as bench/adaptive.py selects it.
- **oracle**: each token stops at the first count n <= N from which its own prediction, under N's fixed-count
  run, is right at every count up to N (a token wrong at N, and a token with no answer, runs N). It then runs
  as per-token loop counts (``loops={"X": counts_BT}``), compacted: a stopped token's state is frozen and the
  tokens after it read that frozen state, so its accuracy is measured, not assumed (it may fall below N's).
- **oracle, no slack**: the oracle's mean loops per token over N, the FLOPs ratio an execution without bucket
  slack and without the extra iteration that stores a stopped token's keys and values would reach.
- **oracle + k** (declared 2026-12-06 00:45 UTC, after the oracle's first run on seed 0 solved 0 % of the 2x
  test strings: a token whose answer is right already is not yet the state the tokens after it need): each
  token runs k more loops than the oracle's, at most N, k from ``MARGINS``, the smallest k whose val accuracy
  is within 1 point of N's (else the most accurate) chosen on val and reported on test.

- **finer buckets** (``--compact-shares``, declared 2026-12-06 04:10 UTC before its first run, after the records
  above showed executing 32-35 token-iterations per token for 20-24 run): the same rules with the compacted
  buffers at other shares of the batch's rows and tokens (`Plan.compact_shares`; the library's are 1, 2, 4, 8). The
  setting run: 1, 1.5, 2, 3, 4, 6, 8, 16, to see how much of the executed-minus-run slack is the buckets' coarseness
  (the rest: the iteration that stores a stopped token's keys and values, and BOS held to N). Results go to
  ``exit_oracle_shares.{md,json}`` in ``--out``.

- **row oracle** (declared 2026-12-07 03:00 UTC, before its first run, after the maze3 context_diff record showed
  that stopping each maze as a whole, which context_diff does on the bidirectional model, saved nothing on seed 0):
  every token of a row (a maze, a string) stops at the row's count, the first n <= N from which every answer of
  the row is right at every count up to N (the largest of its tokens' oracle counts; a row wrong at N runs N). The
  rows do not read each other, so its accuracy is N's by construction (measured all the same, compacted), and its
  no-slack ratio is the least any stop that ends whole rows, knowing the labels, could reach at N's accuracy.

Columns: test accuracy, mean loops per real token, executed token-iterations per real token, executed FLOPs per
token (`loopformer.flops`, as bench/adaptive.py counts them) and their ratio to N's, wall-clock per token at
batch 64 (the faster of two passes) and its ratio.

    python bench/exit_oracle.py [--tasks prefix_parity,maze3] [--seeds 3] [--compact-shares 1,2,4,8] [--out DIR] [--json]

``--out`` must hold (or will get) bench/adaptive.py's looped runs: give the same ``--out`` to reuse them.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopformer.errors import PlanError, unplain_digits
from loopformer.evaluation.evaluator import evaluator_for
from loopformer.flops import FlopCounter
from loopformer.model.plan import COMPACT_SHARES, checked_shares, make_plan
from loopformer.model.transformer import forward_batch
from loopformer.runs.log import progress

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

_spec = importlib.util.spec_from_file_location("adaptive", Path(__file__).with_name("adaptive.py"))
adaptive = importlib.util.module_from_spec(_spec)
sys.modules["adaptive"] = adaptive
_spec.loader.exec_module(adaptive)
think_longer = adaptive.think_longer

DIFFICULTY = "2x"  # the bar's
MARGINS = (0, 1, 2, 3, 4, 6, 8, 12, 16)  # oracle + k


def right_by_count(model, params, batches: list, counts: int) -> np.ndarray:  # noqa: ANN001
    """bool [counts, N, T]: is each token's argmax its target after n = 1..counts loops (fixed counts)."""
    graphdef, names = nnx.graphdef(model), model.circuit_names

    @jax.jit
    def right(p, batch, n):  # noqa: ANN001, ANN202
        logits, _ = forward_batch(nnx.merge(graphdef, p), batch, make_plan(names, {"X": n}))
        return jnp.argmax(logits, -1) == batch["targets"]

    return np.stack([np.concatenate([np.asarray(right(params, b, n)) for b in batches])
                     for n in progress(range(1, counts + 1), "counts", total=counts)])


def oracle_counts(right_nNT: np.ndarray, mask_NT: np.ndarray, best: int) -> np.ndarray:
    """int [N, T]: per token, the first n <= best from which it is right at every count up to best (best when it
    is wrong at best or has no answer). ``right_nNT[n - 1]`` is the prediction after n loops."""
    upto = right_nNT[:best]
    # stays[n-1]: right at n and at every later count up to best (a reversed running AND)
    stays = np.flip(np.logical_and.accumulate(np.flip(upto, 0), 0), 0)
    first = np.where(stays.any(0), best - stays.sum(0) + 1, best)  # stays is False..False True..True along n
    return np.where(mask_NT > 0, first, best).astype(np.int32)


def row_counts(first_NT: np.ndarray, mask_NT: np.ndarray) -> np.ndarray:
    """int [N, T]: every token of a row at the row's count, the largest ``first_NT`` over its answered tokens
    (``mask_NT`` > 0); a row without answers keeps its tokens' counts."""
    answered = mask_NT > 0
    row = np.where(answered, first_NT, 0).max(1, keepdims=True)
    return np.where(answered.any(1, keepdims=True), np.broadcast_to(row, first_NT.shape), first_NT).astype(np.int32)


def scored(ev, params, batches: list, cfg, vocab: int, loops: list[dict], compact: bool | None,  # noqa: ANN001
           shares: tuple[float, ...] | None = None) -> dict:
    """Accuracy, loops, executed work, FLOPs and time per token of per-batch ``loops`` on ``batches`` (compacted in
    buffers of ``shares``: `Plan.compact_shares`, None the library's)."""
    def once() -> dict:
        outs = [ev.examples(params, [b], lp, compact=compact, compact_shares=shares)
                for b, lp in zip(batches, loops, strict=True)]
        return {"correct": np.concatenate([o["correct"] for o in outs]),
                "tokens": [sum(o["histogram"]["X"].values()) for o in outs],
                "hist": [o["histogram"]["X"] for o in outs], "computed": [o["computed_loops"]["X"] for o in outs]}

    once()  # compile and warm outside the timing
    seconds = []
    for _ in range(adaptive.TIMINGS):
        t0 = time.perf_counter()
        out = once()
        seconds.append(time.perf_counter() - t0)
    tokens = sum(out["tokens"])
    computed = sum(c * t for c, t in zip(out["computed"], out["tokens"], strict=True)) / tokens
    loops_sum = sum(int(k) * v for h in out["hist"] for k, v in h.items())
    counter = FlopCounter(cfg.model, vocab, batches[0]["inputs"].shape[1], causal=cfg.model.causal)
    return {"accuracy": float(out["correct"].mean()), "mean_loops": loops_sum / tokens, "computed_loops": computed,
            "flops_per_token": counter.forward({"X": computed}), "seconds_per_token": min(seconds) / tokens}


def run_task(name: str, out: Path, examples: int, seeds: int, shares: tuple[float, ...] | None = None) -> dict:
    setting = think_longer.TASKS[name]
    rows = []
    for seed in range(seeds):
        cfg = think_longer.config(name, "looped", setting.steps[1], out, examples, seed)
        model, params, data = adaptive.trained(cfg, out)
        ev = evaluator_for(model)
        held = adaptive.held_out(data.task, setting, examples, seed)
        sets = {s: held[(DIFFICULTY, s)] for s in adaptive.SPLITS}
        counts = setting.counts()
        acc = {n: float(ev.correct(params, sets["val"], {"X": n}).mean()) for n in counts}
        best = max(counts, key=lambda n: (acc[n], -n))
        row_loops, margins = {}, {}  # the row oracle's and the margins' per-batch counts, per split
        for split in adaptive.SPLITS:  # the oracle reads each set's own labels
            batches = sets[split]
            mask = np.concatenate([np.asarray(b["mask"]) for b in batches])
            first = oracle_counts(right_by_count(model, params, batches, best), mask, best)
            cut = np.cumsum([len(b["inputs"]) for b in batches])[:-1]
            row_loops[split] = [{"X": jnp.asarray(o)} for o in np.split(row_counts(first, mask), cut)]
            for k in MARGINS:
                per_batch = np.split(np.where(mask > 0, np.minimum(first + k, best), best), cut)
                margins[(split, k)] = [{"X": jnp.asarray(o)} for o in per_batch]
        val = {k: float(np.concatenate([ev.examples(params, [b], lp, compact=True, compact_shares=shares)["correct"]
                                        for b, lp in zip(sets["val"], margins[("val", k)], strict=True)]).mean())
               for k in MARGINS}
        near = [k for k in MARGINS if val[k] >= acc[best] - adaptive.WITHIN]
        k = min(near) if near else max(MARGINS, key=lambda k: (val[k], -k))
        batches = sets["test"]
        fixed = scored(ev, params, batches, cfg, model.vocab_size, [{"X": best}] * len(batches), None)
        orc = scored(ev, params, batches, cfg, model.vocab_size, margins[("test", 0)], True, shares)
        orck = scored(ev, params, batches, cfg, model.vocab_size, margins[("test", k)], True, shares)
        rows_ = scored(ev, params, batches, cfg, model.vocab_size, row_loops["test"], True, shares)
        row = {"seed": seed, "difficulty": DIFFICULTY, "best_fixed": best, "best_fixed_val_accuracy": acc[best],
               "fixed": fixed, "oracle": orc,
               "no_slack_ratio": orc["mean_loops"] / best,
               "flops_ratio": orc["flops_per_token"] / fixed["flops_per_token"],
               "time_ratio": orc["seconds_per_token"] / fixed["seconds_per_token"],
               "margin": k, "margin_val_accuracy": val, "oracle_margin": orck,
               "margin_no_slack_ratio": orck["mean_loops"] / best,
               "margin_flops_ratio": orck["flops_per_token"] / fixed["flops_per_token"],
               "margin_time_ratio": orck["seconds_per_token"] / fixed["seconds_per_token"],
               "row_oracle": rows_, "row_no_slack_ratio": rows_["mean_loops"] / best,
               "row_flops_ratio": rows_["flops_per_token"] / fixed["flops_per_token"],
               "row_time_ratio": rows_["seconds_per_token"] / fixed["seconds_per_token"]}
        rows.append(row)
        adaptive.log(f"[{name} seed {seed}] fixed {best}: {100 * fixed['accuracy']:.1f} %; oracle "
                     f"{100 * orc['accuracy']:.1f} % @ {orc['mean_loops']:.1f} loops, FLOPs {row['flops_ratio']:.2f}x; "
                     f"oracle + {k}: {100 * orck['accuracy']:.1f} % @ {orck['mean_loops']:.1f} loops, "
                     f"{orck['computed_loops']:.1f} executed, FLOPs {row['margin_flops_ratio']:.2f}x, "
                     f"time {row['margin_time_ratio']:.2f}x, no slack {row['margin_no_slack_ratio']:.2f}x; row oracle "
                     f"{100 * rows_['accuracy']:.1f} % @ {rows_['mean_loops']:.1f} loops, FLOPs "
                     f"{row['row_flops_ratio']:.2f}x, no slack {row['row_no_slack_ratio']:.2f}x")
    return {"rows": rows}


def markdown(name: str, result: dict) -> str:
    rows = []
    for r in result["rows"]:
        stops = [("oracle", r["oracle"], ""), (f"oracle + {r['margin']} (val)", r["oracle_margin"], "margin_")]
        if "row_oracle" in r:  # records written before it was declared lack it
            stops.append(("row oracle", r["row_oracle"], "row_"))
        for label, o, pre in stops:
            rows.append([r["seed"], f"{r['best_fixed']}: {100 * r['fixed']['accuracy']:.1f}", label,
                         f"{100 * o['accuracy']:.1f}", f"{o['mean_loops']:.1f}", f"{o['computed_loops']:.1f}",
                         f"{r[pre + 'flops_ratio']:.2f}", f"{r[pre + 'time_ratio']:.2f}",
                         f"{r[pre + 'no_slack_ratio']:.2f}"])
    return C.table(f"{name}, {DIFFICULTY}, test: stops that read the labels against the best fixed count",
                   ["seed", "best fixed (val-chosen): test %", "stops", "test %", "loops/token",
                    "executed/token", "FLOPs ratio", "time ratio", "no-slack ratio"], rows)


def compact_shares(p: C.ArgumentParser, text: str) -> tuple[float, ...]:
    """``--compact-shares 1,1.5,2``: distinct finite numbers >= 1, or argparse's one error line naming the flag."""
    if odd := unplain_digits(text):  # float() reads '1_0' as 10 and '٢' as 2 (#27 pass 42)
        p.error(f"--compact-shares {text!r}: {odd}")
    try:  # the library's own check (`make_plan` runs it too), named by the flag
        return checked_shares([float(v) for v in text.split(",")])
    except (ValueError, PlanError) as e:
        why = str(e).split(": ", 1)[1] if isinstance(e, PlanError) else "give comma-separated numbers, e.g. 1,2,4,8"
        p.error(f"--compact-shares {text!r}: {why}")


def main() -> int:
    p = C.ArgumentParser(description=C.about(__doc__))
    p.add_argument("--tasks", default="prefix_parity,maze3", help="comma-separated: prefix_parity, maze3")
    p.add_argument("--out", type=C.out_folder, default="bench_runs/adaptive",
                   help="bench/adaptive.py's run directories; results")
    p.add_argument("--examples", type=int, default=256, help="eval examples per held-out set (think_longer's: 256)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3; >= 1)")
    p.add_argument("--compact-shares", default=None,
                   help="comma-separated buffer shares >= 1 of compacted execution (default: the library's 1,2,4,8)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = p.parse_args()
    C.at_least(p, args, {"--seeds": 1, "--examples": 1})
    C.at_most(p, args, {"--seeds": C.SEEDS, "--examples": C.EXAMPLES})
    names = args.tasks.split(",")
    unknown = [n for n in names if n not in adaptive.TASKS]
    if unknown:
        p.error(f"unknown task {unknown[0]!r} in --tasks; choose from {', '.join(adaptive.TASKS)}")
    C.once(p, "--tasks", names)
    shares = None if args.compact_shares is None else compact_shares(p, args.compact_shares)
    out = Path(args.out)
    stem = "exit_oracle" if shares is None else "exit_oracle_shares"
    C.tasks_replaced(p, out / f"{stem}.json", names)
    kept = adaptive.rows_replaced(out / f"{stem}.json", names, ("looped",), args.seeds)
    if kept:  # a rerun with fewer --seeds replaced the record of more with no word (#27 pass 26)
        p.error(f"--out {out} holds an {stem}.json with rows of {kept}, which this run (seeds 0..{args.seeds - 1}) "
                f"does not score, and its record replaces that one; move {out / f'{stem}.json'} aside, or choose "
                f"another --out")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = {n: run_task(n, out, args.examples, args.seeds, shares) for n in names}
    doc = {"tasks": results, "compact_shares": list(shares or COMPACT_SHARES), "wall_s": time.time() - t0}
    C.report(out, stem, doc,
             "\n\n".join(markdown(n, r) for n, r in results.items()), args.json)
    return 0


if __name__ == "__main__":
    C.run_main(main)
