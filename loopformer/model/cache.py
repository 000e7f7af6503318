"""Key/value caches for decoding (the policies that decide which loop iteration writes which slot are
registered classes in `loopformer.variants.cache`).

A causal model's attention at position t only reads positions <= t, so a token's keys and values never
change once computed: decoding caches them and runs each new token alone. In a looped circuit every
iteration i has its own keys and values, kept in the slots the policy says.

Shapes (B rows, T positions, K key/value heads, H head dim): one (K, V) pair per layer, prelude / coda
[B, T, K, H], a circuit's D layers [S, B, T, K, H] for S slots; ``state`` [B, w] each circuit's final
state of the row's last token (continuous thinking starts the next token there). One array per layer,
written once per decoding step, lets XLA update it in place: a step costs O(1) in the cache's length
but for the attention reads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
KV = tuple[Array, Array]


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["prelude", "coda", "circuits", "state", "length", "place"], meta_fields=[])
@dataclass(frozen=True)
class KVCache:
    """Keys and values per layer, the circuits' last states, each row's length, and (abacus models) the
    place of each row's last token inside its number [B] (0: not a digit), where the next digit's run goes on."""

    prelude: tuple[KV, ...] = ()
    coda: tuple[KV, ...] = ()
    circuits: dict[str, tuple[KV, ...]] = field(default_factory=dict)
    state: dict[str, Array] = field(default_factory=dict)
    length: Array | None = None
    place: Array | None = None

    def nbytes_per_token(self) -> int:
        """Bytes of keys and values per position (every layer and slot)."""
        arrays = [a for kv in (*self.prelude, *self.coda, *(kv for c in self.circuits.values() for kv in c)) for a in kv]
        return sum(a.dtype.itemsize * a.size // (a.shape[-4] * a.shape[-3]) for a in arrays)


def empty_kv(shape: tuple[int, ...], dtype: Any) -> KV:
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def store(buf: Array, new: Array, positions_Bt: Array) -> Array:
    """``buf`` [..., B, T, K, H] with ``new`` [..., B, t, K, H] written at each row's positions."""
    B = positions_Bt.shape[0]
    return buf.at[..., jnp.arange(B)[:, None], positions_Bt, :, :].set(new.astype(buf.dtype))
