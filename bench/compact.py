"""Do exited tokens stop costing compute? Compacted against masked inference, one run.

Masked inference runs every token of the batch at every iteration until the batch's slowest token stops;
compacted inference (`Plan.compact`, the default) gathers the tokens still running into a dense buffer
of a few static sizes and reuses the frozen tokens' keys and values (one-block circuits). Both give the
same logits; this measures what the compaction saves.

Model: `configs/quickstart.yaml` (X: one block, loops per difficulty 2n + 4; Y: two blocks at 2 loops, never
compacted) with random weights (kernels ~ N(0, 1/fan_in)): speed does not depend on the weights for
per-token counts, and with random weights the exits fire at scattered iterations. Batches of ``--batch``
parity strings of mixed lengths 1..``--max-bits`` (loops per difficulty: 6..2 * max + 4). Policies:

    auto               X's count per example from its difficulty (`eval --loops X=auto`)
    latent_diff:EPS    per-token exits, capped at the largest auto count

Per policy and mode: mean loops per real token, executed token-iterations per real token (``computed``,
waiting and padding included), seconds per real token (best of --reps, compile excluded), and the
largest |logit difference| between the modes.

    python bench/compact.py [--batch 64] [--max-bits 32] [--width W] [--reps 3] [--json] [--out FILE]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

from loopformer.config import load_config  # noqa: E402
from loopformer.config.schema import MAX_LOOPS  # noqa: E402
from loopformer.data.pipeline import eval_batches  # noqa: E402
from loopformer.data.tasks import make_task  # noqa: E402
from loopformer.errors import LoopformerError  # noqa: E402
from loopformer.model.attend import scores_bytes  # noqa: E402
from loopformer.model.plan import make_plan  # noqa: E402
from loopformer.model.transformer import build_model, forward_batch  # noqa: E402

EXITS = ("latent_diff:0.1", "latent_diff:0.03", "latent_diff:0.01")


def main() -> None:
    p = C.parser(C.about(__doc__))
    p.add_argument("--batch", type=int, default=64, help="examples per batch")
    p.add_argument("--max-bits", type=int, default=32, help="longest parity string (difficulties 1..N, mixed)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (best kept)")
    p.add_argument("--width", type=int, default=0, help="widen the model: X's width W, Y's W / 2, d_model their sum "
                   "(0: the quickstart's 96, 64, 32)")
    args = p.parse_args()
    # every flag before the model is built: 0 or a negative was the library's traceback (--reps 0: an empty min())
    C.at_least(p, args, {"--batch": 1, "--max-bits": 1, "--reps": 1, "--width": 0})
    C.at_most(p, args, {"--reps": C.REPS})
    wide = [] if not args.width else [
        f"model.d_model={args.width + args.width // 2}", f"model.stages.0.circuits.X.width={args.width}",
        f"model.stages.0.circuits.Y.width={args.width // 2}"]
    try:
        cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml", wide)
    except LoopformerError as e:  # e.g. a width whose model is not divisible by the heads
        p.error(f"--width {args.width}: {e} (0 keeps the quickstart's widths)")
    task = make_task(cfg.data.task, **cfg.data.task_args)
    x = next(c for c in cfg.model.circuits() if c.name == "X")
    rule = x.distribution()
    a, b = rule.a, rule.b
    cap = int(round(a * args.max_bits + b))
    # before the examples are built: a huge --max-bits ran out of memory in XLA (or, with a small --batch, ran
    # past the loop limit for hours)
    if cap > MAX_LOOPS:
        p.error(f"--max-bits {args.max_bits}: X runs {a:g} n + {b:g} = {cap:,} loops on the longest string, past the "
                f"limit of {MAX_LOOPS:,}; at most --max-bits {int((MAX_LOOPS - b) // a):,}")
    heads, length = cfg.model.max_heads, task.seq_len
    C.fits_memory(p, "--batch", args.batch, lambda n: scores_bytes(n, length(1), heads),
                  f"attention over {args.batch:,} strings even of 1 bit")
    C.fits_memory(p, "--max-bits", args.max_bits, lambda n: scores_bytes(args.batch, length(n), heads),
                  f"attention over {args.batch:,} strings of {length(args.max_bits):,} tokens")
    try:
        batch = eval_batches(task, "bench", (1, args.max_bits), args.batch, args.batch, 0)[0]
    except LoopformerError as e:
        p.error(f"--max-bits {args.max_bits} / --batch {args.batch}: {e}")
    model = C.random_kernels(build_model(cfg.model, task.vocab_size, 0))
    graphdef, params = nnx.split(model)
    valid = np.asarray(batch["segment_ids"]) > 0 if "segment_ids" in batch else np.ones(batch["inputs"].shape, bool)
    real = float(valid.sum())

    @jax.jit
    def run(params: Any, batch: dict, plan: Any) -> tuple[jax.Array, dict]:
        logits, diag = forward_batch(nnx.merge(graphdef, params), batch, plan.for_batch(batch.get("difficulty")))
        return logits, {n: (r.used, r.computed) for n, r in diag.circuits.items()}

    rows = []
    result: dict[str, Any] = {"bench": "compact", "env": C.environment(), "batch": args.batch, "width": args.width,
                              "params": sum(model.param_counts().values()),
                              "max_bits": args.max_bits, "real_tokens": real, "cap": cap,
                              "weights": "random (kernels ~ N(0, 1/fan_in))", "rows": rows}
    for policy in ("auto", *EXITS):
        logits = {}
        for compact in (True, False):
            if policy == "auto":
                plan = make_plan(["X", "Y"], {"X": cap, "Y": 2}, by_difficulty={"X": (a, b, cap)}, compact=compact)
            else:
                plan = make_plan(["X", "Y"], {"X": cap, "Y": 2}, exits={"X": policy}, compact=compact)
            out, circ = run(params, batch, plan)
            jax.block_until_ready(out)
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                jax.block_until_ready(run(params, batch, plan)[0])
                times.append(time.perf_counter() - t0)
            used, computed = circ["X"]
            logits[compact] = np.asarray(out, np.float32)
            rows.append({"policy": policy, "compact": compact, "mean_loops": float((np.asarray(used) * valid).sum() / real),
                         "computed_loops": float(computed) / real, "seconds_per_token": min(times) / real,
                         "seconds": min(times)})
            C.log(f"{policy} compact={compact}: {rows[-1]['mean_loops']:.2f} loops, {rows[-1]['computed_loops']:.2f} "
                  f"computed, {1e6 * rows[-1]['seconds_per_token']:.2f} us/token", args)
        diff = float(np.abs(logits[True] - logits[False])[valid].max())
        rows[-2]["max_abs_logit_diff"] = rows[-1]["max_abs_logit_diff"] = diff
        rows[-2]["speedup"] = rows[-1]["seconds"] / rows[-2]["seconds"]
        rows[-2]["computed_ratio"] = rows[-2]["computed_loops"] / rows[-1]["computed_loops"]
    body = [[r["policy"], "compacted" if r["compact"] else "masked", r["mean_loops"], r["computed_loops"],
             1e6 * r["seconds_per_token"], r.get("speedup", "-"), r["max_abs_logit_diff"]] for r in rows]
    head = (f"compact: {result['params']:,} parameters, {args.batch} parity strings of 1..{args.max_bits} bits, "
            f"X capped at {cap}, "
            f"{int(real)} real tokens; {result['env']['device_kind']} ({result['env']['backend']})")
    C.emit(result, [head, C.table("X's loops per real token: run, executed (waiting and padding included); "
                                  "speedup = masked / compacted time",
                                  ["policy", "mode", "mean loops", "computed", "us / token", "speedup",
                                   "max |logit diff|"], body)], args)


if __name__ == "__main__":
    C.run_main(main)
