"""Loop mechanics: run a weight-tied step a *runtime* number of times, sample that number, and
measure what the iterations do to the state.

The loop count ``n`` is a traced int32, never a Python constant, so one compiled program serves
every count. Truncated backprop (depth ``k``, static) splits the loop in two:

    h <- step(h)   n - k times   in lax.fori_loop, under stop_gradient   (memory O(1) in n)
    h <- step(h)   k times       in lax.scan with jax.checkpoint          (memory O(k))

When n < k the scan masks its surplus steps (h passes through unchanged), so exactly n steps run.
With k = 0 the whole loop is a fori_loop (inference: any n in 1..1000, one program).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from loopformer.config.loops import LoopDistribution

Array = jax.Array
PyTree = Any

# ----------------------------------------------------------------------------- sampling


def sample_count(dist: LoopDistribution, key: Array) -> Array:
    """One draw of ``dist`` as an int32 scalar (jit-friendly), clipped to [1, dist.cap]."""
    if dist.kind == "fixed":
        n = jnp.asarray(int(dist.a), jnp.int32)
    elif dist.kind == "uniform":
        n = jax.random.randint(key, (), int(dist.a), int(dist.b) + 1, dtype=jnp.int32)
    else:
        k_tau, k_n = jax.random.split(key)
        tau = jnp.log(dist.a) - dist.b**2 / 2 + dist.b * jax.random.normal(k_tau, ())
        n = jax.random.poisson(k_n, jnp.exp(tau), dtype=jnp.int32) + 1
    return jnp.clip(n, 1, dist.cap).astype(jnp.int32)


def sample_loops(dists: Mapping[str, LoopDistribution], seed: int | Array, step: int | Array) -> dict[str, Array]:
    """Loop counts of every circuit at a training step, {name: int32 []}.

    A pure function of (seed, step, the circuit's position in ``dists``): every host draws the same
    counts, and a resumed run replays exactly the counts of the run it continues.
    """
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0x100F), seed), step)
    return {name: sample_count(d, jax.random.fold_in(key, i)) for i, (name, d) in enumerate(dists.items())}


# ----------------------------------------------------------------------------- iteration

StepFn = Callable[[PyTree, Array], Array]


def iterate(step: StepFn, consts: PyTree, h0: Array, n: Array, k: int) -> Array:
    """h_n = step^n(h0), with gradient through the last ``min(n, k)`` steps only.

    Args:
      step: ``step(consts, h) -> h``, the weight-tied loop body. Everything it closes over must be
        in ``consts`` so the no-gradient part can cut it explicitly.
      consts: pytree of arrays the body reads (weights, the injected input e).
      h0: initial state, any shape.
      n: int32 scalar loop count (traced).
      k: static truncation depth; 0 means "no gradient needed" (a single fori_loop).
    """
    n = jnp.asarray(n, jnp.int32)
    if k == 0:
        return jax.lax.fori_loop(0, n, lambda _, h: step(consts, h), h0)
    n_free = jnp.maximum(n - k, 0)
    consts_ng = jax.lax.stop_gradient(consts)
    h = jax.lax.fori_loop(0, n_free, lambda _, h: step(consts_ng, h), jax.lax.stop_gradient(h0))
    # Keep h0's gradient path when nothing ran without gradient (n <= k): h0 enters the scan directly.
    h = jnp.where(n_free > 0, jax.lax.stop_gradient(h), h0)
    body = jax.checkpoint(step)
    n_grad = jnp.minimum(n, k)

    def grad_step(h: Array, i: Array) -> tuple[Array, None]:
        return jnp.where(i < n_grad, body(consts, h), h), None

    return jax.lax.scan(grad_step, h, jnp.arange(k))[0]


# ----------------------------------------------------------------------------- diagnostics

TRACE_STATS = ("rel_change", "state_norm", "token_cosine")


def state_stats(h_prev: Array, h: Array, real_BT: Array | None = None) -> Array:
    """[3] diagnostics of one iteration for a state h: [B, T, W], over the real tokens (``real_BT``
    [B, T] bool, default all; padding states never reach an output, so they do not count):

    - rel_change: mean over tokens of ||h_i - h_{i-1}|| / max(||h_i||, ||h_{i-1}||) (in [0, 2];
      equals ||h_i - h_{i-1}|| / ||h_{i-1}|| near a fixed point, and stays finite from a zero start);
    - state_norm: mean per-token norm ||h_i||;
    - token_cosine: mean cosine similarity between distinct tokens of a sequence (1 = collapse).
    """
    h, h_prev = h.astype(jnp.float32), h_prev.astype(jnp.float32)
    w_BT = jnp.ones(h.shape[:-1], jnp.float32) if real_BT is None else real_BT.astype(jnp.float32)
    count = jnp.maximum(w_BT.sum(), 1.0)
    norm = jnp.linalg.norm(h, axis=-1)
    denom = jnp.maximum(jnp.maximum(norm, jnp.linalg.norm(h_prev, axis=-1)), 1e-12)
    rel = jnp.sum(w_BT * jnp.linalg.norm(h - h_prev, axis=-1) / denom) / count
    u = w_BT[..., None] * h / jnp.maximum(norm, 1e-12)[..., None]
    T_B = w_BT.sum(-1)
    total_B = jnp.sum(jnp.sum(u, axis=-2) ** 2, axis=-1)  # ||sum_t u_t||^2 = T + sum_{s != t} cos
    cos = jnp.mean((total_B - T_B) / jnp.maximum(T_B * (T_B - 1), 1.0))
    return jnp.stack([rel, jnp.sum(w_BT * norm) / count, cos])


def iterate_traced(step: StepFn, consts: PyTree, h0: Array, n: Array, trace_len: int,
                   real_BT: Array | None = None) -> tuple[Array, Array]:
    """Like ``iterate(..., k=0)`` but also records `state_stats` (over ``real_BT`` tokens) of
    iterations 1..trace_len: returns (h_n, trace [trace_len, 3]); rows past n are NaN."""
    trace0 = jnp.full((trace_len, len(TRACE_STATS)), jnp.nan, jnp.float32)

    def body(i: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        h, trace = carry
        h_new = step(consts, h)
        row = state_stats(h, h_new, real_BT)
        trace = jax.lax.dynamic_update_slice(trace, row[None], (jnp.minimum(i, trace_len - 1), 0))
        trace = jnp.where(i < trace_len, trace, carry[1])
        return h_new, trace

    return jax.lax.fori_loop(0, jnp.asarray(n, jnp.int32), body, (h0, trace0))
