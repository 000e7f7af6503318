"""A trained plain model becomes a looped one (retrofitted recurrence, McLeish et al. 2025):

    layers 0 .. L-1   ->   prelude [0, B)  ─  (core [B, C))^n  ─  coda [C, L)       (dropped layers removed)

The core is one circuit of the full width d_model made of the plain layers B .. C-1, built so that one
loop computes exactly what those layers computed:

    io: slice (all of d_model)   the circuit's slice is the whole stream
    output: replace              it reads the raw stream (not the bank's normed copy) and its final state
                                 replaces the stream: x <- h_n (no out_norm, no write projection)
    init: input, inject: none    h_0 = x, h_i = layers(h_{i-1}): at n loops the core block runs n times,
                                 the same as duplicating [B, C) n - 1 times (RYS)
    inject: add, init: zeros     h_1 = layers(0 + x) is exact too; later loops re-inject x ("recall")
    inject: concat, init: input  the adapter [h; x] -> w starts as [I; 0] (exact at every count, like
                                 none), and training may learn how much of x to recall
    state_norm: false            a plain layer stack normalises nothing between layers

Pre-norm blocks normalise their own input, so reading the raw stream is what the plain layers did; a
residual circuit (x + write(out_norm(h))) could not be exact, whatever its weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from flax import nnx

from loopformer.config.schema import CircuitConfig, ModelConfig, StageConfig
from loopformer.errors import ConfigError, unplain_digits
from loopformer.model.transformer import build_model
from loopformer.surgery.naming import circuit_prefix, fill, flat

INJECTS = {"none": "input", "add": "zeros", "concat": "input"}  # inject -> the init that keeps 1 loop exact


@dataclass(frozen=True)
class Recipe:
    """Which layers become what, and the new circuit's loop schedule."""

    core: tuple[int, int]
    drop: frozenset[int] = frozenset()
    name: str = "X"
    inject: str = "none"
    loops: str = "uniform(1, 4)"
    max_loops: int = 64
    eval_loops: int = 1
    backprop: int = 4


RECIPE_FLAGS = {"name": "--name", "loops": "--loops", "max_loops": "--max-loops", "eval_loops": "--eval-loops",
                "backprop": "--backprop", "inject": "--inject"}  # `loopformer convert`'s flag of each circuit field


def parse_range(text: str, flag: str) -> tuple[int, int]:
    """``"B:C"`` -> (B, C)."""
    odd = unplain_digits(text or "")  # a regex \d and int() read '٣' as 3 (#27 pass 42)
    if odd:
        raise ConfigError(f"{flag} {text}: {odd}")
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text or "")
    if not m or int(m.group(1)) >= int(m.group(2)):
        raise ConfigError(f"{flag} {text}: write a layer range START:END with START < END, e.g. {flag} 2:4")
    return int(m.group(1)), int(m.group(2))


def parse_layers(items: Iterable[str], flag: str = "--drop") -> frozenset[int]:
    """Layer indices from ``["4:10", "12", "14,15"]`` (ranges are half-open); a layer named twice is refused, as a
    repeated entry of every list flag is."""
    out: set[int] = set()
    for item in items:
        for part in str(item).split(","):
            if ":" in part:
                a, b = parse_range(part, flag)
                layers = set(range(a, b))
            elif odd := unplain_digits(part):  # isdigit() and int() read '٢' as 2 (#27 pass 42)
                raise ConfigError(f"{flag} {item}: {odd}")
            elif part.strip().isdigit():
                layers = {int(part)}
            else:
                raise ConfigError(f"{flag} {item}: write layer indices or ranges START:END, e.g. {flag} 4:10")
            if out & layers:
                named = " ".join(f"{flag} {i}" for i in items)
                raise ConfigError(f"{named} names layer {min(out & layers)} twice; give each layer once")
            out |= layers
    return frozenset(out)


def plain_layers(cfg: ModelConfig) -> int:
    """Layers of a plain model (prelude then coda); ConfigError for a looped one."""
    if cfg.stages:
        raise ConfigError("convert takes a plain model (model.stages: []); this run already has looped circuits")
    return cfg.prelude + cfg.coda


