"""Every attention implementation computes the same softmax(QK^T / sqrt(H)) V: causal or not, local
windows, segment masks, grouped-query heads and explicit positions (the decoding cache)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopformer.errors import PlanError
from loopformer.model.attend import attend, resolve


def reference(q, k, v, visible):
    """Plain numpy: visible [B, T, S]; K key/value heads serve N / K query heads each."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, N, H = q.shape
    g = N // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    s = np.where(visible[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def qkv(B=2, T=9, N=4, K=4, H=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (B, T, N, H)), jax.random.normal(keys[1], (B, T, K, H)),
            jax.random.normal(keys[2], (B, T, K, H)))


@pytest.mark.parametrize("impl", ["xla", "einsum"])
@pytest.mark.parametrize("causal,window,kv", [(True, None, 4), (False, None, 4), (True, (2, 0), 4), (False, (1, 1), 2),
                                              (True, None, 1)])
def test_implementations_agree_with_the_reference(impl, causal, window, kv):
    q, k, v = qkv(K=kv)
    T = q.shape[1]
    seg = jnp.asarray([[1] * 5 + [2] * 3 + [0], [1] * 9])
    mask = (seg[:, :, None] == seg[:, None, :])[:, None]
    rel = np.arange(T)[:, None] - np.arange(T)[None, :]
    visible = np.asarray(mask[:, 0]) & ((rel >= 0) if causal else True)
    if window is not None:
        visible &= (rel <= window[0]) & (rel >= -window[1])
    got = attend(q, k, v, mask=mask, causal=causal, window=window, impl=impl)
    np.testing.assert_allclose(got, reference(q, k, v, visible), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "einsum"])
def test_positions_select_the_visible_cache(impl):
    """Decoding: 2 new queries at positions 5 and 6 over a 9-slot cache see slots <= their position."""
    q, k, v = qkv(T=9)
    qp = jnp.asarray([[5, 6], [5, 6]])
    got = attend(q[:, 5:7], k, v, causal=True, impl=impl, q_pos=qp, k_pos=jnp.broadcast_to(jnp.arange(9), (2, 9)))
    want = attend(q[:, :7], k[:, :7], v[:, :7], causal=True, impl="einsum")[:, 5:7]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_auto_is_einsum_on_cpu():
    assert resolve("auto", jnp.float32) == "einsum" and resolve("xla", jnp.float32) == "xla"
    with pytest.raises(PlanError, match="model.attention=cudnn needs an NVIDIA GPU"):
        resolve("cudnn", jnp.bfloat16)


def test_models_with_either_kernel_agree():
    """model.attention changes the kernel, not the function: same parameters, same logits (windows,
    bidirectional attention and padding included)."""
    from loopformer.config import load_config
    from loopformer.model.plan import make_plan
    from loopformer.model.transformer import build_model

    logits = []
    for impl in ("xla", "einsum"):
        cfg = load_config("configs/maze3.yaml", [f"model.attention={impl}"]).model
        model = build_model(cfg, 12, 0)
        toks = jax.random.randint(jax.random.key(0), (2, 16), 0, 12)
        seg = jnp.asarray([[1] * 12 + [0] * 4, [1] * 16])
        logits.append(model(toks, make_plan(["X"], {"X": 3}), segment_ids_BT=seg)[0])
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)
