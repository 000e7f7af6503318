"""Layer duplication made permanent (mergekit's passthrough merge): a plain stack whose layers are the
stack's layers in the order of a schedule, each copy its own weights (no tying). Running the result
equals running the original with that schedule (`loopformer.model.schedule`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from loopformer.config.schema import ModelConfig
from loopformer.errors import PlanError
from loopformer.surgery.naming import flat


def duplicated(cfg: ModelConfig, params: Any, stack: str, order: Sequence[int]) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, flat params {path: array}) of the model with ``stack``'s layers copied in ``order``
    (-1 entries dropped)."""
    layers = getattr(cfg, stack)
    order = [int(i) for i in order if int(i) >= 0]
    if not order or any(i >= layers for i in order):
        raise PlanError(f"a {stack} schedule needs layer indices in 0..{layers - 1}, got {order}")
    out = {}
    for path, leaf in flat(params).items():
        out[path] = np.asarray(leaf)[np.asarray(order)] if path.startswith(f"{stack}/") else np.asarray(leaf)
    return dataclasses.replace(cfg, **{stack: len(order)}), out
