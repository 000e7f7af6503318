"""Layer schedules: the order in which a plain stack (prelude or coda, [L, ...] stacked weights) runs its
layers, as a runtime int32 array (`loopformer.model.layers.run_stack`; a `Plan`'s ``schedules``).

Duplicating the contiguous block [i, j) of L layers r times ("repeat yourself" / RYS) runs

    0 .. j-1,  (i .. j-1) x r,  j .. L-1          (length L + r (j - i))

Schedules are padded with -1 (a skipped step) to one common length, so every duplication of a scan
shares one compiled program.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from loopformer.errors import PlanError

SKIP = -1


def duplication(layers: int, start: int, end: int, repeats: int = 1) -> list[int]:
    """The layer order of ``layers`` layers with [start, end) run ``repeats`` extra times."""
    if not 0 <= start < end <= layers:
        raise PlanError(f"layer range [{start}, {end}) is not inside the stack's {layers} layers "
                        f"(0 <= start < end <= {layers})")
    if repeats < 0:
        raise PlanError(f"repeats must be >= 0, got {repeats}")
    return list(range(end)) + list(range(start, end)) * repeats + list(range(end, layers))


def padded(order: Sequence[int], length: int) -> np.ndarray:
    """int32 [length]: ``order`` followed by -1 (skipped steps)."""
    if len(order) > length:
        raise PlanError(f"a layer schedule of {len(order)} steps does not fit in length {length}")
    out = np.full((length,), SKIP, np.int32)
    out[: len(order)] = order
    return out


def longest(layers: int, repeats: Sequence[int]) -> int:
    """The schedule length that holds every duplication of a stack of ``layers`` at these repeat counts."""
    return layers + max([0, *repeats]) * layers


def ranges(layers: int) -> Iterator[tuple[int, int]]:
    """Every contiguous range [start, end) of ``layers`` layers: L (L + 1) / 2 of them."""
    for start in range(layers):
        for end in range(start + 1, layers + 1):
            yield start, end


__all__ = ["SKIP", "duplication", "longest", "padded", "ranges"]
