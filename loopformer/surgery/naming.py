"""Parameter paths as strings: ``stages/0/circuits/X/blocks/attn/qkv/kernel``.

A param pytree (``nnx.to_pure_dict``) flattens to ``{path: array}`` and fills back into the shape of any
abstract tree, so surgery reads and writes weights by name whatever the keys' types (the stage index is
an int in the pytree, a string in the path).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from loopformer.errors import CheckpointError


def path_str(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def flat(tree: Any) -> dict[str, Any]:
    """{path: leaf} of a param pytree."""
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def circuit_prefix(stage: int, name: str) -> str:
    """Where circuit ``name`` of stage ``stage`` keeps its weights."""
    return f"stages/{stage}/circuits/{name}/"


def fill(abstract: Any, value: Callable[[str, tuple[int, ...]], Any] | Mapping[str, Any], what: str = "weights") -> Any:
    """A pytree shaped like ``abstract`` whose leaf at each path is ``value[path]`` (or ``value(path, shape)``),
    as float32 numpy arrays; CheckpointError naming the first path that is missing or misshapen."""

    def leaf(p: tuple, x: Any) -> Any:
        path = path_str(p)
        if callable(value):
            got = value(path, tuple(x.shape))
        else:
            if path not in value:
                raise CheckpointError(f"{what}: nothing for the model's parameter {path}")
            got = value[path]
        got = np.asarray(got, dtype=np.float32)
        if got.shape != tuple(x.shape):
            raise CheckpointError(f"{what}: {path} has shape {list(got.shape)}, the model needs {list(x.shape)}")
        return got.astype(x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)
