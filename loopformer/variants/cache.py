"""Cache policies: which loop iteration's keys and values a later token reads while decoding.

In a looped circuit every iteration i has its own keys and values; a policy keeps

    full      one slot per iteration (exact; memory grows with the loop count: slots = the count rounded
              up to a power of two, so raising the count within a bucket never recompiles)
    last      one slot: while decoding, earlier tokens are read at their final iteration (prefill still
              attends to its own tokens at every iteration; Ouro: 0.1 GSM8K points lost)
    ring:K    K slots, iteration i writes and reads slot i mod K
    first     one slot written at the first iteration and read by every later one (Mixture-of-Recursions'
              recursive sharing)

A new policy is one class here: how many slots it needs, which slot iteration i uses, whether i writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from loopformer.errors import PlanError, unplain_digits
from loopformer.variants.loops import MAX_LOOPS
from loopformer.variants.registry import Registry

Array = jax.Array
POLICIES: Registry = Registry("cache policy")


@dataclass(frozen=True)
class CachePolicy:
    kind: ClassVar[str] = ""
    exact: ClassVar[bool] = False  # cached decoding computes what the full forward pass does
    form: ClassVar[str] = ""

    @staticmethod
    def parse(text: str) -> CachePolicy:
        """``full``, ``last``, ``first`` or ``ring:K``; PlanError naming the forms."""
        forms = ", ".join(POLICIES.get(n).form or n for n in POLICIES.names())
        foreign = unplain_digits(text or "")
        if foreign:  # `ring:٣` kept 3 positions (#27 pass 40's leftover)
            raise PlanError(f"--cache {text}: {foreign}")
        m = re.fullmatch(r"\s*(\w+)(?::(-?\d+))?\s*", text or "")  # (ring:-1 was "not a cache policy")
        if not m or m.group(1) not in POLICIES:
            raise PlanError(f"--cache {text}: not a cache policy; use {forms}")
        cls = POLICIES.get(m.group(1))
        arg = None if m.group(2) is None else int(m.group(2))
        return cls.build(arg, text)

    @classmethod
    def build(cls, arg: int | None, text: str) -> CachePolicy:
        if arg is not None:
            raise PlanError(f"--cache {text}: {cls.kind} takes no argument")
        return cls()

    def slots(self, loops: int) -> int:
        """Slots a circuit run up to ``loops`` iterations needs."""
        return 1

    def slot(self, i: Array) -> Array:
        """The slot iteration i (0-based) reads and, where it writes, writes."""
        return jnp.zeros_like(i)

    def writes(self, i: Array) -> Array:
        """Whether iteration i writes its keys and values."""
        return jnp.ones_like(i, bool)

    def later_slots(self, stopped: Array, n: Array, S: int) -> Array:
        """[S, B] bool: the slots iterations stopped .. n - 1 would have written (``stopped`` [B]: the
        iterations a row ran before its loop ended early); decoding fills them with the keys and values
        of the rows' frozen states."""
        return jnp.zeros((S, stopped.shape[0]), bool)

    def __str__(self) -> str:
        return self.kind


@POLICIES.register("full")
@dataclass(frozen=True)
class Full(CachePolicy):
    exact = True

    def slots(self, loops: int) -> int:
        return 1 << max(loops - 1, 0).bit_length()  # the count's power-of-two bucket

    def slot(self, i: Array) -> Array:
        return i

    def later_slots(self, stopped: Array, n: Array, S: int) -> Array:
        j = jnp.arange(S)[:, None]
        return (j >= stopped[None]) & (j < n)


@POLICIES.register("last")
@dataclass(frozen=True)
class Last(CachePolicy):
    pass


@POLICIES.register("ring")
@dataclass(frozen=True)
class Ring(CachePolicy):
    ring: int = 1
    form = "ring:K"

    @classmethod
    def build(cls, arg: int | None, text: str) -> CachePolicy:
        if arg is None or not 1 <= arg <= MAX_LOOPS:
            raise PlanError(f"--cache {text}: ring:K needs K in 1..{MAX_LOOPS}")
        return cls(arg)

    def slots(self, loops: int) -> int:
        # a ring at least as long as the loop is the full cache (iteration i < loops <= K writes slot i either
        # way): no more slots than the full policy's bucket, however large K is
        return min(self.ring, Full().slots(loops))

    def slot(self, i: Array) -> Array:
        return i % self.ring

    def later_slots(self, stopped: Array, n: Array, S: int) -> Array:
        # slot j is written by some later iteration i in [stopped, n) with i % K == j
        j = jnp.arange(S)[:, None]
        return ((j - stopped[None]) % self.ring) < (n - stopped[None])

    def __str__(self) -> str:
        return f"ring:{self.ring}"


@POLICIES.register("first")
@dataclass(frozen=True)
class First(CachePolicy):
    def writes(self, i: Array) -> Array:
        return i == 0
