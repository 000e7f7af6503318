"""A run's model and trained weights: `make_model` (initialised), `abstract_model` (shapes only) and
`restore_params` (the params of a checkpoint, read without the optimizer state: no optimizer is
built to restore a run; a run's EMA weights when it has them)."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from loopformer.config import Config
from loopformer.data.sources import DataSource, build_data
from loopformer.errors import ConfigError
from loopformer.model.transformer import LoopedTransformer, build_model
from loopformer.runs.checkpoint import Checkpoints
from loopformer.runs.layout import RunDir


def make_model(cfg: Config, data: DataSource) -> LoopedTransformer:
    """A freshly initialised model of ``cfg`` with the vocabulary of its data."""
    vocab = cfg.model.vocab_size or data.vocab_size
    if vocab < data.vocab_size:
        raise ConfigError(f"model.vocab_size ({vocab}) is smaller than the data needs ({data.vocab_size}); set "
                          f"model.vocab_size=0 to take it from the data")
    return build_model(cfg.model, vocab, cfg.seed, digits=abacus_digits(cfg, data, vocab))


def abacus_digits(cfg: Config, data: DataSource, vocab: int) -> tuple[int, int] | None:
    """The digit token ids an abacus or coupled model reads (model.abacus_digits, else the data's), checked
    against the vocabulary and, for abacus where the data bound their runs, against model.abacus_size; None for
    other models."""
    m = cfg.model
    if not m.reads_places:
        return None
    digits = tuple(m.abacus_digits) or data.digits
    if digits is None:
        raise ConfigError(f"model.position={m.position}: the data ({cfg.data.task_label()}) has no digit tokens to "
                          f"take; set model.abacus_digits=[lo, hi] (the ids of the digits), or use model.position=rope")
    if digits[1] >= vocab:
        raise ConfigError(f"model.abacus_digits={list(digits)} reaches past the vocabulary ({vocab} ids); give ids "
                          f"below {vocab}")
    top = data.max_place
    if m.places and top is not None and top + m.position_offset >= m.abacus_size:
        raise ConfigError(f"model.abacus_size={m.abacus_size} holds places up to {m.abacus_size - 1}, but the data's "
                          f"numbers reach place {top}" + (f" (+ position_offset {m.position_offset} in training)"
                                                         if m.position_offset else "")
                          + f"; raise model.abacus_size to >= {top + m.position_offset + 1}")
    return digits


def abstract_model(cfg: Config, data: DataSource | None = None) -> LoopedTransformer:
    """The model of ``cfg``, shaped only (``eval_shape``: nothing initialised): its structure, circuit
    names and parameter shapes."""
    return nnx.eval_shape(lambda: make_model(cfg, data if data is not None else build_data(cfg)))


EMA_WEIGHTS, RAW_WEIGHTS = "EMA weights", "raw weights"
ONLY_WEIGHTS = "weights"  # a checkpoint without a moving average: its params are the only weights there are


def restore_weights(cfg: Config, step: int | None = None, data: DataSource | None = None, *, raw: bool = False
                    ) -> tuple[LoopedTransformer, Any, int, str]:
    """`restore_params`, and which weights it read: `EMA_WEIGHTS` (the checkpoint's "ema", the moving
    average of train.ema, unless ``raw``), `RAW_WEIGHTS` (its "params", with ``raw``, beside an "ema") or
    `ONLY_WEIGHTS` (its "params": the checkpoint keeps no moving average)."""
    model = abstract_model(cfg, data)
    params = nnx.to_pure_dict(nnx.state(model))
    with Checkpoints(RunDir(cfg.run_dir).checkpoints, keep=cfg.train.keep_checkpoints, async_save=False) as ckpts:
        has_ema = "ema" in ckpts.saved_parts(step)
        part = "ema" if has_ema and not raw else "params"
        restored = ckpts.restore({part: params, "step": jax.ShapeDtypeStruct((), "int32")}, None, step=step,
                                 partial=True, step_key="step")
    return (model, restored[part], int(restored["step"]),
            EMA_WEIGHTS if part == "ema" else RAW_WEIGHTS if has_ema else ONLY_WEIGHTS)


def restore_params(cfg: Config, step: int | None = None, data: DataSource | None = None, *, raw: bool = False
                   ) -> tuple[LoopedTransformer, Any, int]:
    """Model structure and trained params of a run (latest checkpoint, or ``step``): its EMA weights when
    it has them (train.ema), else (or with ``raw``) the params the optimizer trained.

    The model is only *shaped* (no initialisation is computed) and only the params and the step are
    read from the checkpoint (checked against their checksums), so opening a run is fast; the returned
    model is abstract: use it for its structure and pass the returned params to it."""
    model, params, restored, _ = restore_weights(cfg, step, data, raw=raw)
    return model, params, restored
