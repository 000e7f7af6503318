"""Optimiser: AdamW with linear warmup and cosine decay, global-norm clipping, and no weight decay
on norms and biases (optax does all of it; this module only wires the config in)."""

from __future__ import annotations

from typing import Any

import jax
import optax

from loopformer.config import TrainConfig

# Leaves that are decayed: matrices and embeddings. Norm scales and biases are not (decaying a
# norm scale toward 0 fights the normalisation it exists for).
DECAYED_LEAVES = ("kernel", "embedding")


def decay_mask(params: Any) -> Any:
    """A pytree of bools, True where weight decay applies (by leaf name, since stacked layers give
    norm scales more than one dimension)."""

    def decayed(path: tuple, _: Any) -> bool:
        return jax.tree_util.keystr(path[-1:], simple=True) in DECAYED_LEAVES

    return jax.tree_util.tree_map_with_path(decayed, params)


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """0 -> lr over warmup_steps, then cosine to lr * min_lr_ratio at train.steps (a warmup as long as the run or
    longer ends at step steps - 1, so the run still reaches its peak lr)."""
    warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup, decay_steps=max(cfg.steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
