"""Model FLOPs utilisation of the real train step of a looped model with sampled loop counts.

Model: prelude -> [(X1)^n ⊕ (Y1∘Y2)^m] -> coda, two half-width circuits; n ~ uniform(loops/2, loops)
with truncation k=4, m ~ uniform(2, 4) with k=2 (the quickstart shape at the chosen size).

FLOPs come from `loopformer.flops.FlopCounter` at the loop counts each step actually sampled:
MFU counts useful work (forward of every iteration, backward of the last min(n, k)); HFU adds what
the step executes on top (masked surplus gradient iterations when n < k and the jax.checkpoint
recompute). Denominator: on CPU a large matmul measured in the same run; on GPU/TPU the datasheet
peak (bf16 dense for bfloat16 models, TF32 for float32 models on NVIDIA), see
`loopformer.flops.DATASHEET_PEAKS`. The analytic forward count is cross-checked against XLA's
``cost_analysis()`` (loops = 1 and depth 1, since XLA counts a loop body once; attention counted
non-causally, as XLA computes it).

    python bench/mfu.py [--size tiny|small|medium] [--steps 10] [--json] [--out FILE]
"""

from __future__ import annotations

import time
from typing import Any

import _common as C
import jax
import numpy as np
from flax import nnx

from loopformer.config import TrainConfig, load_config
from loopformer.flops import FlopCounter
from loopformer.model.plan import make_plan
from loopformer.model.transformer import build_model
from loopformer.train.optim import learning_rate_schedule, make_optimizer
from loopformer.train.step import StepSettings, init_state, make_train_step


def looped_config(size: dict[str, Any], loops: str | None = None, loops_y: str = "uniform(2, 4)") -> Any:
    d, h, n = size["d_model"], size["heads"], size["loops"]
    w, hw = d // 2, max(1, h // 2)
    x_loops = loops or f"uniform({max(1, n // 2)}, {n})"
    stage = (f"[{{circuits: [{{name: X, depth: 1, width: {w}, heads: {hw}, loops: '{x_loops}', backprop: 4}}, "
             f"{{name: Y, depth: 2, width: {w}, heads: {hw}, loops: '{loops_y}', backprop: 2}}]}}]")
    return load_config(None, [f"model.d_model={d}", f"model.heads={h}", "model.prelude=1", "model.coda=1",
                              f"model.compute_dtype={size['dtype']}", f"model.stages={stage}"]).model


def cross_check(size: dict[str, Any]) -> dict[str, float]:
    """XLA's cost analysis counts a loop body once (it does not know trip counts), so the check runs
    every loop once and every stack at depth 1; XLA also counts elementwise work (norms, softmax,
    RoPE), so expect analytic / XLA slightly below 1."""
    cfg = looped_config(size, loops="fixed(1)", loops_y="fixed(1)")
    for c in cfg.stages[0].circuits:
        c.eval_loops, c.depth = 1, 1
    graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(cfg, size["vocab"], 0)))
    tokens = jax.ShapeDtypeStruct((size["batch"], size["seq"]), np.int32)
    plan = make_plan([c.name for c in cfg.circuits()], {c.name: 1 for c in cfg.circuits()})
    fwd = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t, plan)[0])
    xla = float(fwd.lower(params, tokens).compile().cost_analysis()["flops"])
    ours = FlopCounter(cfg, size["vocab"], size["seq"], causal=False).forward() * size["batch"] * size["seq"]
    return {"analytic_forward_flops": ours, "xla_forward_flops": xla, "ratio": ours / xla}


