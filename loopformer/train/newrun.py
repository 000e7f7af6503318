"""A run directory written from weights made elsewhere (an import, a conversion): config.yaml, the data
files (tokenizer.json), and a checkpoint in the trainer's format (params, a fresh optimizer state, the
step, a fresh data-iterator position), so every analysis command reads it and `loopformer train`
trains on from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from loopformer.config import Config
from loopformer.data.sources import DataSource, build_data
from loopformer.errors import CheckpointError, ConfigError
from loopformer.runs.checkpoint import Checkpoints
from loopformer.runs.layout import RunDir, outside_runs
from loopformer.runs.prepare import make_run_dir, prepare_run_dir
from loopformer.train.optim import make_optimizer
from loopformer.train.step import init_state


def out_dir(out: str, beside: Path | None = None) -> Path:
    """``--out``: a path, or a bare name placed beside ``beside`` (the source run); ConfigError for an empty one
    (it would write the run into the current directory)."""
    if not out.strip() or Path(out) == Path("."):
        raise ConfigError(f"--out {out!r}: name the new run's directory, e.g. --out runs/NAME (it is created)")
    path = Path(out)
    return outside_runs(beside.parent / out if beside is not None and len(path.parts) == 1 else path)


def point_at(cfg: Config, run_dir: Path) -> Config:
    """``cfg`` with run.dir / run.name naming ``run_dir``."""
    run_dir = run_dir.resolve()
    cfg.run.dir, cfg.run.name = str(run_dir.parent), run_dir.name
    cfg.validate()
    return cfg


def write_run(cfg: Config, params: Any, data: DataSource | None = None, *, step: int = 0) -> Path:
    """Write ``cfg``'s run directory holding ``params`` at ``step``; CheckpointError when the directory
    already holds a run. ``data`` is the source whose tokenizer the run keeps (default: ``cfg``'s)."""
    run_dir = cfg.run_dir
    if RunDir(run_dir).checkpoint_steps():
        raise CheckpointError(f"{run_dir} already holds a run; pick another --out, or delete it (rm -r {run_dir})")
    held = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if held:  # never overwrite a config.yaml or anything else a user keeps there
        raise CheckpointError(f"{run_dir} is not empty ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}); "
                              f"pick another --out, or an empty or new directory")
    make_run_dir(cfg)
    data = data if data is not None else build_data(cfg)
    prepare_run_dir(cfg)
    data.save(run_dir)
    state = init_state(jax.tree.map(jnp.asarray, params), make_optimizer(cfg.train), ema=cfg.train.ema > 0)
    state["step"] = jnp.asarray(step, jnp.int32)
    iterator = data.train_iterator(cfg.data.batch_size // jax.process_count(), cfg.seed)
    with Checkpoints(RunDir(run_dir).checkpoints, keep=cfg.train.keep_checkpoints, async_save=False) as ckpts:
        ckpts.save(step, state, iterator)
    return run_dir
