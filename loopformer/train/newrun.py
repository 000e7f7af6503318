"""A run directory written from weights made elsewhere (an import, a conversion): config.yaml, the data
files (tokenizer.json), and a checkpoint in the trainer's format (params, a fresh optimizer state, the
step, a fresh data-iterator position), so every analysis command reads it and `loopformer train`
trains on from it."""

from __future__ import annotations

import errno
import os
import re
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from loopformer.config import Config
from loopformer.data.sources import DataSource, build_data
from loopformer.errors import CheckpointError, ConfigError, not_utf8, printable
from loopformer.runs.checkpoint import Checkpoints
from loopformer.runs.layout import RunDir, dead_siblings, not_a_folder, outside_runs, unwritable_target
from loopformer.runs.log import log
from loopformer.runs.prepare import write_config
from loopformer.train.optim import make_optimizer
from loopformer.train.step import init_state

_WRITTEN = re.compile(r"config\.yaml(\.tmp)?|checkpoints|tokenizer\.json(\.tmp)?")  # what write_run puts in its folder


def out_dir(out: str, beside: Path | None = None) -> Path:
    """``--out``: a path, or a bare name placed beside ``beside`` (the source run); ConfigError for an empty one
    (it would write the run into the current directory)."""
    if not out.strip() or Path(out) == Path("."):
        raise ConfigError(f"--out {out!r}: name the new run's directory, e.g. --out runs/NAME (it is created)")
    path = Path(out)
    path = beside.parent / out if beside is not None and len(path.parts) == 1 else path
    byte = not_utf8(str(path.absolute()))
    if byte:  # the checkpoint library's save raised 70 tracebacks after the weights were read (#27 pass 33)
        shown = printable(out)
        raise ConfigError(f"--out {shown} holds the byte {byte}, which is not UTF-8 text, and the checkpoint library "
                          f"cannot write such a path; name it in UTF-8")
    if any(ch in str(path.absolute()) for ch in "[]"):  # convert found it after reading the weights, naming run.dir
        raise ConfigError(f"--out {out}: the run directory {path.absolute()} has a '[' or ']', which the checkpoint "
                          f"library reads as a pattern (its checkpoints could not be read back); choose another --out")
    problem = unwritable_target(path, "run", "run")
    if problem:
        raise ConfigError(problem)
    blocked = not_a_folder(path)
    if blocked:  # refused before any weight is read: the write failed after them as "Not a directory"
        where = "" if blocked[0] == path else f": {blocked[0]}"
        raise ConfigError(f"--out {out}{where} is {blocked[1]}, not a directory; choose another --out")
    if beside is not None and path.resolve() == beside.resolve():  # its line said to delete it: the source run
        raise ConfigError(f"--out {out} is the run being converted (--run); name a new directory for the looped run, "
                          f"e.g. --out {beside.name}-looped")
    taken = _occupied(path)
    if taken:  # before any weight is read (it was found after them, by write_run)
        raise CheckpointError(taken)
    return outside_runs(path)


def _occupied(run_dir: Path) -> str | None:
    """Why ``run_dir`` cannot take a new run (it holds one, or anything else), or None."""
    if RunDir(run_dir).checkpoint_steps():
        return f"{run_dir} already holds a run; pick another --out, or delete it (rm -r {shlex.quote(str(run_dir))})"
    held = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if held:  # never overwrite a config.yaml or anything else a user keeps there
        return (f"{run_dir} is not empty ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}); pick another "
                f"--out, or an empty or new directory")
    return None


def point_at(cfg: Config, run_dir: Path) -> Config:
    """``cfg`` with run.dir / run.name naming ``run_dir``."""
    run_dir = run_dir.resolve()
    cfg.run.dir, cfg.run.name = str(run_dir.parent), run_dir.name
    cfg.validate()
    return cfg


def write_run(cfg: Config, params: Any, data: DataSource | None = None, *, step: int = 0) -> Path:
    """Write ``cfg``'s run directory holding ``params`` at ``step``; CheckpointError when the directory
    already holds anything. ``data`` is the source whose tokenizer the run keeps (default: ``cfg``'s).

    The run is written into a temporary sibling (``.NAME.partial-PID``) renamed into place when complete, so
    a full disk, a read-only parent, Ctrl-C or SIGTERM leave no half-written run (and one clear line)."""
    run_dir = cfg.run_dir
    taken = _occupied(run_dir)
    if taken:
        raise CheckpointError(taken)
    data = data if data is not None else build_data(cfg)
    state = init_state(jax.tree.map(jnp.asarray, params), make_optimizer(cfg.train), ema=cfg.train.ema > 0)
    state["step"] = jnp.asarray(step, jnp.int32)
    iterator = data.train_iterator(cfg.data.batch_size // jax.process_count(), cfg.seed)
    tmp = run_dir.parent / f".{run_dir.name}.partial-{os.getpid()}"
    try:
        try:
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            for leftover in dead_siblings(run_dir, ("partial",), _WRITTEN):  # of a writer killed with kill -9
                shutil.rmtree(leftover, ignore_errors=True)
                log(f"removed {leftover}, left by an interrupted import or convert")
            shutil.rmtree(tmp, ignore_errors=True)
            RunDir(tmp).checkpoints.mkdir(parents=True)
        except OSError as e:
            raise CheckpointError(f"--out {run_dir}: cannot write to {run_dir.parent} ({e.strerror or e}); choose a "
                                  f"writable directory") from None
        write_config(cfg, tmp)  # names run_dir: the folder is renamed into it below
        data.save(tmp)
        with Checkpoints(RunDir(tmp).checkpoints, keep=cfg.train.keep_checkpoints, async_save=False) as ckpts:
            ckpts.save(step, state, iterator)
        try:
            tmp.rename(run_dir)  # replaces an empty directory atomically
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise CheckpointError(f"--out {run_dir}: another process wrote it meanwhile; pick another --out") from None
            raise
    except OSError as e:
        _discard(tmp)
        raise CheckpointError(f"--out {run_dir}: writing the run failed ({e.strerror or e}); nothing was written"
                              ) from None
    except CheckpointError as e:  # a disk too full for the checkpoint: said of --out, not of the temporary folder
        _discard(tmp)
        # said of --out, and the disk named by its parent: the folders in the error are gone when it is read (its `df
        # -h FOLDER` said "No such file or directory")
        why = str(e).replace(str(RunDir(tmp).checkpoints), str(run_dir.parent)).replace(str(tmp), str(run_dir))
        if why.startswith(f"--out {run_dir}: "):  # the parent's own error above: said once
            why = why.removeprefix(f"--out {run_dir}: ")
        raise CheckpointError(f"--out {run_dir}: {why}; nothing was written") from None
    except BaseException:  # Ctrl-C, SIGTERM (the command line turns it into SystemExit): nothing half-written
        _discard(tmp)
        raise
    return run_dir


def _discard(tmp: Path) -> None:
    """Remove the temporary run folder. A save that a signal interrupted leaves the checkpoint library's writer
    threads running for a moment, and they created folders in it after one removal (an empty
    ``0.orbax-checkpoint-tmp/`` was left behind): removed again until it stays gone, for at most a second."""
    for _ in range(20):
        shutil.rmtree(tmp, ignore_errors=True)
        time.sleep(0.05)
        if not tmp.exists():
            return