def layout(cfg: ModelConfig, recipe: Recipe) -> tuple[list[int], list[int], list[int]]:
    """Source layer indices of the new prelude, core and coda."""
    total = plain_layers(cfg)
    b, c = recipe.core
    if not 0 <= b < c <= total:
        raise ConfigError(f"--core {b}:{c} is not inside the model's {total} layers (0 <= B < C <= {total})")
    inside = sorted(i for i in recipe.drop if b <= i < c)
    if inside:
        raise ConfigError(f"--drop {inside[0]}: layer {inside[0]} is in the core {b}:{c}; drop layers of the prelude "
                          f"or coda only")
    outside = sorted(i for i in recipe.drop if not 0 <= i < total)
    if outside:
        raise ConfigError(f"--drop {outside[0]}: the model has layers 0..{total - 1}")
    return ([i for i in range(b) if i not in recipe.drop], list(range(b, c)),
            [i for i in range(c, total) if i not in recipe.drop])


def converted_config(cfg: ModelConfig, recipe: Recipe) -> ModelConfig:
    """The looped model's config: prelude, one stage of one full-width replace circuit, coda."""
    if recipe.inject not in INJECTS:
        raise ConfigError(f"--inject {recipe.inject}: choose none, add or concat")
    pre, core, post = layout(cfg, recipe)
    circuit = CircuitConfig(name=recipe.name, depth=len(core), width=cfg.d_model, heads=cfg.heads,
                            kv_heads=cfg.kv_heads, mlp_ratio=cfg.mlp_ratio, io="slice", inject=recipe.inject,
                            state_norm=False, output="replace", window=cfg.window, init=INJECTS[recipe.inject],
                            loops=recipe.loops, max_loops=recipe.max_loops, eval_loops=recipe.eval_loops,
                            backprop=recipe.backprop)
    out = dataclasses.replace(cfg, prelude=len(pre), coda=len(post), stages=[StageConfig(circuits=[circuit])])
    with as_flags(recipe):
        out.validate()
    return out


@contextlib.contextmanager
def as_flags(recipe: Recipe) -> Iterator[None]:
    """A ConfigError about the new circuit's fields, naming them as the command's flags (the user wrote those)."""
    try:
        yield
    except ConfigError as e:
        # (a name that is no identifier is named by its index)
        circuit_field = rf"model\.stages\.0\.circuits\.(?:{re.escape(recipe.name)}|0)\.(\w+)"
        raise ConfigError(re.sub(circuit_field, lambda m: RECIPE_FLAGS.get(m.group(1), m.group(0)), str(e))) from None


def converted_params(cfg: ModelConfig, params: Any, recipe: Recipe) -> tuple[ModelConfig, Any]:
    """(new config, new params) of the plain model ``cfg`` with trained ``params``."""
    new = converted_config(cfg, recipe)
    pre, core, post = layout(cfg, recipe)
    src = {k: np.asarray(v) for k, v in flat(params).items()}
    vocab = src["embed/embedding"].shape[0]
    layers: dict[str, np.ndarray] = {}  # sub-path -> [L, ...] of every plain layer, prelude then coda
    for stack in ("prelude", "coda"):
        for path, a in src.items():
            if path.startswith(stack + "/"):
                sub = path[len(stack) + 1:]
                layers[sub] = a if sub not in layers else np.concatenate([layers[sub], a])
    circuit = circuit_prefix(0, recipe.name)

    def value(path: str, shape: tuple[int, ...]) -> Any:
        for prefix, idx in (("prelude/", pre), ("coda/", post), (circuit + "blocks/", core)):
            if path.startswith(prefix):
                return layers[path[len(prefix):]][np.asarray(idx, int)]
        if path == circuit + "adapter/kernel":  # [h; e] -> h at first: exact
            return np.concatenate([np.eye(shape[1]), np.zeros((shape[0] - shape[1], shape[1]))])
        if path == "stages/0/norm/scale":  # the bank's norm (unused by a replace circuit)
            return np.ones(shape)
        return src[path]

    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build_model(new, vocab, 0))))
    return new, fill(abstract, value, "convert")
