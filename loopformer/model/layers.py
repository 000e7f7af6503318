"""Transformer building blocks: (causal or bidirectional) attention, MLP, pre-/sandwich-norm block.

Shapes: B batch, T sequence, W width of the stream the block lives in (d_model for prelude and coda,
w_c inside a circuit), N heads, H head dim (W = N * H), F MLP hidden width.

Every kernel carries logical axis names (``sharding`` metadata) so `loopformer.parallel` can map
them onto a device mesh with one rules table; on one device they are inert.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from loopformer.model.attend import attend, attend_split, resolve
from loopformer.variants.position import POSITIONS, Position, RopeScaling

Array = jax.Array


@dataclass(frozen=True)
class BlockSettings:
    """What every block of a model shares (the model config's behaviour, resolved once): MLP kind, norm
    placement, initialisation scales (``out_std`` for residual-branch outputs), dtype, causality, position
    scheme, qkv bias, norm epsilon and the attention implementation."""

    swiglu: bool = False
    sandwich: bool = False
    std: float = 0.02
    out_std: float = 0.02
    dtype: Any = jnp.float32
    causal: bool = True
    position: Position = POSITIONS.get("rope")()
    qkv_bias: bool = False
    norm_eps: float = 1e-6
    attention: str = "auto"

    @staticmethod
    def of(cfg: Any, out_std: float) -> BlockSettings:
        """From a `ModelConfig` and the residual-output scale."""
        return BlockSettings(swiglu=cfg.mlp == "swiglu", sandwich=cfg.norm == "sandwich", std=cfg.init_std,
                             out_std=out_std, dtype=jnp.dtype(cfg.compute_dtype), causal=cfg.causal,
                             position=POSITIONS.get(cfg.position, "model.position")(
                                 cfg.rope_base, RopeScaling.of(cfg.rope_scaling, "model.rope_scaling")),
                             qkv_bias=cfg.qkv_bias, norm_eps=cfg.norm_eps, attention=cfg.attention)


def normal_init(std: float, names: Sequence[str | None]) -> Any:
    """A normal(std) initializer tagged with logical axis names."""
    return nnx.with_partitioning(nnx.initializers.normal(std), tuple(names))


def zeros_init(names: Sequence[str | None]) -> Any:
    return nnx.with_partitioning(nnx.initializers.zeros_init(), tuple(names))


def attention_mask(segment_ids_BT: Array | None) -> Array | None:
    """[B, 1, T, T] mask (True = may attend) that keeps each query inside its segment: a packed
    document, or for padded examples the real tokens (segment >= 1) apart from the padding (segment 0).
    Padding queries see padding keys, themselves included, so no row is empty. Causality and the
    local window are added apart, by the attention call. None (no segment ids): attend everywhere."""
    if segment_ids_BT is None:
        return None
    return (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]


def _shared(kv: tuple[Array, Array], shared: tuple[Array, Array, Array] | None) -> tuple[Array, Array]:
    """A chunk's keys and values, or ``shared`` (k, v, use []) in their place where ``use`` (a cache policy
    reusing an earlier iteration's)."""
    if shared is None:
        return kv
    return tuple(jnp.where(shared[2], s, b) for s, b in zip(shared[:2], kv, strict=True))


class Attention(nnx.Module):
    """Multi-head self-attention with RoPE. Causal by default; ``causal=False`` lets every
    token see the whole (unpadded) sequence, for tasks whose labels sit at input positions.
    ``window`` w >= 1 restricts each query to itself and the w - 1 keys before it (and, when not
    causal, the w - 1 keys after it): sliding-window attention; 0 is no window.

    Grouped-query attention: ``kv_heads`` K (a divisor of N; 0 = N) key/value heads, query head n
    reading key/value head n // (N / K) (Llama's ``repeat_kv``). One fused projection ``qkv``
    [W, (N + 2K) H] holds the queries, keys and values in that order (for K = N: [W, 3W]); ``qkv_bias``
    adds its bias (Qwen2). The output projection has no bias."""

    def __init__(self, width: int, heads: int, s: BlockSettings, *, rngs: nnx.Rngs, window: int = 0,
                 kv_heads: int = 0):
        self.heads, self.head_dim, self.position = heads, width // heads, s.position
        self.impl = resolve(s.attention, s.dtype)  # model.attention, resolved for this backend
        self.kv_heads = kv_heads or heads
        self.window, self.causal = window, s.causal
        kw = dict(dtype=s.dtype, rngs=rngs)
        self.qkv = nnx.Linear(width, (heads + 2 * self.kv_heads) * self.head_dim, use_bias=s.qkv_bias,
                              kernel_init=normal_init(s.std, ("embed", "heads")),
                              bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("heads",)), **kw)
        self.out = nnx.Linear(width, width, use_bias=False, kernel_init=normal_init(s.out_std, ("heads", "embed")), **kw)

    @property
    def _span(self) -> tuple[int, int] | None:
        """``attend``'s window (keys left, keys right) for ``window`` (None: unlimited)."""
        return (self.window - 1, 0 if self.causal else self.window - 1) if self.window else None

    def _qkv(self, x_BTW: Array, positions_BT: Array) -> tuple[Array, Array, Array]:
        """Queries [B, T, N, H] and keys, values [B, T, K, H], the position scheme applied."""
        B, T, _ = x_BTW.shape
        N, K = self.heads, self.kv_heads
        qkv = self.qkv(x_BTW).reshape(B, T, N + 2 * K, self.head_dim)
        q, k, v = qkv[:, :, :N], qkv[:, :, N:N + K], qkv[:, :, N + K:]
        return self.position(q, positions_BT), self.position(k, positions_BT), v

    def __call__(self, x_BTW: Array, positions_BT: Array, mask: Array | None) -> Array:
        B, T, W = x_BTW.shape
        q, k, v = self._qkv(x_BTW, positions_BT)
        y_BTNH = attend(q, k, v, mask=mask, causal=self.causal, window=self._span, impl=self.impl)
        return self.out(y_BTNH.reshape(B, T, W))

    def cached(self, x_BtW: Array, positions_Bt: Array, cache: tuple[Array, Array] | None, start_B: Array,
               shared: tuple[Array, Array, Array] | None = None, rope_Bt: Array | None = None
               ) -> tuple[Array, tuple[Array, Array]]:
        """Causal attention of t new tokens at absolute ``positions_Bt`` over earlier tokens' keys and values
        ``cache`` ([B, T, K, H] each, indexed by position; only positions < ``start_B`` [B] are read) and
        the chunk's own. ``shared`` (k, v, use) [B, t, K, H], [] bool: attend to these keys and values of
        the chunk instead of its fresh ones where ``use`` (a cache policy reusing an earlier iteration's).
        ``rope_Bt``: the positions the scheme rotates by, where not ``positions_Bt`` (coupled: digit places).
        Returns (output [B, t, W], the chunk's fresh keys and values [B, t, K, H] for the caller to store)."""
        B, t, W = x_BtW.shape
        q, k, v = self._qkv(x_BtW, positions_Bt if rope_Bt is None else rope_Bt)
        k_own, v_own = _shared((k, v), shared)
        own_visible = self._visible(positions_Bt, positions_Bt)  # [B, t, t] causal within the chunk
        if cache is None:
            y_BtNH = attend(q, k_own, v_own, mask=own_visible[:, None], causal=False, impl="einsum")
        else:  # two key sets, one softmax: the cache is read where it lies (no concatenated copy)
            cache_visible = self._cache_visible(cache[0].shape[1], start_B, positions_Bt)
            y_BtNH = attend_split(q, (cache[0], cache[1], cache_visible), (k_own, v_own, own_visible))
        return self.out(y_BtNH.reshape(B, t, W)), (k, v)

    def _visible(self, q_Bc: Array, k_BT: Array) -> Array:
        """[B, c, T] bool: which of a chunk's own keys (indices ``k_BT``) each query (``q_Bc``) sees: causal,
        and within the window (leading axes broadcast)."""
        visible = k_BT[..., None, :] <= q_Bc[..., :, None]
        if self.window:
            visible &= k_BT[..., None, :] > q_Bc[..., :, None] - self.window
        return visible

    def _cache_visible(self, S: int, start_B: Array, positions_Bc: Array) -> Array:
        """[B, 1 or c, S] bool: which cached positions queries at absolute ``positions_Bc`` see: those before
        the chunk (< ``start_B``), and within the window."""
        cache_pos = jnp.arange(S)[None, None, :]
        visible = cache_pos < start_B[:, None, None]
        if self.window:
            visible = visible & (cache_pos > positions_Bc[:, :, None] - self.window)
        return visible


    def compact(self, x_BcW: Array, positions_Bc: Array, index_Bc: Array | None, kv: tuple[Array, Array],
                write_Bc: Array, mask_B1cT: Array | None, earlier: tuple[Array, Array, Array, Array] | None = None,
                shared: tuple[Array, Array, Array] | None = None) -> tuple[Array, tuple[Array, Array]]:
        """Attention of c gathered tokens over every token of their rows, whose keys and values are ``kv``
        ([B, T, K, H] each). ``index_Bc`` [B, c] are the gathered tokens' sequence indices (T: an empty slot;
        None: c = T, every token in order), ``positions_Bc`` their RoPE positions. First the gathered tokens'
        fresh keys and values are written where ``write_Bc``, so each query sees the other tokens' stored
        ones and the gathered ones' new ones. Causality and the window compare sequence indices, as
        `__call__` does; ``mask_B1cT`` the gathered rows of the segment mask. Returns (output [B, c, W], the
        updated keys and values).

        Cached decoding of a chunk (causal; its T tokens at consecutive positions): ``earlier`` (keys and
        values [B, S, K, H] of earlier positions, start_B [B], the gathered tokens' positions [B, c]) is read
        where a position is < start_B, in one softmax with the chunk's own, as `cached` reads its cache; and
        ``shared`` (keys, values [B, T, K, H], use []) replaces the chunk's (updated) keys and values where
        ``use`` (a cache policy reusing an earlier iteration's), as in `cached`."""
        B, c, W = x_BcW.shape
        T = kv[0].shape[1]
        q, k, v = self._qkv(x_BcW, positions_Bc)
        if index_Bc is None:
            w = write_Bc[..., None, None]
            kv = tuple(jnp.where(w, new.astype(buf.dtype), buf) for buf, new in zip(kv, (k, v), strict=True))
            q_pos = k_pos = None
        else:  # empty slots (index T) fall outside the buffer and are dropped
            rows = jnp.arange(B)[:, None]
            kv = tuple(buf.at[rows, index_Bc].set(new.astype(buf.dtype), mode="drop")
                       for buf, new in zip(kv, (k, v), strict=True))
            q_pos, k_pos = jnp.minimum(index_Bc, T - 1), jnp.broadcast_to(jnp.arange(T), (B, T))
        own = _shared(kv, shared)
        if earlier is not None:
            k_e, v_e, start_B, at_Bc = earlier
            own_visible = self._visible(jnp.arange(T)[None] if q_pos is None else q_pos, jnp.arange(T)[None])
            cache_visible = self._cache_visible(k_e.shape[1], start_B, at_Bc)
            y = attend_split(q, (k_e, v_e, cache_visible), (own[0], own[1], own_visible))
            return self.out(y.reshape(B, c, W)), kv
        impl = "einsum" if self.impl == "einsum" or q_pos is not None else self.impl
        y = attend(q, own[0].astype(q.dtype), own[1].astype(q.dtype), mask=mask_B1cT, causal=self.causal,
                   window=self._span, impl=impl, q_pos=q_pos, k_pos=k_pos)
        return self.out(y.reshape(B, c, W)), kv


    def flat(self, x_N1W: Array, positions_N1: Array, rows_N: Array, index_N: Array, kv: tuple[Array, Array],
             mask_N11T: Array | None) -> tuple[Array, tuple[Array, Array]]:
        """Attention of N gathered tokens taken from any rows: token n is row ``rows_N`` [N], sequence index
        ``index_N`` [N] of the batch whose keys and values are ``kv`` ([B, T, K, H] each); an empty slot has row B
        and index T. First every gathered token's fresh keys and values are written into ``kv``, so each query
        sees the other gathered tokens' new ones, then each attends over its own row's ([N, T, K, H] gathered),
        with causality and the window on sequence indices and ``mask_N11T`` its row of the segment mask, as
        `compact` does for whole rows. With a window narrower than the row, each token reads only the S =
        `flat_span` keys around it ([N, S, K, H]: a window-2 model's tokens read 2 keys, not the row's T).
        Returns (output [N, 1, W], the updated keys and values)."""
        N, _, W = x_N1W.shape
        B, T = kv[0].shape[:2]
        q, k, v = self._qkv(x_N1W, positions_N1)
        kv = tuple(buf.at[rows_N, index_N].set(new[:, 0].astype(buf.dtype), mode="drop")
                   for buf, new in zip(kv, (k, v), strict=True))
        r, q_pos = jnp.minimum(rows_N, B - 1), jnp.minimum(index_N, T - 1)[:, None]
        S = self.flat_span(T)
        if S == T:
            k_pos = jnp.broadcast_to(jnp.arange(T), (N, T))
            own = tuple(buf[r].astype(q.dtype) for buf in kv)
        else:  # the window's keys: sequence indices q - left .. q + right, those off the row never visible
            left = self._span[0]
            k_pos = q_pos - left + jnp.arange(S)  # [N, S]
            at = r[:, None], jnp.clip(k_pos, 0, T - 1)
            own = tuple(buf[at].astype(q.dtype) for buf in kv)
            mask_N11T = None if mask_N11T is None else jnp.take_along_axis(mask_N11T[:, 0, 0], at[1], axis=-1)[:, None, None]
            k_pos = jnp.where((k_pos >= 0) & (k_pos < T), k_pos, -2 * T)  # -2T: past any window's reach
        y = attend(q, *own, mask=mask_N11T, causal=self.causal, window=self._span, impl="einsum",
                   q_pos=q_pos, k_pos=k_pos)
        return self.out(y.reshape(N, 1, W)), kv

    def flat_span(self, T: int) -> int:
        """How many keys of its row one token of a flat buffer reads: the window's span, at most T."""
        return T if self._span is None else min(T, self._span[0] + self._span[1] + 1)


