"""Key/value caches for decoding, and the policies that decide which loop iteration writes which slot.

A causal model's attention at position t only reads positions <= t, so a token's keys and values never
change once computed: decoding caches them and runs each new token alone. In a looped circuit every
iteration i has its own keys and values; the policy keeps

    full      one slot per iteration (exact; memory grows with the loop count: slots = the count rounded
              up to a power of two, so raising the count within a bucket never recompiles)
    last      one slot: while decoding, earlier tokens are read at their final iteration (prefill still
              attends to its own tokens at every iteration; Ouro: 0.1 GSM8K points lost)
    ring:K    K slots, iteration i writes and reads slot i mod K
    first     one slot written at the first iteration and read by every later one (Mixture-of-Recursions'
              recursive sharing)

Shapes (B rows, T positions, K key/value heads, H head dim): one (K, V) pair per layer, prelude / coda
[B, T, K, H], a circuit's D layers [S, B, T, K, H] for S slots; ``state`` [B, w] each circuit's final
state of the row's last token (continuous thinking starts the next token there). One array per layer,
written once per decoding step, lets XLA update it in place: a step costs O(1) in the cache's length
but for the attention reads.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from loopformer.errors import PlanError

Array = jax.Array
POLICIES = "full, last, ring:K or first"


@dataclass(frozen=True)
class CachePolicy:
    kind: str = "full"
    ring: int = 0

    @staticmethod
    def parse(text: str) -> CachePolicy:
        m = re.fullmatch(r"\s*(full|last|first|ring:(\d+))\s*", text or "")
        if not m:
            raise PlanError(f"--cache {text}: not a cache policy; use {POLICIES}")
        if m.group(2) is not None:
            if int(m.group(2)) < 1:
                raise PlanError(f"--cache {text}: ring:K needs K >= 1")
            return CachePolicy("ring", int(m.group(2)))
        return CachePolicy(m.group(1))

    def slots(self, loops: int) -> int:
        """Slots a circuit run up to ``loops`` iterations needs."""
        if self.kind == "full":
            return 1 << max(loops - 1, 0).bit_length()  # the count's power-of-two bucket
        return self.ring if self.kind == "ring" else 1

    def slot(self, i: Array) -> Array:
        """The slot iteration i (0-based) reads and, where it writes, writes."""
        if self.kind == "full":
            return i
        return i % self.ring if self.kind == "ring" else jnp.zeros_like(i)

    def writes(self, i: Array) -> Array:
        """Whether iteration i writes its keys and values ("first": only iteration 0)."""
        return (i == 0) if self.kind == "first" else jnp.ones_like(i, bool)

    @property
    def exact(self) -> bool:
        """Whether cached decoding computes what the full forward pass does."""
        return self.kind == "full"

    def __str__(self) -> str:
        return f"ring:{self.ring}" if self.kind == "ring" else self.kind


KV = tuple[Array, Array]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["prelude", "coda", "circuits", "state", "length"],
                   meta_fields=[])
@dataclass(frozen=True)
class KVCache:
    """Keys and values per layer, the circuits' last states and each row's length."""

    prelude: tuple[KV, ...] = ()
    coda: tuple[KV, ...] = ()
    circuits: dict[str, tuple[KV, ...]] = field(default_factory=dict)
    state: dict[str, Array] = field(default_factory=dict)
    length: Array | None = None

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
