"""The training objective: cross-entropy on the answer tokens, plus the terms a model's parts ask for.

    plain            sum over answer tokens of CE(final logits)
    halting ouro     sum_t p(t) CE_t - beta H(p)          per answer token, over the halting circuit's
    halting ponder   sum_t p(t) CE_t + beta KL(p || Geometric(prior))   iterations t (these replace the plain CE)
    halting act      CE(the mixture's logits) + tau (N + R)
    routers          their auxiliary losses (balance / BCE / compute), already means

Every term is a sum over the batch's answer tokens scaled by ``scale`` (1 / the whole batch's answer
tokens), so micro-batches add up to the full-batch mean exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from loopformer.config.schema import HaltingConfig
from loopformer.model import halting as halting_math
from loopformer.model.plan import Diagnostics

Array = jax.Array


def halting_beta(cfg: HaltingConfig, step: Array, steps: int) -> Array:
    """Ouro's entropy weight: beta decays linearly to beta_final over training."""
    frac = jnp.clip(step / max(steps - 1, 1), 0.0, 1.0)
    return cfg.beta + (cfg.beta_final - cfg.beta) * frac


def halting_terms(diag: Diagnostics, name: str, cfg: HaltingConfig, batch: dict[str, Array], n: Array,
                  beta: Array, scale: Array | float) -> tuple[Array, dict[str, Array]]:
    """(the halting circuit's objective, replacing the plain CE for ouro / pondernet and adding the
    ponder cost for act; sums for logging: ponder / entropy / expected steps over answer tokens)."""
    mask = batch["mask"].astype(jnp.float32)
    report = diag.circuits[name]
    p = report.exit_p  # [L, B, T]
    logs = {"halting_steps": jnp.sum(report.used * mask)}
    if cfg.kind == "act":
        ponder = jnp.sum(report.ponder * mask)
        return cfg.tau * ponder * scale, logs | {"halting_ponder": ponder}
    ce = optax.softmax_cross_entropy_with_integer_labels(diag.step_logits, batch["targets"][None])  # [L, B, T]
    expected = jnp.sum(p * ce, axis=0)  # [B, T]
    if cfg.kind == "ouro":
        reg = -beta * halting_math.exit_entropy(p)
    else:
        reg = cfg.beta * halting_math.kl_to_geometric(p, n, cfg.prior)
    entropy = jnp.sum(halting_math.exit_entropy(p) * mask)
    return jnp.sum((expected + reg) * mask) * scale, logs | {"halting_entropy": entropy}
