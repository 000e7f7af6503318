"""Where a train step's time goes: each part of a block forward + backward against the backend's own
ceiling for its FLOPs (the same matmuls, alone, timed in the same run), and the whole train step's
tokens/s at several loop counts.

Default shape (``--size huginn``): the recurrent-depth peer's at small scale: width 256, 4 heads, SwiGLU
1024, sandwich norm, (prelude, core, coda) = (2, 2, 2) blocks, concat injection, noise-initialised state,
batch 32 x 128 bytes, fixed r with gradient through the last 4.

    python bench/step_profile.py [--size huginn] [--loops 4,8,16] [--reps 5] [--json] [--out FILE]

JSON: {"parts": [{"part", "ms", "ceiling_ms", "ratio", "flops"}], "steps": [{"loops", "tokens_per_s", "ms"}],
       "attention": {impl: ms}, "matmul_4096_gflops": float, ...}
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

from loopformer.config import TrainConfig, load_config  # noqa: E402
from loopformer.config.schema import MAX_LOOPS  # noqa: E402
from loopformer.model.layers import MLP, Attention, BlockSettings  # noqa: E402
from loopformer.model.transformer import build_model  # noqa: E402
from loopformer.train.optim import learning_rate_schedule, make_optimizer  # noqa: E402
from loopformer.train.step import StepSettings, init_state, make_train_step  # noqa: E402
from loopformer.variants.position import rope  # noqa: E402

Array = jax.Array
PRESETS = {"huginn": dict(width=256, heads=4, hidden=1024, batch=32, seq=128, vocab=259, prelude=2, depth=2, coda=2),
           "tiny": dict(width=64, heads=4, hidden=256, batch=8, seq=64, vocab=259, prelude=1, depth=1, coda=1)}


def best(fn: Any, *args: Any, reps: int) -> float:
    """Best wall seconds of ``fn(*args)`` over ``reps`` runs (after one compile run)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times)


def fwd_bwd(f: Any) -> Any:
    """jit(grad) of sum(f(params, x)) w.r.t. both: the forward and the backward of one part."""
    return jax.jit(jax.grad(lambda p, x: jnp.sum(f(p, x).astype(jnp.float32)), argnums=(0, 1)))


def matmuls(shapes: list[tuple[int, int, int, int]]) -> tuple[Any, list[Array]]:
    """The ceiling of a part: its matmuls alone ([g, m, k] x [g, k, n] each), forward + backward, and
    random inputs for them."""
    def f(xs: list[Array], ws: list[Array]) -> Array:
        return sum(jnp.sum(jnp.einsum("gmk,gkn->gmn", x, w)) for x, w in zip(xs, ws, strict=True))

    key = jax.random.key(1)
    xs = [jax.random.normal(key, (g, m, k)) for g, m, k, _ in shapes]
    ws = [jax.random.normal(key, (g, k, n)) for g, _, k, n in shapes]
    return jax.jit(jax.grad(f, argnums=(0, 1))), [xs, ws]