class MLP(nnx.Module):
    """GELU MLP (W -> F -> W) or SwiGLU (gate * up, F hidden)."""

    def __init__(self, width: int, hidden: int, s: BlockSettings, *, rngs: nnx.Rngs):
        self.swiglu = s.swiglu
        kw = dict(use_bias=False, dtype=s.dtype, rngs=rngs)
        self.up = nnx.Linear(width, (2 if s.swiglu else 1) * hidden, kernel_init=normal_init(s.std, ("embed", "mlp")), **kw)
        self.down = nnx.Linear(hidden, width, kernel_init=normal_init(s.out_std, ("mlp", "embed")), **kw)

    def __call__(self, x_BTW: Array) -> Array:
        u = self.up(x_BTW)
        if self.swiglu:
            gate, u = jnp.split(u, 2, axis=-1)
            return self.down(jax.nn.silu(gate) * u)
        return self.down(jax.nn.gelu(u))


class Block(nnx.Module):
    """x + Attn(norm(x)), then + MLP(norm(x)). ``sandwich`` also normalises each sublayer's output
    before it is added (Gemma-2 / Huginn style), which keeps deep unrolls bounded."""

    def __init__(self, width: int, heads: int, hidden: int, s: BlockSettings, *, rngs: nnx.Rngs, window: int = 0,
                 kv_heads: int = 0):
        self.sandwich = s.sandwich
        nk = dict(dtype=s.dtype, rngs=rngs, epsilon=s.norm_eps,
                  scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)))
        self.attn_norm = nnx.RMSNorm(width, **nk)
        self.attn = Attention(width, heads, s, rngs=rngs, window=window, kv_heads=kv_heads)
        self.mlp_norm = nnx.RMSNorm(width, **nk)
        self.mlp = MLP(width, hidden, s, rngs=rngs)
        if self.sandwich:
            self.attn_post_norm = nnx.RMSNorm(width, **nk)
            self.mlp_post_norm = nnx.RMSNorm(width, **nk)

    def __call__(self, x_BTW: Array, positions_BT: Array, mask: Array | None = None) -> Array:
        a = self.attn(self.attn_norm(x_BTW), positions_BT, mask)
        return self._mlp(x_BTW + (self.attn_post_norm(a) if self.sandwich else a))

    def cached(self, x_BtW: Array, positions_Bt: Array, cache: tuple[Array, Array] | None, start_B: Array,
               shared: tuple[Array, Array, Array] | None = None, rope_Bt: Array | None = None
               ) -> tuple[Array, tuple[Array, Array]]:
        """The block on t new tokens with earlier tokens' keys and values (`Attention.cached`)."""
        a, kv = self.attn.cached(self.attn_norm(x_BtW), positions_Bt, cache, start_B, shared, rope_Bt)
        return self._mlp(x_BtW + (self.attn_post_norm(a) if self.sandwich else a)), kv

    def compact(self, x_BcW: Array, positions_Bc: Array, index_Bc: Array, kv: tuple[Array, Array], write_Bc: Array,
                mask_B1cT: Array | None, earlier: tuple[Array, Array, Array, Array] | None = None,
                shared: tuple[Array, Array, Array] | None = None) -> tuple[Array, tuple[Array, Array]]:
        """The block on c gathered tokens over the whole sequence's keys and values, and when decoding the
        cache's (`Attention.compact`)."""
        a, kv = self.attn.compact(self.attn_norm(x_BcW), positions_Bc, index_Bc, kv, write_Bc, mask_B1cT, earlier,
                                  shared)
        return self._mlp(x_BcW + (self.attn_post_norm(a) if self.sandwich else a)), kv

    def flat(self, x_N1W: Array, positions_N1: Array, rows_N: Array, index_N: Array, kv: tuple[Array, Array],
             mask_N11T: Array | None) -> tuple[Array, tuple[Array, Array]]:
        """The block on N gathered tokens of any rows (`Attention.flat`)."""
        a, kv = self.attn.flat(self.attn_norm(x_N1W), positions_N1, rows_N, index_N, kv, mask_N11T)
        return self._mlp(x_N1W + (self.attn_post_norm(a) if self.sandwich else a)), kv

    def _mlp(self, x_BTW: Array) -> Array:
        m = self.mlp(self.mlp_norm(x_BTW))
        return x_BTW + (self.mlp_post_norm(m) if self.sandwich else m)


