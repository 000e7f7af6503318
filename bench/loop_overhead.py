"""What does looping cost? Four measurements, one run.

1. throughput: train-step tokens/s of a looped model (one block looped n times, full backprop k = n)
   vs the same model unrolled into n distinct blocks (a circuit of depth n run once, k = 1): equal
   FLOPs, equal rematerialisation. Also the forward pass (inference) of both. Target
   ``throughput_ratio`` (looped / unrolled, train) >= 0.95.
2. compile time vs loop count n in (1, 8, 64) at fixed truncation k: the scan model compiles one
   program whatever n is (n is a runtime value); the baseline unrolls the loop in Python (n copies
   of the block in the program). ``compile_ratio_64_1`` = compile(n=64) / compile(n=1), target ~1.
3. peak memory of a train step vs n at fixed k (XLA's temp buffer size from
   ``jax.jit(...).lower(...).compile().memory_analysis()``), next to full backprop k = n.
   ``memory_ratio_64_k`` = temp(n=64) / temp(n=k), target ~1 (flat in n).
4. inference sweep over n: one compiled program serves every n (``compiles`` = 1) and time grows
   linearly in n (slope, intercept and R^2 of a least-squares line).

    python bench/loop_overhead.py                 # tiny model, CPU-friendly (< 3 min on 2 cores)
    python bench/loop_overhead.py --json --out bench/results/loop_overhead_cpu.json
    python bench/loop_overhead.py --size small    # GPU / TPU

Timings are the best of interleaved rounds (looped and unrolled alternate, so background load
hits both alike); medians are reported too.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import _common as C
import jax
import numpy as np
from flax import nnx

from loopformer.config import TrainConfig
from loopformer.evaluation.evaluator import evaluator_for
from loopformer.flops import FlopCounter
from loopformer.model import circuit as circuits_module
from loopformer.model.transformer import build_model
from loopformer.train.optim import learning_rate_schedule, make_optimizer
from loopformer.train.step import StepSettings, init_state, make_train_step

COMPILE_LOOPS = (1, 8, 64)
SWEEP_LOOPS = (1, 2, 4, 8, 16, 32, 64)
K = 4  # truncation depth for the compile-time and memory sections


def build(cfg: Any, size: dict[str, Any]) -> tuple[Any, Any, Any]:
    model = build_model(cfg, size["vocab"], 0)
    graphdef, params = nnx.split(model)
    return model, graphdef, nnx.to_pure_dict(params)


def train_step_for(cfg: Any, size: dict[str, Any]) -> tuple[Any, dict[str, Any], Any]:
    model, graphdef, params = build(cfg, size)
    tcfg = TrainConfig(steps=10**6, warmup_steps=10)
    tx = make_optimizer(tcfg)
    step = make_train_step(graphdef, tx, StepSettings(cfg, learning_rate_schedule(tcfg)))
    return step, init_state(params, tx), model


@contextlib.contextmanager
def python_unrolled(n: int):
    """Swap the circuits' loop for a Python for-loop of ``n`` copies of the body (same truncated-
    backprop semantics as `loopformer.model.loop.iterate`: n - k steps without gradient, then k
    rematerialised steps). Active while a function is traced."""
    original = circuits_module.iterate

    def iterate_python(step, consts, h0, n_traced, k, *, bound=0, grad=None):
        # the bench's counts are fixed per run (n is static here): no per-token bound or gradient cap
        del n_traced, bound
        if grad is not None:
            raise ValueError("python_unrolled: a per-step gradient cap (grad) is not modelled by the unrolled baseline")
        h = h0
        if k == 0:
            for _ in range(n):
                h = step(consts, h)
            return h
        free = max(n - k, 0)
        consts_ng = jax.lax.stop_gradient(consts)
        for _ in range(free):
            h = step(consts_ng, h)
        if free:
            h = jax.lax.stop_gradient(h)
        body = jax.checkpoint(step)
        for _ in range(min(n, k)):
            h = body(consts, h)
        return h

    circuits_module.iterate = iterate_python
    try:
        yield
    finally:
        circuits_module.iterate = original


# ----------------------------------------------------------------------------- 1. throughput


def throughput(size: dict[str, Any], peak: dict[str, Any], rounds: int, steps: int, args: Any) -> dict[str, Any]:
    n = size["loops"]
    looped_cfg = C.model_config(size, depth=1, loops=f"fixed({n})", backprop=n)
    unrolled_cfg = C.model_config(size, depth=n, loops="fixed(1)", backprop=1)
    batch = C.synthetic_batch(size)
    tokens = size["batch"] * size["seq"]
    variants: dict[str, dict[str, Any]] = {}
    for name, cfg in (("looped", looped_cfg), ("unrolled", unrolled_cfg)):
        loops = {"X": n if name == "looped" else 1}
        step, state, model = train_step_for(cfg, size)
        t0 = time.perf_counter()
        state, m = step(state, batch)
        C.block(m)
        C.log(f"  {name}: first train step (compile) {time.perf_counter() - t0:.1f}s", args)
        assert int(m["loops/X"]) == loops["X"], m
        evaluator = evaluator_for(model)
        evaluator.evaluate(state["params"], [batch], loops)
        flops = FlopCounter(cfg, size["vocab"], size["seq"])
        variants[name] = {"step": step, "state": state, "evaluator": evaluator, "train": [], "infer": [], "loops": loops,
                          "train_flops_per_token": flops.train(loops), "forward_flops_per_token": flops.forward(loops)}
    for _ in range(rounds):
        for v in variants.values():
            for _ in range(steps):
                t0 = time.perf_counter()
                v["state"], m = v["step"](v["state"], batch)
                C.block(m)
                v["train"].append(time.perf_counter() - t0)
            v["infer"].append(C.timed(lambda v=v: v["evaluator"].evaluate(v["state"]["params"], [batch], v["loops"])))
    out: dict[str, Any] = {"loops": n, "tokens_per_step": tokens}
    for name, v in variants.items():
        tr, inf = C.summary(v["train"]), C.summary(v["infer"])
        out[name] = {
            "train_step": tr, "train_tokens_per_s": tokens / tr["best_s"],
            "infer_batch": inf, "infer_tokens_per_s": tokens / inf["best_s"],
            "train_flops_per_token": v["train_flops_per_token"],
            "forward_flops_per_token": v["forward_flops_per_token"],
            "train_mfu": v["train_flops_per_token"] * tokens / tr["best_s"] / peak["peak_flops"],
        }
    assert abs(out["looped"]["train_flops_per_token"] / out["unrolled"]["train_flops_per_token"] - 1) < 1e-9
    out["throughput_ratio"] = out["looped"]["train_tokens_per_s"] / out["unrolled"]["train_tokens_per_s"]
    out["infer_throughput_ratio"] = out["looped"]["infer_tokens_per_s"] / out["unrolled"]["infer_tokens_per_s"]
    out["throughput_ratio_median"] = (out["unrolled"]["train_step"]["median_s"]
                                      / out["looped"]["train_step"]["median_s"])
    return out


# ----------------------------------------------------------------------------- 2 + 3. compile, memory


def compile_step(cfg: Any, size: dict[str, Any], unroll: int | None = None) -> tuple[float, Any]:
    """(seconds to trace + compile the train step, compiled executable)."""
    step, state, _ = train_step_for(cfg, size)
    batch = C.synthetic_batch(size)
    ctx = python_unrolled(unroll) if unroll else contextlib.nullcontext()
    t0 = time.perf_counter()
    with ctx:
        compiled = step.lower(state, batch).compile()
    return time.perf_counter() - t0, compiled


def temp_bytes(compiled: Any) -> int | None:
    stats = compiled.memory_analysis()
    return None if stats is None else int(stats.temp_size_in_bytes)


def compile_and_memory(size: dict[str, Any], args: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    scan_s, unrolled_s, temps = [], [], {}
    for n in COMPILE_LOOPS:
        cfg = C.model_config(size, loops=f"fixed({n})", backprop=K)
        sec, compiled = compile_step(cfg, size)
        scan_s.append(sec)
        temps[n] = temp_bytes(compiled)
        sec_u, _ = compile_step(cfg, size, unroll=n)
        unrolled_s.append(sec_u)
        C.log(f"  n={n}: compile scan {sec:.1f}s, python-unrolled {sec_u:.1f}s", args)
    compile_out = {"loops": list(COMPILE_LOOPS), "k": K, "scan_s": scan_s, "python_unrolled_s": unrolled_s,
                   "compile_ratio_64_1": scan_s[-1] / scan_s[0],
                   "python_unrolled_compile_ratio_64_1": unrolled_s[-1] / unrolled_s[0]}
    # Memory: n = k as the reference point (also "full backprop" at n = k), and full backprop k = n = 64.
    cfg = C.model_config(size, loops=f"fixed({K})", backprop=K)
    temps[K] = temp_bytes(compile_step(cfg, size)[1])
    full = {K: temps[K], 64: temp_bytes(compile_step(C.model_config(size, loops="fixed(64)", backprop=64), size)[1])}
    C.log(f"  memory: truncated {temps}, full backprop {full}", args)
    loops = sorted(temps)
    memory_out = {"k": K, "loops": loops, "temp_bytes": [temps[n] for n in loops],
                  "full_backprop_loops": sorted(full), "full_backprop_temp_bytes": [full[n] for n in sorted(full)]}
    if temps[K] and temps[64]:
        memory_out["memory_ratio_64_k"] = temps[64] / temps[K]
        memory_out["full_backprop_memory_ratio_64_k"] = full[64] / full[K]
    return compile_out, memory_out


# ----------------------------------------------------------------------------- 4. inference sweep


def sweep(size: dict[str, Any], reps: int, args: Any) -> dict[str, Any]:
    cfg = C.model_config(size, loops="fixed(1)", backprop=K)
    model, _, params = build(cfg, size)
    evaluator = evaluator_for(model)
    batch = C.synthetic_batch(size)
    evaluator.evaluate(params, [batch], {"X": 1})  # compile once
    times = {n: [] for n in SWEEP_LOOPS}
    for _ in range(reps):
        for n in SWEEP_LOOPS:
            times[n].append(C.timed(lambda n=n: evaluator.evaluate(params, [batch], {"X": n})))
    best = np.asarray([min(times[n]) for n in SWEEP_LOOPS])
    ns = np.asarray(SWEEP_LOOPS, np.float64)
    slope, intercept = np.polyfit(ns, best, 1)
    r2 = 1 - np.sum((best - (slope * ns + intercept)) ** 2) / np.sum((best - best.mean()) ** 2)
    tokens = size["batch"] * size["seq"]
    C.log(f"  sweep: {evaluator.compiles} compile(s)", args)
    return {"loops": list(SWEEP_LOOPS), "best_s": best.tolist(), "tokens_per_s": (tokens / best).tolist(),
            "compiles": evaluator.compiles, "slope_s_per_loop": float(slope), "intercept_s": float(intercept),
            "r2": float(r2)}


# ----------------------------------------------------------------------------- main


def main() -> None:
    p = C.parser(C.about(__doc__))
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (throughput)")
    p.add_argument("--steps", type=int, default=3, help="train steps per variant per round")
    p.add_argument("--skip", nargs="*", default=[], choices=["throughput", "compile", "sweep"])
    args = p.parse_args()
    C.at_least(p, args, {"--rounds": 1, "--steps": 1})
    C.at_most(p, args, {"--rounds": C.REPS, "--steps": C.TIMED_STEPS})
    C.once(p, "--skip", args.skip)
    if len(args.skip) == 3:  # a document of the environment alone, status 0
        p.error("--skip throughput compile sweep leaves nothing to measure; skip at most two")
    unread = [f"--{d}" for d in ("rounds", "steps") if d in p.given]
    if "throughput" in args.skip and unread:  # accepted and not read (#27 pass 33)
        p.error(f"{' and '.join(unread)} set{'s' if len(unread) == 1 else ''} the throughput timing alone, and --skip "
                f"throughput skips it, so {'it' if len(unread) == 1 else 'they'} would not be used; drop "
                f"{'it' if len(unread) == 1 else 'them'}, or measure the throughput")
    size = dict(C.SIZES[args.size])
    t_start = time.perf_counter()
    result: dict[str, Any] = {"bench": "loop_overhead", "size": args.size, "preset": size, "env": C.environment()}
    result["peak"] = peak = C.peak(size)
    tables = []
    if "throughput" not in args.skip:
        C.log("throughput: looped vs unrolled", args)
        t = result["throughput"] = throughput(size, peak, args.rounds, args.steps, args)
        rows = [[name, t[name]["train_step"]["best_s"] * 1e3, t[name]["train_step"]["median_s"] * 1e3,
                 t[name]["train_tokens_per_s"], t[name]["train_mfu"], t[name]["infer_tokens_per_s"]]
                for name in ("looped", "unrolled")]
        tables.append(C.table(
            f"1. throughput, n={t['loops']} (looped: 1 block x {t['loops']} loops; unrolled: {t['loops']} distinct blocks; "
            f"equal FLOPs)\n   throughput_ratio (train, best) = {t['throughput_ratio']:.3f}  [target >= 0.95]; "
            f"median-based {t['throughput_ratio_median']:.3f}; inference {t['infer_throughput_ratio']:.3f}",
            ["model", "train step best ms", "median ms", "train tok/s", "MFU", "infer tok/s"], rows))
    if "compile" not in args.skip:
        C.log("compile time and memory vs loop count", args)
        comp, mem = compile_and_memory(size, args)
        result["compile"], result["memory"] = comp, mem
        rows = [[n, a, b] for n, a, b in zip(comp["loops"], comp["scan_s"], comp["python_unrolled_s"], strict=True)]
        tables.append(C.table(
            f"2. train-step compile seconds vs loop count (k={K})\n   compile_ratio_64_1 = {comp['compile_ratio_64_1']:.2f} "
            f"(scan, target ~1); python-unrolled {comp['python_unrolled_compile_ratio_64_1']:.2f}",
            ["loops n", "scan (ours) s", "python-unrolled s"], rows))
        mib = lambda b: None if b is None else b / 2**20  # noqa: E731
        full = dict(zip(mem["full_backprop_loops"], mem["full_backprop_temp_bytes"], strict=True))
        rows = [[n, mib(b), mib(full.get(n)) if n in full else "-"] for n, b in zip(mem["loops"], mem["temp_bytes"],
                                                                                  strict=True)]
        rows += [[n, "-", mib(b)] for n, b in full.items() if n not in mem["loops"]]
        tables.append(C.table(
            f"3. train-step temp memory (MiB, XLA memory_analysis) vs loop count\n   memory_ratio_64_k = "
            f"{mem.get('memory_ratio_64_k', float('nan')):.3f} (truncated k={K}, target ~1); full backprop "
            f"{mem.get('full_backprop_memory_ratio_64_k', float('nan')):.2f}",
            ["loops n", f"truncated k={K}", "full backprop k=n"], sorted(rows, key=lambda r: r[0])))
    if "sweep" not in args.skip:
        C.log("inference sweep", args)
        s = result["sweep"] = sweep(size, 3, args)
        rows = [[n, b * 1e3, tps] for n, b, tps in zip(s["loops"], s["best_s"], s["tokens_per_s"], strict=True)]
        tables.append(C.table(
            f"4. inference sweep: {s['compiles']} compile(s); time = {s['intercept_s'] * 1e3:.2f} ms + "
            f"{s['slope_s_per_loop'] * 1e3:.3f} ms x n (R^2 = {s['r2']:.4f})",
            ["loops n", "batch ms", "tok/s"], rows))
    result["seconds"] = time.perf_counter() - t_start
    env = result["env"]
    tables.insert(0, f"loop_overhead --size {args.size}: {env['device_count']} x {env['device_kind']} "
                     f"({env['backend']}), jax {env['jax']}, MFU peak {peak['peak_flops']:.3e} FLOP/s ({peak['source']}); "
                     f"{result['seconds']:.0f}s")
    C.emit(result, tables, args)


if __name__ == "__main__":
    C.run_main(main)