def main() -> None:
    p = C.parser(C.about(__doc__))
    p.add_argument("--steps", type=int, default=10, help="timed train steps (after one compile step)")
    args = p.parse_args()
    C.at_least(p, args, {"--steps": 1})  # 0: a division by zero after the compile
    C.at_most(p, args, {"--steps": C.TIMED_STEPS})
    size = dict(C.SIZES[args.size])
    t_start = time.perf_counter()
    result: dict[str, Any] = {"bench": "mfu", "size": args.size, "preset": size, "env": C.environment()}
    peak = result["peak"] = C.peak(size)
    cfg = looped_config(size)
    model = build_model(cfg, size["vocab"], 0)
    graphdef, params = nnx.split(model)
    tcfg = TrainConfig(steps=10**6, warmup_steps=10)
    tx = make_optimizer(tcfg)
    names = model.circuit_names
    step = make_train_step(graphdef, tx, StepSettings(cfg, learning_rate_schedule(tcfg)))
    state = init_state(nnx.to_pure_dict(params), tx)
    batch = C.synthetic_batch(size)
    t0 = time.perf_counter()
    state, m = step(state, batch)
    C.block(m)
    compile_s = time.perf_counter() - t0
    C.log(f"compile + first step {compile_s:.1f}s", args)
    counter = FlopCounter(cfg, size["vocab"], size["seq"])
    tokens = size["batch"] * size["seq"]
    rows = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        m = jax.device_get(m)
        dt = time.perf_counter() - t0
        loops = [int(m[f"loops/{n}"]) for n in names]
        mf, hf = counter.train(loops) * tokens, counter.train(loops, hardware=True) * tokens
        rows.append({"loops": loops, "seconds": dt, "tokens_per_s": tokens / dt, "model_flops": mf,
                     "hardware_flops": hf, "mfu": mf / dt / peak["peak_flops"], "hfu": hf / dt / peak["peak_flops"]})
    total_t = sum(r["seconds"] for r in rows)
    result.update({
        "compile_s": compile_s, "steps": rows,
        "tokens_per_s": tokens * len(rows) / total_t,
        "achieved_model_flops_per_s": sum(r["model_flops"] for r in rows) / total_t,
        "achieved_hardware_flops_per_s": sum(r["hardware_flops"] for r in rows) / total_t,
        "params": sum(model.param_counts().values()),
        "forward_flops_per_token_at_eval_loops": counter.forward(),
    })
    result["mfu"] = result["achieved_model_flops_per_s"] / peak["peak_flops"]
    result["hfu"] = result["achieved_hardware_flops_per_s"] / peak["peak_flops"]
    result["cross_check"] = cc = cross_check(size)
    # XLA's GPU cost analysis leaves out the matmuls it hands to cuBLAS (custom calls): on an H200 it gave
    # 8.5x (small) and 602x (medium) fewer FLOPs than the matmuls alone, so the check means something on CPU only
    cc["valid"] = jax.devices()[0].platform == "cpu"
    result["seconds"] = time.perf_counter() - t_start
    env = result["env"]
    head = (f"mfu --size {args.size}: {env['device_count']} x {env['device_kind']} ({env['backend']}), "
            f"params {result['params']:,}, batch {size['batch']} x seq {size['seq']}, {size['dtype']}\n"
            f"peak {peak['peak_flops']:.3e} FLOP/s ({peak['source']}; measured matmul "
            f"{peak['measured_matmul_flops']:.3e})")
    step_rows = [[",".join(map(str, r["loops"])), r["seconds"] * 1e3, r["tokens_per_s"], r["model_flops"] / r["seconds"],
                  r["mfu"], r["hfu"]] for r in rows]
    tables = [head, C.table(f"train steps (loops X,Y sampled per step); overall MFU {result['mfu']:.3f}, "
                            f"HFU {result['hfu']:.3f}, {result['tokens_per_s']:,.0f} tok/s",
                            ["loops X,Y", "ms", "tok/s", "model FLOP/s", "MFU", "HFU"], step_rows),
              C.table("analytic vs XLA forward FLOPs (loops=1, depth 1, non-causal attention; XLA adds elementwise ops)"
                      + ("" if cc["valid"] else "; NOT A CHECK on this backend: XLA's count leaves out library matmuls"),
                      ["analytic", "XLA cost_analysis", "ratio"],
                      [[cc["analytic_forward_flops"], cc["xla_forward_flops"], cc["ratio"]]])]
    C.emit(result, tables, args)


if __name__ == "__main__":
    C.run_main(main)
