"""Position schemes: how attention learns where a token is (``model.position``).

    rope    rotary position embedding (rotate-half form) of queries and keys, theta = model.rope_base
    none    no position signal (NoPE): a causal model still tells positions apart through the mask

A new scheme is one class here: it transforms queries and keys given their positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from loopformer.variants.registry import Registry

Array = jax.Array
POSITIONS: Registry = Registry("position scheme")


@dataclass(frozen=True)
class Position:
    base: float = 10000.0
    kind: ClassVar[str] = ""

    def __call__(self, x_BTNH: Array, positions_BT: Array) -> Array:
        """Queries or keys [B, T, N, H] at ``positions_BT`` [B, T]."""
        raise NotImplementedError


def rope(x_BTNH: Array, positions_BT: Array, base: float) -> Array:
    """Rotary position embedding (rotate-half form) applied to queries or keys."""
    half = x_BTNH.shape[-1] // 2
    freq_H = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BTH = positions_BT[..., None].astype(jnp.float32) * freq_H
    sin, cos = jnp.sin(angle_BTH)[:, :, None, :], jnp.cos(angle_BTH)[:, :, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


@POSITIONS.register("rope")
@dataclass(frozen=True)
class Rope(Position):
    def __call__(self, x_BTNH: Array, positions_BT: Array) -> Array:
        return rope(x_BTNH, positions_BT, self.base)


@POSITIONS.register("none")
@dataclass(frozen=True)
class NoPosition(Position):
    def __call__(self, x_BTNH: Array, positions_BT: Array) -> Array:
        return x_BTNH