def stacked(make: Any, count: int, rngs: nnx.Rngs) -> nnx.Module:
    """Build ``count`` independent copies of ``make(rngs)`` with their parameters stacked on a
    new leading axis (one compiled layer body instead of ``count``)."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(r: nnx.Rngs) -> nnx.Module:
        return make(r)

    return build(rngs)


def run_stack(stack: nnx.Module, x_BTW: Array, positions_BT: Array, mask: Array | None,
              schedule: Array | None = None) -> Array:
    """Apply a stacked block module layer by layer (``lax.scan`` over the leading axis).

    ``schedule`` (int32 [S]): run the layers in this order instead, each entry a layer index, -1 a
    skipped step (padding); the entry's weights are gathered from the stack inside the scan, so every
    schedule of length S (any order, repeats, duplications) runs on one compiled program."""
    graphdef, state = nnx.split(stack)

    def layer(x: Array, layer_state: Any) -> tuple[Array, None]:
        return nnx.merge(graphdef, layer_state)(x, positions_BT, mask), None

    if schedule is None:
        return jax.lax.scan(layer, x_BTW, state)[0]

    def scheduled(x: Array, index: Array) -> tuple[Array, None]:
        picked = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, jnp.maximum(index, 0), 0, keepdims=False),
                              state)
        return jax.lax.cond(index >= 0, lambda: layer(x, picked)[0], lambda: x), None

    return jax.lax.scan(scheduled, x_BTW, jnp.asarray(schedule, jnp.int32))[0]


def stack_layers(stack: nnx.Module) -> list[nnx.Module]:
    """The layers of a stacked block module, one module each (their weights sliced from the stack)."""
    graphdef, state = nnx.split(stack)
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
            for i in range(jax.tree.leaves(state)[0].shape[0])]


def run_stack_cached(stack: nnx.Module, x_BtW: Array, positions_Bt: Array,
                     caches: Sequence[tuple[Array, Array]] | None, start_B: Array, rope_Bt: Array | None = None
                     ) -> tuple[Array, list[tuple[Array, Array]]]:
    """`run_stack` on new tokens over earlier tokens' keys and values (one (K, V) [B, T, K, H] per layer,
    or None), layer by layer; ``rope_Bt`` as in `Attention.cached`. Returns (x, the chunk's fresh (k, v)
    [B, t, K, H] per layer)."""
    fresh = []
    for i, block in enumerate(stack_layers(stack)):
        x_BtW, kv = block.cached(x_BtW, positions_Bt, None if caches is None else caches[i], start_B, rope_Bt=rope_Bt)
        fresh.append(kv)
    return x_BtW, fresh
