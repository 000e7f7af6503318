"""How a circuit's loop state starts and takes in its input every iteration.

Initial state h_0 (``init``), from the circuit's input e [B, T, w]:

    zeros     h_0 = 0
    input     h_0 = e
    noise     h_0 ~ N(0, init_noise_std^2)     (Huginn: a random start, so the loop learns to converge from anywhere)

Input injection (``inject``), the input of iteration i given h_{i-1}:

    add       h_{i-1} + e
    concat    A [h_{i-1}; e] with a learned adapter A: 2w -> w
    none      h_{i-1} (the input only enters through h_0)

A new scheme is one class here. Injections that need weights create them on the circuit (`Injection.build`)
under a fixed name, so checkpoints keep their layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from loopformer.variants.registry import Registry

Array = jax.Array
INITS: Registry = Registry("initial state")
INJECTIONS: Registry = Registry("input injection")


@dataclass(frozen=True)
class InitialState:
    kind: ClassVar[str] = ""

    def __call__(self, e: Array, key: Array, noise_std: float) -> Array:
        raise NotImplementedError


@INITS.register("zeros")
@dataclass(frozen=True)
class Zeros(InitialState):
    def __call__(self, e: Array, key: Array, noise_std: float) -> Array:
        return jnp.zeros_like(e)


@INITS.register("input")
@dataclass(frozen=True)
class Input(InitialState):
    def __call__(self, e: Array, key: Array, noise_std: float) -> Array:
        return e


@INITS.register("noise")
@dataclass(frozen=True)
class Noise(InitialState):
    def __call__(self, e: Array, key: Array, noise_std: float) -> Array:
        return (noise_std * jax.random.normal(key, e.shape)).astype(e.dtype)


@dataclass(frozen=True)
class Injection:
    kind: ClassVar[str] = ""

    def build(self, circuit: nnx.Module, width: int, *, dtype: Any, rngs: nnx.Rngs) -> None:
        """Create the injection's weights on ``circuit`` (none by default)."""

    def __call__(self, circuit: nnx.Module, h: Array, e: Array) -> Array:
        raise NotImplementedError


@INJECTIONS.register("add")
@dataclass(frozen=True)
class Add(Injection):
    def __call__(self, circuit: nnx.Module, h: Array, e: Array) -> Array:
        return h + e


@INJECTIONS.register("concat")
@dataclass(frozen=True)
class Concat(Injection):
    def build(self, circuit: nnx.Module, width: int, *, dtype: Any, rngs: nnx.Rngs) -> None:
        # [h; e] -> w. Initialised to pass h through plus a small e term would bias the loop; plain fan-in
        # scaling lets the optimiser choose how much recall to use.
        init = nnx.with_partitioning(nnx.initializers.normal(1.0 / math.sqrt(2 * width)), ("circuit", "circuit"))
        circuit.adapter = nnx.Linear(2 * width, width, use_bias=False, dtype=dtype, kernel_init=init, rngs=rngs)

    def __call__(self, circuit: nnx.Module, h: Array, e: Array) -> Array:
        return circuit.adapter(jnp.concatenate([h, e], axis=-1))


@INJECTIONS.register("none")
@dataclass(frozen=True)
class NoInjection(Injection):
    def __call__(self, circuit: nnx.Module, h: Array, e: Array) -> Array:
        return h
