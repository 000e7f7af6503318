"""Loop-count distributions: how many times a circuit runs at each training step.

Parsing, validation and summaries only (no JAX): drawing a count is `loopformer.model.loop.sample_loops`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

DISTRIBUTIONS = ("fixed", "uniform", "poisson_lognormal")
_FORMS = "an int, 'fixed(n)', 'uniform(a, b)' or 'poisson_lognormal(mean, sigma)'"


@dataclass(frozen=True)
class LoopDistribution:
    """Training distribution of one circuit's loop count.

    - ``fixed(n)``: always n.
    - ``uniform(a, b)``: integers a..b inclusive.
    - ``poisson_lognormal(mean, sigma)``: tau ~ N(log(mean) - sigma^2/2, sigma), n = Poisson(e^tau) + 1
      (Geiping et al. 2025); E[e^tau] = mean, so E[n] = mean + 1 before the cap.
    Every draw is clipped to [1, cap].
    """

    kind: str
    a: float
    b: float = 0.0
    cap: int = 64

    @staticmethod
    def parse(text: str | int, cap: int = 64) -> LoopDistribution:
        """Parse ``8``, ``"fixed(8)"``, ``"uniform(2, 8)"`` or ``"poisson_lognormal(8, 0.5)"``;
        raises ValueError with the accepted forms."""
        if isinstance(text, int | str) and not isinstance(text, bool) and str(text).strip().isdigit():
            text = f"fixed({int(text)})"
        m = re.fullmatch(r"\s*(\w+)\s*\(\s*([-\d.eE+]+)\s*(?:,\s*([-\d.eE+]+)\s*)?\)\s*", str(text))
        if not m or m.group(1) not in DISTRIBUTIONS:
            raise ValueError(f"{text!r} is not a loop distribution; use {_FORMS}")
        kind, a, b = m.group(1), float(m.group(2)), m.group(3)
        if (kind == "fixed") != (b is None):
            raise ValueError(f"{text!r}: wrong number of arguments; use {_FORMS}")
        dist = LoopDistribution(kind, a, float(b) if b is not None else 0.0, cap)
        dist.validate()
        return dist

    def validate(self) -> None:
        if self.cap < 1:
            raise ValueError(f"cap must be >= 1, got {self.cap}")
        if self.kind == "fixed" and (self.a < 1 or self.a != int(self.a)):
            raise ValueError(f"fixed(n) needs an integer n >= 1, got {self.a}")
        if self.kind == "uniform" and not (1 <= self.a <= self.b and self.a == int(self.a) and self.b == int(self.b)):
            raise ValueError(f"uniform(a, b) needs integers 1 <= a <= b, got ({self.a}, {self.b})")
        if self.kind == "poisson_lognormal" and not (self.a > 0 and self.b >= 0):
            raise ValueError(f"poisson_lognormal(mean, sigma) needs mean > 0, sigma >= 0, got ({self.a}, {self.b})")

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"fixed({int(self.a)})"
        fmt = (lambda v: str(int(v))) if self.kind == "uniform" else (lambda v: f"{v:g}")
        return f"{self.kind}({fmt(self.a)}, {fmt(self.b)})"

    def mean(self) -> float:
        """Expected count before the cap (used to scale initialisation by the effective depth)."""
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return (self.a + self.b) / 2
        return self.a + 1.0

    def typical_max(self) -> int:
        """A count the distribution rarely exceeds (cap-limited); used for display only."""
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return int(self.b)
        return min(self.cap, int(math.ceil(self.a * math.exp(2 * self.b))) + 1)

    def typical_range(self) -> tuple[int, int]:
        """[lo, hi] of the counts the distribution typically draws (display only)."""
        lo = int(self.a) if self.kind in ("fixed", "uniform") else 1
        return lo, self.typical_max()
