"""Position schemes: how attention learns where a token is (``model.position``).

    rope    rotary position embedding (rotate-half form) of queries and keys, theta = model.rope_base
    none    no position signal (NoPE): a causal model still tells positions apart through the mask
    abacus  NoPE attention, and each digit's embedding plus a learned vector for its place inside its
            number (McLeish et al. 2024, "Transformers can do arithmetic with the right embeddings"):
            a digit that follows k - 1 digits has place k (1 = the number's first digit as written; the
            tasks write numbers least significant digit first, so place k is the 10^(k-1) column).
            ``model.position_offset: K`` adds one offset drawn from U{0..K} per example to every place
            in training, so that places past the trained lengths have been seen (evaluation adds none)
    coupled RoPE that rotates each token by its digit place instead of its index in the sequence (position
            coupling, Cho et al. 2024, "Position coupling: improving length generalization of arithmetic
            transformers using task structure"): the digits of one place in every number share a position
            and every other token sits at 0, so attention compares places, and a query at place i finds
            place i + 1 at the same relative rotation however long the numbers are. The causal mask and
            windows still compare sequence indices

A new scheme is one class here: it transforms queries and keys given their positions (with ``places``
set, the model adds a place embedding read from `digit_places`; with ``on_places`` the positions it is
given are those places).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from loopformer.variants.registry import Registry

Array = jax.Array
POSITIONS: Registry = Registry("position scheme")


ROPE_SCALINGS = ("linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling for contexts past the pretraining length, as Hugging Face configs declare it
    (``rope_scaling`` / ``rope_parameters``). Frequencies f_i = base^(-i/half), i < half, become:

        linear   f_i / factor                 (position interpolation: positions divided by factor)
        llama3   wavelength w_i = 2 pi / f_i against the original context L: w_i < L / high_freq_factor keeps
                 f_i; w_i > L / low_freq_factor takes f_i / factor; between them s = (L / w_i - low) / (high - low)
                 blends (1 - s) f_i / factor + s f_i   (Llama 3.1)

    Both are static (a function of i), so the forward pass, cached decoding and recomputing agree exactly.
    (``dynamic`` NTK scaling changes every frequency with the sequence length, which keys already in a cache
    cannot follow: loopformer refuses it rather than decode something transformers would not.)"""

    kind: str = "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max: int = 8192

    @staticmethod
    def of(spec: dict, where: str) -> RopeScaling | None:
        """From ``{kind, factor, low_freq_factor, high_freq_factor, original_max}`` ({} = none); ValueError
        naming ``where`` and the field."""
        if not spec:
            return None
        unknown = sorted(set(spec) - {"kind", "factor", "low_freq_factor", "high_freq_factor", "original_max"})
        if unknown:
            raise ValueError(f"{where}: unknown key '{unknown[0]}' (kind, factor, low_freq_factor, high_freq_factor, "
                             f"original_max)")
        kind = spec.get("kind")
        if kind not in ROPE_SCALINGS:
            raise ValueError(f"{where}.kind: '{kind}' is not one of {', '.join(ROPE_SCALINGS)}")
        try:
            out = RopeScaling(kind, float(spec.get("factor", 1.0)), float(spec.get("low_freq_factor", 1.0)),
                              float(spec.get("high_freq_factor", 4.0)), int(spec.get("original_max", 8192)))
        except (TypeError, ValueError, OverflowError):  # OverflowError: original_max: .inf
            raise ValueError(f"{where}: factor, low_freq_factor, high_freq_factor must be numbers and original_max "
                             f"an integer, got {spec}") from None
        if not all(math.isfinite(v) for v in (out.factor, out.low_freq_factor, out.high_freq_factor)):
            raise ValueError(f"{where}: factor, low_freq_factor and high_freq_factor must be finite numbers (nan or inf "
                             f"would make the rotations nan or erase positions), got {spec}")
        if out.factor <= 0 or (kind == "llama3" and not (0 < out.low_freq_factor < out.high_freq_factor
                                                         and out.original_max >= 1)):
            raise ValueError(f"{where}: need factor > 0, and for llama3 0 < low_freq_factor < high_freq_factor and "
                             f"original_max >= 1; got {spec}")
        return out

    def apply(self, freq_H: Array) -> Array:
        """The scaled inverse frequencies [half] (float32)."""
        if self.kind == "linear":
            return freq_H / self.factor
        wavelen = 2 * jnp.pi / freq_H
        low_wavelen, high_wavelen = self.original_max / self.low_freq_factor, self.original_max / self.high_freq_factor
        scaled = jnp.where(wavelen > low_wavelen, freq_H / self.factor, freq_H)
        smooth = (self.original_max / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        blended = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, blended, scaled)


