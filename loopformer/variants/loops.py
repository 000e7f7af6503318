"""Loop-count distributions: how many times a circuit runs at each training step.

    fixed(n)                    always n
    uniform(a, b)               integers a..b inclusive
    poisson_lognormal(m, s)     tau ~ N(log(m) - s^2/2, s), n = Poisson(e^tau) + 1 (Geiping et al. 2025);
                                E[e^tau] = m, so E[n] = m + 1 before the cap
    per_difficulty(a, b)        each example its own count round(a * difficulty + b) (Fan et al. 2024's
                                T(n)), read from the batch's ``difficulty``; the same rule at evaluation
                                (``--loops X=auto``), where it is not capped

Every draw is clipped to [1, cap]. A YAML ``loops:`` value is ``8`` (= fixed(8)) or ``NAME(args)``; a new
distribution is one class here, registered under its name, with its arguments as dataclass fields.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

import jax
import jax.numpy as jnp

from loopformer.errors import unplain_digits
from loopformer.variants.registry import Registry

MAX_LOOPS = 10_000  # the most iterations anything may ask for: far past anything useful; a typo of extra
# zeros would otherwise run for hours

Array = jax.Array
DISTRIBUTIONS: Registry = Registry("loop distribution")


@dataclass(frozen=True)
class LoopDistribution:
    """Training distribution of one circuit's loop count (its arguments are the subclass's fields)."""

    cap: int = field(default=64, kw_only=True)
    kind: ClassVar[str] = ""
    per_example: ClassVar[bool] = False  # counts come from each example's difficulty (`counts`), not a draw

    @staticmethod
    def parse(text: str | int, cap: int = 64) -> LoopDistribution:
        """``8``, ``"fixed(8)"``, ``"uniform(2, 8)"``, ``"poisson_lognormal(8, 0.5)"``; ValueError naming the forms."""
        forms = ", ".join(f"'{c.form()}'" for c in _classes())
        foreign = unplain_digits(str(text))
        if foreign:  # `fixed(٣)` and `٣` ran 3 loops (#27 pass 40's leftover)
            raise ValueError(f"{text!r}: {foreign}")
        if isinstance(text, int | str) and not isinstance(text, bool) and str(text).strip().isdigit():
            text = f"fixed({int(text)})"
        m = re.fullmatch(r"\s*(\w+)\s*\(\s*([^()]*)\)\s*", str(text))
        if not m or m.group(1) not in DISTRIBUTIONS:
            raise ValueError(f"{text!r} is not a loop distribution; use an int or {forms}")
        cls = DISTRIBUTIONS.get(m.group(1))
        args = [a.strip() for a in m.group(2).split(",")] if m.group(2).strip() else []
        if len(args) != len(cls.arg_names()):
            raise ValueError(f"{text!r}: wrong number of arguments; use an int or {forms}")
        try:
            values = [float(a) for a in args]
        except ValueError:
            raise ValueError(f"{text!r}: the arguments must be numbers; use an int or {forms}") from None
        if not all(math.isfinite(v) for v in values):  # inf became an OverflowError in int(round(inf))
            raise ValueError(f"{text!r}: the arguments must be finite numbers; use an int or {forms}")
        if cap < 1:
            raise ValueError(f"cap must be >= 1, got {cap}")
        dist = cls(*values, cap=cap)
        dist.validate()
        return dist

    @classmethod
    def arg_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "cap")

    @classmethod
    def form(cls) -> str:
        return f"{cls.kind}({', '.join(cls.arg_names())})"

    def args(self) -> tuple[float, ...]:
        return tuple(getattr(self, n) for n in self.arg_names())

    # --- what each distribution defines
    def validate(self) -> None:
        """ValueError naming the form when the arguments are impossible."""

    def sample(self, key: Array) -> Array:
        """One draw, int32 [] before the cap (jit-friendly)."""
        raise NotImplementedError

    def mean(self) -> float:
        """Expected count before the cap (scales initialisation by the effective depth)."""
        raise NotImplementedError

    def typical_range(self) -> tuple[int, int]:
        """[lo, hi] of the counts it typically draws (display only)."""
        raise NotImplementedError

    def bulk(self) -> tuple[float, str]:
        """(a count most draws stay at or below, and how to say it): ``max_loops`` must reach it, or the
        cap would silently change the distribution."""
        hi = self.typical_range()[1]
        return hi, f"counts that loops={self} draws (up to {hi:g}): they"

    # --- shared
    def draw(self, key: Array) -> Array:
        """One draw clipped to [1, cap], int32 []."""
        return jnp.clip(self.sample(key), 1, self.cap).astype(jnp.int32)

    def typical_max(self) -> int:
        return self.typical_range()[1]

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(_fmt(v) for v in self.args())})"


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e16 else f"{v:g}"


def _classes() -> list[type[LoopDistribution]]:
    return [DISTRIBUTIONS.get(n) for n in DISTRIBUTIONS.names()]


def _integers(*values: float) -> bool:
    return all(float(v).is_integer() for v in values)


@DISTRIBUTIONS.register("fixed")
@dataclass(frozen=True)
class Fixed(LoopDistribution):
    n: float

    def validate(self) -> None:
        if self.n < 1 or not _integers(self.n):
            raise ValueError(f"fixed(n) needs an integer n >= 1, got {_fmt(self.n)}")

    def sample(self, key: Array) -> Array:
        return jnp.asarray(int(self.n), jnp.int32)

    def mean(self) -> float:
        return float(self.n)

    def typical_range(self) -> tuple[int, int]:
        return int(self.n), int(self.n)


@DISTRIBUTIONS.register("uniform")
@dataclass(frozen=True)
class Uniform(LoopDistribution):
    a: float
    b: float

    def validate(self) -> None:
        if not (1 <= self.a <= self.b and _integers(self.a, self.b)):
            raise ValueError(f"uniform(a, b) needs integers 1 <= a <= b, got ({_fmt(self.a)}, {_fmt(self.b)})")

    def sample(self, key: Array) -> Array:
        return jax.random.randint(key, (), int(self.a), int(self.b) + 1, dtype=jnp.int32)

    def mean(self) -> float:
        return (self.a + self.b) / 2

    def typical_range(self) -> tuple[int, int]:
        return int(self.a), int(self.b)


@DISTRIBUTIONS.register("poisson_lognormal")
@dataclass(frozen=True)
class PoissonLognormal(LoopDistribution):
    mean_count: float
    sigma: float

    def validate(self) -> None:
        # sigma past 10 puts nearly every draw at 1 and the rest past any cap (and e^(2 sigma) overflows past 354)
        if not (self.mean_count > 0 and 0 <= self.sigma <= 10):
            raise ValueError(f"poisson_lognormal(mean, sigma) needs mean > 0, 0 <= sigma <= 10, got "
                             f"({_fmt(self.mean_count)}, {_fmt(self.sigma)})")

    def sample(self, key: Array) -> Array:
        k_tau, k_n = jax.random.split(key)
        tau = jnp.log(self.mean_count) - self.sigma**2 / 2 + self.sigma * jax.random.normal(k_tau, ())
        return jax.random.poisson(k_n, jnp.exp(tau), dtype=jnp.int32) + 1

    def mean(self) -> float:
        return self.mean_count + 1.0

    def typical_range(self) -> tuple[int, int]:
        return 1, min(self.cap, int(math.ceil(self.mean_count * math.exp(2 * self.sigma))) + 1)

    def bulk(self) -> tuple[float, str]:
        # the long tail is cut by design; the bulk (around the mean) must not be
        return self.mean(), f"the mean count ({self.mean():g}) of loops={self}: most draws"

    @classmethod
    def form(cls) -> str:
        return f"{cls.kind}(mean, sigma)"


@DISTRIBUTIONS.register("per_difficulty")
@dataclass(frozen=True)
class PerDifficulty(LoopDistribution):
    """round(a * difficulty + b) iterations for each example, every token of it (Fan et al. 2024: the loop
    count T(n) grows with the instance). ``cap`` clips training counts (max_loops must reach a * hi + b
    of the training range, which `Config.validate` checks); evaluation's ``auto`` uses the rule uncapped."""

    a: float
    b: float
    per_example: ClassVar[bool] = True

    def validate(self) -> None:
        if not (self.a >= 0 and self.a + self.b >= 1):
            raise ValueError(f"per_difficulty(a, b) needs a >= 0 and a + b >= 1 (at least one loop at difficulty 1), "
                             f"got ({_fmt(self.a)}, {_fmt(self.b)})")

    def counts(self, difficulty: Array, cap: int | None = None) -> Array:
        """int32 counts round(a * d + b) clipped to [1, cap] (default: this distribution's cap), elementwise
        over ``difficulty`` (padding, d = 0, gets max(1, round(b)))."""
        n = jnp.round(self.a * jnp.asarray(difficulty, jnp.float32) + self.b)
        return jnp.clip(n, 1, self.cap if cap is None else cap).astype(jnp.int32)

    def at(self, difficulty: int) -> int:
        """The count of one difficulty (uncapped)."""
        return max(1, int(round(self.a * difficulty + self.b)))

    def sample(self, key: Array) -> Array:  # no difficulty: the count of the largest instances the cap allows
        return jnp.asarray(self.cap, jnp.int32)

    def mean(self) -> float:
        """Unknown without the data: the midpoint of [a + b, cap] (cap = max_loops, which must reach the
        training range's largest count), used only to scale initialisation and for display."""
        return (max(1.0, self.a + self.b) + self.cap) / 2

    def typical_range(self) -> tuple[int, int]:
        return self.at(1), self.cap

    def bulk(self) -> tuple[float, str]:
        return self.at(1), f"the count of difficulty 1 under loops={self}: it"  # the data check is Config's
