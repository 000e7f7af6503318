"""The whole model: embed -> prelude -> stages (banks of looped circuits) -> coda -> norm -> head.

    tokens [B, T] -> x [B, T, d_model] -> ... -> logits [B, T, vocab]

How the circuits run (loop counts, gates, fills) is a `Plan`, an argument of the forward pass, so
changing it never changes the compiled program. Padding comes from the batch: tokens of segment 0
are padding (attention keeps real tokens apart from them; statistics skip them).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopformer.config.schema import ModelConfig
from loopformer.errors import PlanError
from loopformer.model.cache import CachePolicy, KVCache, empty_kv, store
from loopformer.model.circuit import Bank, Context
from loopformer.model.layers import Block, attention_mask, normal_init, run_stack, run_stack_cached, stacked
from loopformer.model.plan import Diagnostics, Plan

Array = jax.Array


def effective_depth(cfg: ModelConfig, loops: dict[str, float] | None = None) -> float:
    """Blocks on the longest path at the given loop counts (default: each circuit's eval_loops):
    prelude + sum over stages of max_c(depth_c * n_c) + coda."""
    loops = {**{c.name: c.eval_loops for c in cfg.circuits()}, **(loops or {})}
    core = sum(max(c.depth * loops[c.name] for c in s.circuits) for s in cfg.stages)
    return cfg.prelude + core + cfg.coda


def training_depth(cfg: ModelConfig) -> float:
    """The effective depth at each circuit's mean training loop count."""
    return effective_depth(cfg, {c.name: c.distribution().mean() for c in cfg.circuits()})


class LoopedTransformer(nnx.Module):
    """Transformer whose middle is zero or more banks of looped circuits: a decoder (causal), or with
    ``model.causal: false`` a bidirectional encoder for tasks with labels at input positions.

    Only the architecture and behaviour fields of ``cfg`` shape it; the loop schedule enters once,
    through ``init_depth`` (GPT-2 style: residual-branch outputs shrink with the expected effective
    depth, so a deep unroll starts with a stream of the same scale as a shallow one)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, *, init_depth: float, rngs: nnx.Rngs,
                 batch_circuits: bool = True):
        self.vocab_size = vocab_size
        self.d_model = cfg.d_model
        self.causal = cfg.causal
        self.circuit_names = tuple(c.name for c in cfg.circuits())
        d, dtype = cfg.d_model, jnp.dtype(cfg.compute_dtype)
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * max(init_depth, 0.5))
        common = dict(mlp=cfg.mlp, norm=cfg.norm, std=std, out_std=out_std, rope_base=cfg.rope_base, dtype=dtype,
                      causal=cfg.causal, qkv_bias=cfg.qkv_bias, norm_eps=cfg.norm_eps, attention=cfg.attention)
        self.embed = nnx.Embed(vocab_size, d, embedding_init=normal_init(std, ("vocab", "embed")), rngs=rngs)
        block = lambda r: Block(d, cfg.heads, cfg.mlp_hidden, rngs=r, window=cfg.window,  # noqa: E731
                                kv_heads=cfg.kv_heads, **common)
        self.prelude = stacked(block, cfg.prelude, rngs) if cfg.prelude else None
        stages, first = [], 0
        for s in cfg.stages:
            stages.append(Bank(s.circuits, first, d_model=d, rngs=rngs, router=s.router, batch_circuits=batch_circuits,
                               **common))
            first += len(s.circuits)
        self.stages = nnx.List(stages)
        self.coda = stacked(block, cfg.coda, rngs) if cfg.coda else None
        self.final_norm = nnx.RMSNorm(d, dtype=dtype, rngs=rngs, epsilon=cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nnx.Linear(
            d, vocab_size, use_bias=False, kernel_init=normal_init(std, ("embed", "vocab")), dtype=dtype, rngs=rngs)
        self.compute_dtype = dtype

    def __call__(self, tokens_BT: Array, plan: Plan, *, positions_BT: Array | None = None,
                 segment_ids_BT: Array | None = None) -> tuple[Array, Diagnostics]:
        """Logits [B, T, vocab] (float32) and the circuits' reports.

        Args:
          tokens_BT: int32 token ids.
          plan: how to run the circuits (`loopformer.model.plan`).
          positions_BT: RoPE positions (default 0..T-1; packed documents restart at 0).
          segment_ids_BT: tokens attend within their segment; segment 0 is padding (default: one
            segment, no padding).
        """
        B, T = tokens_BT.shape
        positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T)) if positions_BT is None else positions_BT
        ctx = Context(positions_BT, attention_mask(segment_ids_BT), None if segment_ids_BT is None else segment_ids_BT > 0)
        x = self.embed(tokens_BT).astype(self.compute_dtype)
        if self.prelude is not None:
            x = run_stack(self.prelude, x, ctx.positions_BT, ctx.mask, plan.schedules.get("prelude"))
        reports, aux, step_logits = {}, jnp.zeros((), jnp.float32), None
        readouts = any(r.needs_readout for r in plan.exits.values())
        for s, stage in enumerate(self.stages):
            readout = (lambda xs, s=s: self._rest(xs, s + 1, ctx, plan)) if readouts else None
            x, stage_reports, stage_aux, streams = stage(x, ctx, plan, readout)
            reports.update(stage_reports)
            aux = aux + stage_aux
            if streams is not None and not self._act(stage_reports):  # ouro / pondernet: logits after every step
                step_logits = jax.vmap(lambda xs, s=s: self._rest(xs, s + 1, ctx, plan))(streams)
        return self._rest(x, len(self.stages), ctx, plan), Diagnostics(reports, aux, step_logits)

    @staticmethod
    def _act(reports: dict) -> bool:
        return any(r.ponder is not None for r in reports.values())

    def _rest(self, x: Array, first_stage: int, ctx: Context, plan: Plan) -> Array:
        """Logits from the stream before stage ``first_stage``: the later stages, the coda, norm, head."""
        for stage in list(self.stages)[first_stage:]:
            x = stage(x, ctx, plan)[0]
        if self.coda is not None:
            x = run_stack(self.coda, x, ctx.positions_BT, ctx.mask, plan.schedules.get("coda"))
        x = self.final_norm(x)
        logits = self.embed.attend(x.astype(jnp.float32)) if self.head is None else self.head(x)
        return logits.astype(jnp.float32)

    # ------------------------------------------------------------------ decoding with a cache
    def empty_cache(self, batch: int, length: int, policy: CachePolicy, loops: dict[str, int]) -> KVCache:
        """A cache for ``batch`` rows of ``length`` positions, each circuit with the slots ``policy``
        needs for up to ``loops[name]`` iterations."""
        dtype = self.compute_dtype

        def stack_kv(stack: nnx.Module | None, slots: tuple[int, ...] = ()) -> tuple:
            if stack is None:
                return ()
            attn = stack.attn
            depth = attn.qkv.kernel.shape[0]
            return tuple(empty_kv((*slots, batch, length, attn.kv_heads, attn.head_dim), dtype) for _ in range(depth))

        circuits, state = {}, {}
        for stage in self.stages:
            for name in stage.names:
                c = stage.circuits[name]
                circuits[name] = stack_kv(c.blocks, (policy.slots(loops[name]),))
                state[name] = jnp.zeros((batch, c.blocks.attn_norm.scale.shape[-1]), dtype)  # [B, w]
        return KVCache(stack_kv(self.prelude), stack_kv(self.coda), circuits, state, jnp.zeros((batch,), jnp.int32))

    def decode(self, tokens_Bt: Array, positions_Bt: Array, cache: KVCache, plan: Plan, policy: CachePolicy, *,
               last_B: Array | None = None, continuous: bool = False) -> tuple[Array, KVCache, dict[str, Array]]:
        """Logits [B, t, vocab] of t new tokens at ``positions_Bt`` (consecutive from each row's first)
        given the cache of every earlier position (causal models only), and the cache with them stored.
        ``last_B``: the index in the chunk of each row's last real token, whose circuit states the cache
        keeps (default t - 1). ``continuous`` starts every circuit from the state the cache kept
        (Huginn's continuous thinking; t = 1). Also returns the iterations each circuit ran per token
        {name: [B, t]}."""
        if not self.causal:
            raise PlanError("a bidirectional model (model.causal: false) cannot decode token by token; "
                            "use --no-cache")
        if plan.schedules:
            raise PlanError("decoding with a cache runs the layers in their order (no layer schedule); use --no-cache")
        B, t = tokens_Bt.shape
        start = positions_Bt[:, 0]
        x = self.embed(tokens_Bt).astype(self.compute_dtype)

        def stack(module: nnx.Module | None, kvs: tuple, x: Array) -> tuple[Array, tuple]:
            if module is None:
                return x, kvs
            x, fresh = run_stack_cached(module, x, positions_Bt, kvs, start)
            return x, tuple(tuple(store(c, f, positions_Bt) for c, f in zip(kv, new, strict=True))
                            for kv, new in zip(kvs, fresh, strict=True))

        x, prelude = stack(self.prelude, cache.prelude, x)
        circuits, state, used = dict(cache.circuits), dict(cache.state), {}
        last = jnp.full((B,), t - 1) if last_B is None else last_B
        for bank in self.stages:
            h_init = {n: jnp.broadcast_to(state[n][:, None], (B, t, state[n].shape[-1])) for n in bank.names
                      } if continuous else None
            x, kvs, states, bank_used = bank.decode(x, positions_Bt, start, {n: circuits[n] for n in bank.names},
                                                    plan, policy, h_init)
            circuits.update(kvs)
            used.update(bank_used)
            state.update({n: s[jnp.arange(B), last] for n, s in states.items()})
        x, coda = stack(self.coda, cache.coda, x)
        x = self.final_norm(x)
        logits = self.embed.attend(x.astype(jnp.float32)) if self.head is None else self.head(x)
        length = jnp.maximum(cache.length, positions_Bt[jnp.arange(B), last] + 1)
        return logits.astype(jnp.float32), KVCache(prelude, coda, circuits, state, length), used

    def param_counts(self) -> dict[str, int]:
        """Parameters by part: 'shared' (embed, prelude, coda, norms, head) and one entry per circuit."""
        counts = {"shared": _size(nnx.state(self, nnx.Param))}
        for stage in self.stages:
            for name in stage.names:
                counts[name] = _size(nnx.state(stage.circuits[name], nnx.Param))
                counts["shared"] -= counts[name]
        return counts


def forward_batch(model: LoopedTransformer, batch: dict[str, Array], plan: Plan) -> tuple[Array, Diagnostics]:
    """The model on a batch dictionary: ``inputs`` [B, T], and for packed or padded data ``positions``
    and ``segment_ids`` (0 = padding)."""
    return model(batch["inputs"], plan, positions_BT=batch.get("positions"), segment_ids_BT=batch.get("segment_ids"))


def _size(state: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


def build_model(cfg: ModelConfig, vocab_size: int, seed: int, *, batch_circuits: bool = True) -> LoopedTransformer:
    """Initialise a model (parameters from ``seed``, output scale from the loop schedule's training
    depth) on the default device; `loopformer.parallel` places it on a mesh using the logical axis
    names the kernels carry."""
    with nnx.use_eager_sharding(False):
        return LoopedTransformer(cfg, vocab_size, init_depth=training_depth(cfg), rngs=nnx.Rngs(params=seed),
                                 batch_circuits=batch_circuits)
