"""The whole model: embed -> prelude -> stages (banks of looped circuits) -> coda -> norm -> head.

    tokens [B, T] -> x [B, T, d_model] -> ... -> logits [B, T, vocab]

How the circuits run (loop counts, gates, fills) is a `Plan`, an argument of the forward pass, so
changing it never changes the compiled program. Padding comes from the batch: tokens of segment 0
are padding (attention keeps real tokens apart from them; statistics skip them).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopformer.config.schema import ModelConfig
from loopformer.errors import ConfigError, DecodingError
from loopformer.model.cache import KVCache, empty_kv, store
from loopformer.model.circuit import Bank, Context, Decoding
from loopformer.model.layers import Block, BlockSettings, attention_mask, normal_init, run_stack, run_stack_cached, stacked
from loopformer.model.plan import Diagnostics, Plan
from loopformer.variants.cache import CachePolicy
from loopformer.variants.exits import refuse_uncached
from loopformer.variants.position import POSITIONS, digit_places

Array = jax.Array
OFFSET_KEY = 0xABAC  # folds the abacus offsets' draws apart from the plan's other uses of its key


class Decoded(NamedTuple):
    """A decoding step: logits [B, t, vocab] of the new tokens, the cache with them stored, the
    iterations each circuit ran per token {name: [B, t]}, and the token-iterations each circuit's blocks
    executed {name: float32 []} (masked: every token of the chunk at every iteration its loop ran; compacted:
    the gathered buffer's size at each; both with the fill of a loop that stopped before its cap)."""

    logits: Array
    cache: KVCache
    loops: dict[str, Array]
    computed: dict[str, Array]


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
    depth, so a deep unroll starts with a stream of the same scale as a shallow one).

    The forward pass (`__call__`) and cached decoding (`decode`) are one path: embed, the plain stacks and
    the banks run with or without a decoding context, and the head exists once (`_head`)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, *, init_depth: float, rngs: nnx.Rngs,
                 batch_circuits: bool = True, digits: tuple[int, int] | None = None):
        self.vocab_size = vocab_size
        self.d_model = cfg.d_model
        self.causal = cfg.causal
        self.circuit_names = tuple(c.name for c in cfg.circuits())
        d = cfg.d_model
        settings = BlockSettings.of(cfg, out_std=cfg.init_std / math.sqrt(2 * max(init_depth, 0.5)))
        self.embed = nnx.Embed(vocab_size, d, embedding_init=normal_init(cfg.init_std, ("vocab", "embed")), rngs=rngs)
        # abacus: a learned vector per place 1 .. abacus_size - 1 of a digit inside its number (row 0 unused)
        self.abacus = nnx.Embed(cfg.abacus_size, d, embedding_init=normal_init(cfg.init_std, (None, "embed")),
                                rngs=rngs) if cfg.places else None
        # coupled: RoPE over each token's digit place (variants/position.py)
        self.coupled = POSITIONS.get(cfg.position, "model.position").on_places
        self.digits = tuple(cfg.abacus_digits) or (tuple(digits) if digits else None)
        self.place_window = cfg.place_window  # attention between tokens at most this many digit places apart (0: any)
        block = lambda r: Block(d, cfg.heads, cfg.mlp_hidden, settings, rngs=r, window=cfg.window,  # noqa: E731
                                kv_heads=cfg.kv_heads)
        self.prelude = stacked(block, cfg.prelude, rngs) if cfg.prelude else None
        stages, first = [], 0
        for s in cfg.stages:
            stages.append(Bank(s.circuits, first, d_model=d, settings=settings, rngs=rngs, router=s.router,
                               batch_circuits=batch_circuits))
            first += len(s.circuits)
        self.stages = nnx.List(stages)
        self.coda = stacked(block, cfg.coda, rngs) if cfg.coda else None
        self.final_norm = nnx.RMSNorm(d, dtype=settings.dtype, rngs=rngs, epsilon=cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nnx.Linear(
            d, vocab_size, use_bias=False, kernel_init=normal_init(cfg.init_std, ("embed", "vocab")),
            dtype=settings.dtype, rngs=rngs)
        self.compute_dtype = settings.dtype

    def __call__(self, tokens_BT: Array, plan: Plan, *, positions_BT: Array | None = None,
                 segment_ids_BT: Array | None = None) -> tuple[Array, Diagnostics]:
        """Logits [B, T, vocab] (float32) and the circuits' reports.

        Args:
          tokens_BT: int32 token ids.
          plan: how to run the circuits (`loopformer.model.plan`).
          positions_BT: token positions (default 0..T-1; packed documents restart at 0).
          segment_ids_BT: tokens attend within their segment; segment 0 is padding (default: one
            segment, no padding).
        """
        B, T = tokens_BT.shape
        positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T)) if positions_BT is None else positions_BT
        places = digit_places(tokens_BT, self._digits(), positions_BT) if self.reads_places else None
        ctx = Context(positions_BT, self._mask(segment_ids_BT, places),
                      None if segment_ids_BT is None else segment_ids_BT > 0, rope_BT=places if self.coupled else None)
        if self.abacus is not None and plan.position_offset:  # McLeish et al.'s random offset: one per row, digits only
            offset_B = jax.random.randint(jax.random.fold_in(plan.key, OFFSET_KEY), (B,), 0, plan.position_offset + 1)
            places = jnp.where(places > 0, places + offset_B[:, None], 0)
        x = self._stack(self.prelude, self._embed(tokens_BT, places if self.abacus is not None else None), ctx,
                        plan.schedules.get("prelude"))[0]
        reports, aux, step_logits, step_valid = {}, jnp.zeros((), jnp.float32), None, None
        readouts = any(r.needs_readout for r in plan.exits.values())
        for s, stage in enumerate(self.stages):
            readout = (lambda xs, s=s: self._rest(xs, s + 1, ctx, plan)) if readouts else None
            res = stage(x, ctx, plan, readout)
            x = res.x
            reports.update(res.reports)
            aux = aux + res.aux_loss
            if res.streams is not None and not self._mixes(stage):  # per-step losses: logits after every step
                step_logits = jax.vmap(lambda xs, s=s: self._rest(xs, s + 1, ctx, plan))(res.streams)
                step_valid = res.stream_valid
        return self._rest(x, len(self.stages), ctx, plan), Diagnostics(reports, aux, step_logits, step_valid)

    def _mask(self, segment_ids_BT: Array | None, places_BT: Array | None) -> Array | None:
        """[B, 1, T, T] attention mask: within each segment, and with ``place_window`` W only between tokens whose
        digit places differ by at most W (|p_q - p_k| <= W; non-digits at 0), so that every query meets the same
        places at the same distances however long the numbers are. Each token sees itself: no row is empty."""
        mask = attention_mask(segment_ids_BT)
        if not self.place_window:
            return mask
        near = (jnp.abs(places_BT[:, :, None] - places_BT[:, None, :]) <= self.place_window)[:, None]
        return near if mask is None else mask & near

    @staticmethod
    def _mixes(stage: Bank) -> bool:
        """Whether the stage's halting circuit writes the mixture of its iterations (no per-step logits)."""
        return any(stage.circuits[n].halting.mixes_output for n in stage.names)

    @property
    def reads_places(self) -> bool:
        """Whether the model reads each digit's place (abacus embeds it, coupled rotates by it)."""
        return self.abacus is not None or self.coupled

    def _digits(self) -> tuple[int, int]:
        if self.digits is None:
            scheme = "coupled" if self.coupled else "abacus"
            raise ConfigError(f"model.position={scheme} needs the digit token ids: set model.abacus_digits=[lo, hi] "
                              "(this model was built without data to take them from)")
        return self.digits

    def _embed(self, tokens_BT: Array, places_BT: Array | None = None) -> Array:
        """Token embeddings [B, T, d], plus with abacus each digit's place embedding (0: none)."""
        x = self.embed(tokens_BT)
        if places_BT is not None:
            size = self.abacus.embedding.shape[0]
            x = x + jnp.where((places_BT > 0)[..., None], self.abacus(jnp.clip(places_BT, 0, size - 1)), 0.0)
        return x.astype(self.compute_dtype)

    def _stack(self, stack: nnx.Module | None, x: Array, ctx: Context, schedule: Array | None = None,
               kv: tuple = ()) -> tuple[Array, tuple]:
        """A plain stack (prelude or coda) on the stream; when decoding, over and into its cache ``kv``."""
        if stack is None:
            return x, kv
        if ctx.decoding is None:
            return run_stack(stack, x, ctx.rotary, ctx.mask, schedule), kv
        x, fresh = run_stack_cached(stack, x, ctx.positions_BT, kv, ctx.decoding.start_B, ctx.rope_BT)
        return x, tuple(tuple(store(c, f, ctx.positions_BT) for c, f in zip(layer, new, strict=True))
                        for layer, new in zip(kv, fresh, strict=True))

    def _head(self, x: Array) -> Array:
        """Logits [..., vocab] float32 from the stream after the coda."""
        x = self.final_norm(x)
        logits = self.embed.attend(x.astype(jnp.float32)) if self.head is None else self.head(x)
        return logits.astype(jnp.float32)

    def _rest(self, x: Array, first_stage: int, ctx: Context, plan: Plan) -> Array:
        """Logits from the stream before stage ``first_stage``: the later stages, the coda, norm, head."""
        for stage in list(self.stages)[first_stage:]:
            x = stage(x, ctx, plan).x
        return self._head(self._stack(self.coda, x, ctx, plan.schedules.get("coda"))[0])

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
        return KVCache(stack_kv(self.prelude), stack_kv(self.coda), circuits, state, jnp.zeros((batch,), jnp.int32),
                       jnp.zeros((batch,), jnp.int32))

    def check_decoding(self, plan: Plan) -> None:
        """DecodingError (one line) when cached decoding cannot compute what the forward pass does for ``plan``
        (call it before tracing; `decode` calls it too)."""
        if not self.causal:
            raise DecodingError("a bidirectional model (model.causal: false) cannot decode token by token: every "
                                "token attends to later ones")
        if plan.schedules:
            raise DecodingError("decoding with a cache runs the layers in their order (no layer schedule)")
        if self.place_window:
            raise DecodingError(f"decoding with a cache does not keep the digit places of earlier tokens, which "
                                f"model.place_window={self.place_window} compares")  # the command line adds the fix
        refuse_uncached(plan.exits)
        if any(stage.routed for stage in self.stages):
            raise DecodingError("decoding with a cache does not run routed banks (a token's iterations move between "
                                "circuits, so no iteration owns a cache slot)")

    def decode(self, tokens_Bt: Array, positions_Bt: Array, cache: KVCache, plan: Plan, policy: CachePolicy, *,
               last_B: Array | None = None, continuous: bool = False) -> Decoded:
        """Logits [B, t, vocab] of t new tokens at ``positions_Bt`` (consecutive from each row's first)
        given the cache of every earlier position (causal models only), and the cache with them stored.
        The same layers and circuit iterations as the forward pass, with a decoding context.
        ``last_B``: the index in the chunk of each row's last real token, whose circuit states the cache
        keeps (default t - 1). ``continuous`` starts every circuit from the state the cache kept
        (Huginn's continuous thinking; t = 1). Also returns the iterations each circuit ran per token
        {name: [B, t]} and the token-iterations its blocks executed (`Decoded`); with ``plan.compact`` (and
        exits, and a one-block circuit) only the tokens still running are computed, as in evaluation."""
        self.check_decoding(plan)
        B, t = tokens_Bt.shape
        last = jnp.full((B,), t - 1) if last_B is None else last_B
        places, place = None, cache.place
        if self.reads_places:  # runs of digits go on from the cache's last token
            places = digit_places(tokens_Bt, self._digits(), carry_B=cache.place)
            place = places[jnp.arange(B), last]
        ctx = Context(positions_Bt, None, None, Decoding(positions_Bt[:, 0], policy),
                      rope_BT=places if self.coupled else None)
        x, prelude = self._stack(self.prelude, self._embed(tokens_Bt, places if self.abacus is not None else None), ctx,
                                 kv=cache.prelude)
        circuits, state, used, computed = dict(cache.circuits), dict(cache.state), {}, {}
        for bank in self.stages:
            h_init = {n: jnp.broadcast_to(state[n][:, None], (B, t, state[n].shape[-1])) for n in bank.names
                      } if continuous else None
            res = bank(x, ctx, plan, caches={n: circuits[n] for n in bank.names}, h_init=h_init)
            x = res.x
            circuits.update(res.caches)
            used.update({n: r.used for n, r in res.reports.items()})
            computed.update({n: r.computed for n, r in res.reports.items()})
            state.update({n: s[jnp.arange(B), last] for n, s in res.states.items()})
        x, coda = self._stack(self.coda, x, ctx, kv=cache.coda)
        length = jnp.maximum(cache.length, positions_Bt[jnp.arange(B), last] + 1)
        return Decoded(self._head(x), KVCache(prelude, coda, circuits, state, length, place), used, computed)

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
    and ``segment_ids`` (0 = padding); a plan with per-difficulty counts reads ``difficulty`` [B, T]."""
    plan = plan.for_batch(batch.get("difficulty"))
    return model(batch["inputs"], plan, positions_BT=batch.get("positions"), segment_ids_BT=batch.get("segment_ids"))


def _size(state: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


def build_model(cfg: ModelConfig, vocab_size: int, seed: int, *, batch_circuits: bool = True,
                digits: tuple[int, int] | None = None) -> LoopedTransformer:
    """Initialise a model (parameters from ``seed``, output scale from the loop schedule's training
    depth) on the default device; `loopformer.parallel` places it on a mesh using the logical axis
    names the kernels carry. ``digits``: the digit token ids [lo, hi] an abacus model reads when
    model.abacus_digits is [] (the data's)."""
    with nnx.use_eager_sharding(False):
        return LoopedTransformer(cfg, vocab_size, init_depth=training_depth(cfg), rngs=nnx.Rngs(params=seed),
                                 batch_circuits=batch_circuits, digits=digits)