def part_rows(s: dict[str, int], reps: int) -> tuple[list[dict], dict[str, float]]:
    B, T, W, N, F = s["batch"], s["seq"], s["width"], s["heads"], s["hidden"]
    H, BT = W // N, s["batch"] * s["seq"]
    key = jax.random.key(0)
    x = jax.random.normal(key, (B, T, W))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    rngs = nnx.Rngs(0)
    rows, attn_times = [], {}

    def module_part(name: str, module: nnx.Module, call: Any, flops: float,
                    shapes: list[tuple[int, int, int, int]]) -> None:
        graphdef, state = nnx.split(module)
        f = fwd_bwd(lambda st, xx: call(nnx.merge(graphdef, st), xx))
        t = best(f, state, x, reps=reps)
        if shapes:
            g, inputs = matmuls(shapes)
            ceiling = best(g, *inputs, reps=reps)
        else:
            ceiling = float("nan")
        rows.append({"part": name, "ms": 1e3 * t, "ceiling_ms": 1e3 * ceiling, "ratio": t / ceiling if shapes else None,
                     "flops": 3 * flops})

    attn = Attention(W, N, BlockSettings(), rngs=rngs)
    attn_flops = 2 * BT * W * 4 * W + 4 * B * N * T * T * H
    module_part("attention (qkv, RoPE, softmax(QK^T)V, out)", attn, lambda m, xx: m(xx, pos, None), attn_flops,
                [(1, BT, W, 3 * W), (1, BT, W, W), (B * N, T, H, T), (B * N, T, T, H)])
    for impl in ("xla", "einsum"):
        attn_times[impl] = 1e3 * best(fwd_bwd(lambda st, xx, impl=impl: _attention(impl, nnx.merge(
            nnx.graphdef(attn), st), xx, pos)), nnx.state(attn), x, reps=reps)
    mlp = MLP(W, F, BlockSettings(swiglu=True), rngs=rngs)
    module_part("MLP (SwiGLU)", mlp, lambda m, xx: m(xx), 2 * BT * 3 * W * F, [(1, BT, W, 2 * F), (1, BT, F, W)])
    norm = nnx.RMSNorm(W, rngs=rngs)
    module_part("RMSNorm", norm, lambda m, xx: m(xx), 0.0, [])
    rope_f = fwd_bwd(lambda _, xx: rope(xx.reshape(B, T, N, H), pos, 10000.0))
    rows.append({"part": "RoPE (q or k)", "ms": 1e3 * best(rope_f, jnp.zeros(()), x, reps=reps), "ceiling_ms": float("nan"),
                 "ratio": None, "flops": 0.0})
    adapter = nnx.Linear(2 * W, W, use_bias=False, rngs=rngs)
    module_part("injection (concat adapter)", adapter,
                lambda m, xx: m(jnp.concatenate([xx, xx], axis=-1)), 2 * BT * 2 * W * W, [(1, BT, 2 * W, W)])
    V = s["vocab"]
    emb = nnx.Embed(V, W, rngs=rngs)
    targets = jax.random.randint(key, (B, T), 0, V)

    def logits_loss(m: nnx.Embed, xx: Array) -> Array:
        logits = m.attend(xx)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets)

    module_part("logits + loss (tied head)", emb, logits_loss, 2 * BT * W * V, [(1, BT, W, V)])
    return rows, attn_times


def _attention(impl: str, attn: Attention, x: Array, pos: Array) -> Array:
    """The attention part with one implementation of softmax(QK^T / sqrt(H)) V (causal)."""
    B, T, W = x.shape
    q, k, v = jnp.split(attn.qkv(x).reshape(B, T, 3 * attn.heads, attn.head_dim), 3, axis=2)
    q, k = attn.position(q, pos), attn.position(k, pos)
    if impl == "xla":
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    else:
        scores = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(attn.head_dim)
        scores = jnp.where(jnp.tril(jnp.ones((T, T), bool)), scores, -1e30)
        y = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, axis=-1), v)
    return attn.out(y.reshape(B, T, W))