@dataclass(frozen=True)
class Position:
    base: float = 10000.0
    scaling: RopeScaling | None = None  # rope only
    kind: ClassVar[str] = ""
    places: ClassVar[bool] = False  # the model adds an embedding of each digit's place (`digit_places`)
    on_places: ClassVar[bool] = False  # the scheme rotates by each token's digit place, not its sequence index
    rotates: ClassVar[bool] = False  # the scheme is RoPE's rotation (it reads model.rope_base)

    def __call__(self, x_BTNH: Array, positions_BT: Array) -> Array:
        """Queries or keys [B, T, N, H] at ``positions_BT`` [B, T]."""
        raise NotImplementedError


def rope(x_BTNH: Array, positions_BT: Array, base: float, scaling: RopeScaling | None = None) -> Array:
    """Rotary position embedding (rotate-half form) applied to queries or keys, frequencies base^(-i/half)
    (scaled by ``scaling``)."""
    half = x_BTNH.shape[-1] // 2
    freq_H = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if scaling is not None:
        freq_H = scaling.apply(freq_H)
    angle_BTH = positions_BT[..., None].astype(jnp.float32) * freq_H
    sin, cos = jnp.sin(angle_BTH)[:, :, None, :], jnp.cos(angle_BTH)[:, :, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


@POSITIONS.register("rope")
@dataclass(frozen=True)
class Rope(Position):
    rotates: ClassVar[bool] = True

    def __call__(self, x_BTNH: Array, positions_BT: Array) -> Array:
        return rope(x_BTNH, positions_BT, self.base, self.scaling)


@POSITIONS.register("none")
@dataclass(frozen=True)
class NoPosition(Position):
    def __call__(self, x_BTNH: Array, positions_BT: Array) -> Array:
        return x_BTNH


@POSITIONS.register("abacus")
@dataclass(frozen=True)
class Abacus(NoPosition):
    places: ClassVar[bool] = True


@POSITIONS.register("coupled")
@dataclass(frozen=True)
class Coupled(Rope):
    on_places: ClassVar[bool] = True


def digit_places(tokens_BT: Array, digits: tuple[int, int], positions_BT: Array | None = None,
                 carry_B: Array | None = None) -> Array:
    """Each token's place inside its number [B, T] int32: 0 for a token outside ``digits`` (the inclusive
    id range [lo, hi] of the digit tokens), else 1 + the digits right before it in the same run.

    ``positions_BT`` (packed documents restart at 0) keeps a run from crossing into the next document:
    place <= position + 1. ``carry_B`` continues runs from earlier tokens (cached decoding: the place of
    each row's last token before this chunk). Closed form of the scan p_t = digit_t ? p_{t-1} + 1 : 0:
    p_t = t - (the last non-digit index <= t), with the carry as a non-digit at index -1 - carry."""
    B, T = tokens_BT.shape
    lo, hi = digits
    is_digit = (tokens_BT >= lo) & (tokens_BT <= hi)
    t = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    start = jnp.full((B, 1), -1, jnp.int32) if carry_B is None else (-1 - carry_B.astype(jnp.int32))[:, None]
    last_other = jax.lax.cummax(jnp.where(is_digit, start, t), axis=1)
    places = jnp.where(is_digit, t - last_other, 0)
    if positions_BT is not None:
        places = jnp.minimum(places, positions_BT.astype(jnp.int32) + 1)
    return places
