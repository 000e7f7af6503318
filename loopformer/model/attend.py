"""softmax(Q K^T / sqrt(H)) V, chosen per backend (``model.attention``).

    xla      jax.nn.dot_product_attention's XLA path
    einsum   two einsums and a float32 softmax with one boolean mask (causal, window, segments): on CPU
             the fastest measured (bench/step_profile.py)
    cudnn    cuDNN's fused flash attention (NVIDIA GPUs; bfloat16 / float16 inputs)
    auto     einsum on CPU, cudnn on NVIDIA GPUs when the dtype allows, else xla

Shapes: q [B, T, N, H]; k, v [B, S, K, H] with K dividing N (grouped-query attention: each key/value
head serves N / K query heads); ``mask`` [B, 1, T, S] bool (True = may attend) or None; ``causal``
compares query and key *positions* (``q_pos`` [B, T], ``k_pos`` [B, S]; default 0..T-1 and 0..S-1);
``window`` (left, right) keys within [pos - left, pos + right] (None: unlimited).
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp

from loopformer.errors import PlanError

Array = jax.Array


def scores_bytes(batch: int, length: int, heads: int) -> int:
    """Bytes one attention layer holds at once over ``length`` tokens (a lower bound of a forward pass's peak):
    the [B, heads, T, T] float32 scores and their softmax (about 16 bytes per head and pair, measured on CPU
    with the einsum kernel) and the [B, T, T] mask and relative positions (8 bytes)."""
    return batch * length * length * (16 * heads + 8)


def memory_bytes() -> int:
    """The memory of this process's first device (its allocator's limit on an accelerator; the host's RAM on CPU).
    Only a local device reports its memory (another process's raises)."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except jax.errors.JaxRuntimeError:  # a backend without memory statistics
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def attention_overflow(batch: int, length: int, heads: int) -> str | None:
    """None when attention over ``length`` tokens in batches of ``batch`` fits in half of the device's memory,
    else a phrase saying what it needs (for the caller's one-line error, which names its own fix)."""
    need, memory = scores_bytes(batch, length, heads), memory_bytes()
    if need <= memory // 2:
        return None
    longest = math.isqrt(memory // 2 // scores_bytes(batch, 1, heads))
    return (f"attention over {length:,} tokens in batches of {batch:,} needs about {need / 2**30:,.0f} GiB, more "
            f"than half of this machine's {memory / 2**30:.0f} GiB (at most {longest:,} tokens fit)")


def resolve(impl: str, dtype: jnp.dtype) -> str:
    """The implementation ``auto`` stands for on this backend (others unchanged; cudnn only on a GPU)."""
    backend = jax.default_backend()
    if impl == "cudnn" and backend != "gpu":
        raise PlanError(f"model.attention=cudnn needs an NVIDIA GPU, but JAX runs on {backend}; use auto, xla or einsum")
    if impl != "auto":
        return impl
    if backend == "cpu":
        return "einsum"
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def attend(q: Array, k: Array, v: Array, *, mask: Array | None = None, causal: bool = True,
           window: tuple[int, int] | None = None, impl: str = "einsum", q_pos: Array | None = None,
           k_pos: Array | None = None) -> Array:
    """[B, T, N, H] attention output (see the module docstring)."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if impl in ("xla", "cudnn") and q_pos is None and k_pos is None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, local_window_size=window,
                                            implementation=impl)
    qp = jnp.broadcast_to(jnp.arange(T), (B, T)) if q_pos is None else q_pos
    kp = jnp.broadcast_to(jnp.arange(S), (B, S)) if k_pos is None else k_pos
    rel = qp[:, :, None] - kp[:, None, :]  # [B, T, S]: how far back each key is
    visible = jnp.ones((B, T, S), bool) if mask is None else mask[:, 0]
    if causal:
        visible &= rel >= 0
    if window is not None:
        visible &= (rel <= window[0]) & (rel >= -window[1])
    if impl in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v, mask=visible[:, None], implementation=impl)
    qg = q.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(H))
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(B, T, N, H)


def attend_split(q: Array, *parts: tuple[Array, Array, Array]) -> Array:
    """Attention over several key/value sets at once, as if concatenated, without concatenating them
    (decoding: the cache where it lies, and the new tokens). Each part is (k [B, S_i, K, H], v, visible
    [B, T or 1, S_i] bool); q [B, T, N, H]. One float32 softmax over every part's scores."""
    B, T, N, H = q.shape
    K = parts[0][0].shape[2]
    qg = q.reshape(B, T, K, N // K, H)
    scale = 1.0 / jnp.sqrt(jnp.float32(H))
    scores = [jnp.where(vis[:, None, None], jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(q.dtype),
                                                        preferred_element_type=jnp.float32) * scale,
                        jnp.finfo(jnp.float32).min) for k, _, vis in parts]
    top = jnp.max(jnp.stack([s.max(-1) for s in scores]), axis=0)[..., None]
    weights = [jnp.exp(s - top) for s in scores]
    total = sum(w.sum(-1) for w in weights)[..., None]
    out = sum(jnp.einsum("bkgts,bskh->btkgh", (w / total).astype(q.dtype), v.astype(q.dtype))
              for w, (_, v, _) in zip(weights, parts, strict=True))
    return out.reshape(B, T, N, H)