def step_rows(s: dict[str, int], loops: list[int], reps: int) -> list[dict]:
    rows = []
    B, T = s["batch"], s["seq"]
    for r in loops:
        circuit = (f"{{name: X, depth: {s['depth']}, width: {s['width']}, heads: {s['heads']}, inject: concat, "
                   f"init: noise, loops: 'fixed({r})', max_loops: {max(r, 4)}, eval_loops: {r}, backprop: 4}}")
        cfg = load_config(None, [f"model.d_model={s['width']}", f"model.heads={s['heads']}", "model.norm=sandwich",
                                 "model.mlp=swiglu", f"model.mlp_ratio={s['hidden'] / s['width']}",
                                 f"model.prelude={s['prelude']}", f"model.coda={s['coda']}",
                                 "model.tie_embeddings=false", f"model.stages=[{{circuits: [{circuit}]}}]"]).model
        model = build_model(cfg, s["vocab"], 0)
        graphdef, params = nnx.split(model)
        tcfg = TrainConfig(steps=10**6, warmup_steps=10)
        tx = make_optimizer(tcfg)
        step = make_train_step(graphdef, tx, StepSettings(cfg, learning_rate_schedule(tcfg)))
        state = init_state(nnx.to_pure_dict(params), tx)
        rng = np.random.default_rng(0)
        batch = {"inputs": rng.integers(3, s["vocab"], (B, T), dtype=np.int32),
                 "targets": rng.integers(3, s["vocab"], (B, T), dtype=np.int32), "mask": np.ones((B, T), np.float32)}
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            state, m = step(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        t = min(times)
        rows.append({"loops": r, "ms": 1e3 * t, "tokens_per_s": B * T / t, "median_ms": 1e3 * float(np.median(times))})
    return rows


def optimizer_row(s: dict[str, int], reps: int) -> dict:
    """AdamW (+ clipping, weight-decay mask) on a parameter tree of the model's size."""
    cfg = load_config(None, [f"model.d_model={s['width']}", f"model.heads={s['heads']}", "model.mlp=swiglu",
                             f"model.mlp_ratio={s['hidden'] / s['width']}", f"model.prelude={s['prelude'] + s['coda']}",
                             "model.coda=0", "model.stages=[]"]).model
    params = nnx.to_pure_dict(nnx.state(build_model(cfg, s["vocab"], 0)))
    tx = make_optimizer(TrainConfig(steps=10**6, warmup_steps=10))
    opt = tx.init(params)
    update = jax.jit(lambda p, o, g: optax.apply_updates(p, tx.update(g, o, p)[0]))
    t = best(update, params, opt, params, reps=reps)
    return {"part": "optimizer update (AdamW)", "ms": 1e3 * t, "ceiling_ms": float("nan"), "ratio": None, "flops": 0.0}


def main() -> None:
    p = C.parser(C.about(__doc__))
    size = next(a for a in p._actions if a.dest == "size")  # this bench's own shapes, not _common's sizes
    size.choices, size.default, size.help = sorted(PRESETS), "huginn", "shape: huginn (the peer's) or tiny"
    p.add_argument("--loops", default="4,8,16", help="loop counts r of the train step")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (best kept)")
    args = p.parse_args()
    C.at_least(p, args, {"--reps": 1})
    C.at_most(p, args, {"--reps": C.REPS})
    loops = C.int_list(p, "--loops", args.loops, maximum=(MAX_LOOPS, "the loop limit"))
    s = PRESETS[args.size]
    result: dict[str, Any] = {"bench": "step_profile", "preset": args.size, "shape": s, "env": C.environment()}
    with nnx.use_eager_sharding(False):  # modules built outside build_model carry logical axis names
        parts, attn = part_rows(s, args.reps)
    parts.append(optimizer_row(s, args.reps))
    result["parts"], result["attention"] = parts, attn
    result["matmul_4096_gflops"] = C.measure_matmul_flops(4096, "float32") / 1e9
    result["steps"] = step_rows(s, loops, args.reps)
    tables = [
        C.table(f"block parts, forward + backward (batch {s['batch']} x {s['seq']}, width {s['width']}); ceiling = the "
                f"part's matmuls alone", ["part", "ms", "ceiling ms", "ratio", "model FLOPs"],
                [[r["part"], r["ms"], r["ceiling_ms"], r["ratio"] if r["ratio"] is not None else "-", r["flops"]]
                 for r in parts]),
        C.table("attention implementations (forward + backward, ms)", ["impl", "ms"], [[k, v] for k, v in attn.items()]),
        C.table(f"train step ({s['prelude']}, {s['depth']}, {s['coda']}) blocks, fixed r, gradient through the last 4; "
                f"4096^2 fp32 matmul {result['matmul_4096_gflops']:.0f} GFLOP/s", ["r", "ms", "tokens/s"],
                [[r["loops"], r["ms"], r["tokens_per_s"]] for r in result["steps"]])]
    C.emit(result, tables, args)


if __name__ == "__main__":
    C.run_main(main)
