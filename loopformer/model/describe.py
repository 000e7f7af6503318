"""The architecture in words: the ``(X1)^8 ⊕ (Y1∘Y2)^4`` notation, widths, loop schedules, parameters."""

from __future__ import annotations

from collections.abc import Mapping

from loopformer.config.schema import ModelConfig, RouterConfig
from loopformer.model.transformer import effective_depth


def notation(cfg: ModelConfig, loops: Mapping[str, int | str] | None = None) -> list[str]:
    """Each stage in the ``(X1)^8 ⊕ (Y1∘Y2)^4`` notation (default exponents: each circuit's eval_loops;
    ``loops`` may give counts or symbols, e.g. {"X": "n"})."""
    loops = {**{c.name: c.eval_loops for c in cfg.circuits()}, **(loops or {})}
    return [" ⊕ ".join(f"({'∘'.join(f'{c.name}{i + 1}' for i in range(c.depth))})^{loops[c.name]}" for c in s.circuits)
            for s in cfg.stages]


def describe(cfg: ModelConfig, vocab_size: int, counts: Mapping[str, int], loops: Mapping[str, int] | None = None) -> str:
    """A readable summary of a model of ``cfg`` with parameter ``counts`` (`LoopedTransformer.param_counts`)."""
    total = sum(counts.values())
    loops = {**{c.name: c.eval_loops for c in cfg.circuits()}, **(loops or {})}
    chain = ["embed"] + ([f"prelude×{cfg.prelude}"] if cfg.prelude else [])
    chain += [f"[{s}]" for s in notation(cfg, loops)]
    chain += ([f"coda×{cfg.coda}"] if cfg.coda else []) + ["norm", "head" + (" (tied)" if cfg.tie_embeddings else "")]
    lines = [f"LoopedTransformer  d_model={cfg.d_model}  heads={cfg.heads}  vocab={vocab_size}  "
             f"norm={cfg.norm}  mlp={cfg.mlp}  params={total:,}" + (f"  window={cfg.window}" if cfg.window else "")
             + (f"  kv_heads={cfg.kv_heads}" if cfg.kv_heads else "") + ("  qkv_bias" if cfg.qkv_bias else "")
             + ("" if cfg.causal else "  bidirectional") + _position(cfg),
             "  " + " ─ ".join(chain)]
    for s, stage in enumerate(cfg.stages):
        lines.append(f"  stage {s + 1}: {notation(cfg, loops)[s]}" + _router(stage.router))
        for c in stage.circuits:
            lines.append(
                f"    {c.name:<6} depth {c.depth}  width {c.width:<4} heads {c.heads:<2} io {c.io:<7} "
                f"inject {c.inject:<6} init {c.init:<5} train loops {c.distribution()!s:<24} eval {loops[c.name]:<3} "
                f"k={c.backprop:<3} params {counts[c.name]:,}"
                + (f"  window {c.window}" if c.window else "") + ("  state_norm" if c.state_norm else "")
                + (f"  kv_heads {c.kv_heads}" if c.kv_heads else "") + ("  output replace" if c.replaces else "")
                + (f"  halting {c.halting.kind}" if c.halting.has_head else ""))
    lines.append(f"  parameters: shared {counts['shared']:,} + circuits {total - counts['shared']:,} = {total:,}")
    stored = cfg.prelude + cfg.coda + sum(c.depth for c in cfg.circuits())
    lines.append(f"  effective depth at these loops: {effective_depth(cfg, loops):g} blocks "
                 f"(weights of {stored} blocks stored)")
    return "\n".join(lines)


def _router(router: RouterConfig) -> str:
    """``  router expert_choice (capacity 0.5, capacities [1.0, 0.5], ...)`` for a routed stage (the loop counts are
    then caps: a routed stage was described as a plain loop), else ""."""
    if not router.routes:
        return ""
    return f"  router {router.kind} (" + ", ".join(f"{k} {getattr(router, k)}" for k in router.rule().reads) + ")"


def _position(cfg: ModelConfig) -> str:
    """The position scheme when it is not RoPE: ``  position=abacus (places 1..127, offset U{0..32})``."""
    if cfg.position == "rope":
        return ""
    near = (f", attention within {cfg.place_window} place{'s' if cfg.place_window > 1 else ''}" if cfg.place_window
            else "")
    if cfg.position == "coupled":
        return f"  position=coupled (RoPE over each digit's place in its number{near})"
    if not cfg.places:
        return f"  position={cfg.position}"
    return (f"  position={cfg.position} (places 1..{cfg.abacus_size - 1}"
            + (f", training offset U{{0..{cfg.position_offset}}}" if cfg.position_offset else "") + near + ")")
