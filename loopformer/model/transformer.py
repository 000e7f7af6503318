"""The whole model: embed -> prelude -> core stages (banks of looped circuits) -> coda -> norm -> head.

    tokens [B, T] -> x [B, T, d_model] -> ... -> logits [B, T, vocab]

Loop counts, gates and fills are *arguments* (arrays over the model's circuits, in the order of
``circuit_names``), so changing them never changes the compiled program.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopformer.config import CircuitConfig, ModelConfig
from loopformer.data.tasks import PAD
from loopformer.model.circuits import Stage
from loopformer.model.layers import Block, attention_mask, normal_init, run_stack, stacked

Array = jax.Array


def effective_depth(cfg: ModelConfig, loops: dict[str, float] | None = None) -> float:
    """Blocks on the longest path at the given loop counts (default: each circuit's eval_loops):
    prelude + sum over stages of max_c(depth_c * n_c) + coda."""
    loops = loops or {c.name: c.eval_loops for c in cfg.circuits()}
    core = sum(max(c.depth * loops[c.name] for c in s.circuits) for s in cfg.stages)
    return cfg.prelude + core + cfg.coda


class LoopedTransformer(nnx.Module):
    """Transformer whose middle is one or more banks of looped circuits: a decoder (causal), or with
    ``model.causal: false`` a bidirectional encoder for tasks with labels at input positions."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.circuit_names = [c.name for c in cfg.circuits()]
        self.circuit_configs: dict[str, CircuitConfig] = {c.name: c for c in cfg.circuits()}
        d, dtype = cfg.d_model, jnp.dtype(cfg.compute_dtype)
        # GPT-2 style: residual-branch outputs shrink with the *expected effective* depth (training
        # mean loop counts), so a deep unroll starts with a stream of the same scale as a shallow one.
        train_depth = effective_depth(cfg, {c.name: c.distribution().mean() for c in cfg.circuits()})
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * train_depth)
        common = dict(mlp=cfg.mlp, norm=cfg.norm, std=std, out_std=out_std, rope_base=cfg.rope_base, dtype=dtype,
                      causal=cfg.causal)
        hidden = max(1, int(round(cfg.mlp_ratio * d)))
        self.embed = nnx.Embed(vocab_size, d, embedding_init=normal_init(std, ("vocab", "embed")), rngs=rngs)
        block = lambda r: Block(d, cfg.heads, hidden, rngs=r, window=cfg.window, **common)  # noqa: E731
        self.prelude = stacked(block, cfg.prelude, rngs) if cfg.prelude else None
        stages, first = [], 0
        for s in cfg.stages:
            stages.append(Stage(s.circuits, first, d_model=d, rngs=rngs, **common))
            first += len(s.circuits)
        self.stages = nnx.List(stages)
        self.coda = stacked(block, cfg.coda, rngs) if cfg.coda else None
        self.final_norm = nnx.RMSNorm(d, dtype=dtype, rngs=rngs)
        self.head = None if cfg.tie_embeddings else nnx.Linear(
            d, vocab_size, use_bias=False, kernel_init=normal_init(std, ("embed", "vocab")), dtype=dtype, rngs=rngs)
        self.compute_dtype = dtype

    # ------------------------------------------------------------------ loop-count helpers
    def default_loops(self) -> dict[str, int]:
        return {n: c.eval_loops for n, c in self.circuit_configs.items()}

    def loop_vector(self, loops: dict[str, int] | None = None) -> Array:
        """int32 [num_circuits]: the default eval counts, overridden by ``loops`` (by circuit name)."""
        merged = self.default_loops()
        for name, n in (loops or {}).items():
            if name not in merged:
                raise KeyError(f"unknown circuit '{name}'; circuits are {self.circuit_names}")
            merged[name] = int(n)
        return jnp.asarray([merged[n] for n in self.circuit_names], jnp.int32)

    def gate_vector(self, ablate: list[str] | tuple[str, ...] = ()) -> Array:
        """float32 [num_circuits]: 1 everywhere except 0 for the circuits in ``ablate``."""
        for name in ablate:
            if name not in self.circuit_names:
                raise KeyError(f"unknown circuit '{name}'; circuits are {self.circuit_names}")
        return jnp.asarray([0.0 if n in ablate else 1.0 for n in self.circuit_names], jnp.float32)

    # ------------------------------------------------------------------ forward
    def __call__(self, tokens_BT: Array, *, loops: Array | None = None, gates: Array | None = None,
                 fill: Array | None = None, train: bool = False, key: Array | None = None, trace_len: int = 0,
                 collect: bool | Array = False, positions_BT: Array | None = None,
                 segment_ids_BT: Array | None = None) -> tuple[Array, dict[str, Array]]:
        """Logits [B, T, vocab] (float32) and aux diagnostics.

        Args:
          loops: int32 [num_circuits] loop counts (default: each circuit's eval_loops).
          gates: float [num_circuits], 1 = on, 0 = removed (default: all on).
          fill: float [num_circuits, d_model] output used in place of a gated-off circuit.
          train: use each circuit's truncated backprop (else plain fori_loops).
          key: PRNG key for noise-initialised states (default: a fixed key).
          trace_len: record per-iteration state statistics (over non-PAD tokens) for the first
            ``trace_len`` iterations.
          collect: also return each circuit's mean output (for mean ablation): True averages over
            every token; a float [B, T] array weights the tokens (e.g. 0 on padding).
        """
        B, T = tokens_BT.shape
        loops = self.loop_vector() if loops is None else jnp.asarray(loops, jnp.int32)
        gates = jnp.ones(len(self.circuit_names), jnp.float32) if gates is None else jnp.asarray(gates)
        key = jax.random.key(0) if key is None else key
        positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T)) if positions_BT is None else positions_BT
        real_BT = tokens_BT != PAD
        # Bidirectional attention would see right padding (causal attention never looks ahead to it).
        mask = attention_mask(segment_ids_BT, None if self.cfg.causal else real_BT)
        x = self.embed(tokens_BT).astype(self.compute_dtype)
        if self.prelude is not None:
            x = run_stack(self.prelude, x, positions_BT, mask)
        aux: dict[str, Array] = {}
        for s, stage in enumerate(self.stages):
            x, stage_aux = stage(x, positions_BT, mask, loops, gates, fill, train=train,
                                 key=jax.random.fold_in(key, s), trace_len=trace_len, collect=collect,
                                 real_BT=real_BT)
            aux.update(stage_aux)
        if self.coda is not None:
            x = run_stack(self.coda, x, positions_BT, mask)
        x = self.final_norm(x)
        logits = self.embed.attend(x.astype(jnp.float32)) if self.head is None else self.head(x)
        return logits.astype(jnp.float32), aux

    # ------------------------------------------------------------------ description
    def param_counts(self) -> dict[str, int]:
        """Parameters by part: 'shared' (embed, prelude, coda, norms, head) and one entry per circuit."""
        counts: dict[str, int] = {"shared": 0}
        for stage in self.stages:
            counts["shared"] += _size(nnx.state(stage.norm, nnx.Param))
            for group in stage.groups:
                per = _size(nnx.state(group, nnx.Param)) // len(group.names)
                for name in group.names:
                    counts[name] = per
        for part in (self.embed, self.prelude, self.coda, self.final_norm, self.head):
            if part is not None:
                counts["shared"] += _size(nnx.state(part, nnx.Param))
        return counts

    def notation(self, loops: dict[str, int] | None = None) -> list[str]:
        """Each stage in the ``(X1)^8 ⊕ (Y1∘Y2)^4`` notation."""
        loops = {**self.default_loops(), **(loops or {})}
        return [" ⊕ ".join(f"({'∘'.join(f'{c.name}{i + 1}' for i in range(c.depth))})^{loops[c.name]}"
                           for c in s.circuits) for s in self.cfg.stages]

    def describe(self, loops: dict[str, int] | None = None) -> str:
        """A readable summary: architecture in ⊕/∘ notation, widths, loop settings, parameter counts."""
        cfg, counts = self.cfg, self.param_counts()
        total = sum(counts.values())
        loops = {**self.default_loops(), **(loops or {})}
        chain = ["embed"] + ([f"prelude×{cfg.prelude}"] if cfg.prelude else [])
        chain += [f"[{s}]" for s in self.notation(loops)]
        chain += ([f"coda×{cfg.coda}"] if cfg.coda else []) + ["norm", "head" + (" (tied)" if cfg.tie_embeddings else "")]
        lines = [f"LoopedTransformer  d_model={cfg.d_model}  heads={cfg.heads}  vocab={self.vocab_size}  "
                 f"norm={cfg.norm}  mlp={cfg.mlp}  params={total:,}" + (f"  window={cfg.window}" if cfg.window else "")
                 + ("" if cfg.causal else "  bidirectional"),
                 "  " + " ─ ".join(chain)]
        for s, stage in enumerate(cfg.stages):
            lines.append(f"  stage {s + 1}: {self.notation(loops)[s]}")
            for c in stage.circuits:
                lines.append(
                    f"    {c.name:<6} depth {c.depth}  width {c.width:<4} heads {c.heads:<2} read/write {c.read:<7} "
                    f"inject {c.inject:<6} init {c.init:<5} train loops {c.distribution()!s:<24} eval {loops[c.name]:<3} "
                    f"k={c.backprop:<3} params {counts[c.name]:,}"
                    + (f"  window {c.window}" if c.window else "") + ("  state_norm" if c.state_norm else ""))
        per_circuit = total - counts["shared"]
        lines.append(f"  parameters: shared {counts['shared']:,} + circuits {per_circuit:,} = {total:,}")
        stored = cfg.prelude + cfg.coda + sum(c.depth for c in cfg.circuits())
        lines.append(f"  effective depth at these loops: {effective_depth(cfg, loops):g} blocks "
                     f"(weights of {stored} blocks stored)")
        return "\n".join(lines)


def _size(state: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


def build_model(cfg: ModelConfig, vocab_size: int, seed: int) -> LoopedTransformer:
    """Initialise a model (parameters from ``seed``) on the default device; `loopformer.parallel`
    places it on a mesh using the logical axis names the kernels carry."""
    with nnx.use_eager_sharding(False):
        return LoopedTransformer(cfg, vocab_size, rngs=nnx.Rngs(params=seed))
