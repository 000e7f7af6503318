"""Run directories: create one, check what a resume changes, and open a trained run for analysis.

    <run.dir>/<run.name>/
      config.yaml            resolved config of the latest start (a resume may change all but the
                             architecture and the task)
      config_changes.jsonl   one line per resume that changed settings: {"step", "changes": [...]}
      checkpoints/           orbax: params, optimizer, step, grain iterator state
      tb/ metrics.jsonl      tensorboard events and logged scalars
      .train.lock            held (flock) by the training process for the run's life: a second
                             trainer on the directory stops with one line (multi-process runs: process i
                             of n > 1 locks .train.lock.i); analysis commands take no lock
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import yaml
from flax import nnx

from loopformer.config import ARCHITECTURE, SCHEDULE, TASK, Change, Config, circuit_label, config_changes, config_from_dict
from loopformer.data.sources import DataSource, build_data
from loopformer.errors import CheckpointError, ConfigError
from loopformer.evaluation.evaluator import evaluator_for
from loopformer.evaluation.run import AnalysisError, LoadedRun, RunInfo, log
from loopformer.model.transformer import LoopedTransformer, build_model
from loopformer.train.checkpoint import OLDER_LAYOUT, Checkpoints
from loopformer.train.optim import make_optimizer
from loopformer.train.step import init_state

CONFIG_FILE = "config.yaml"
CHANGES_FILE = "config_changes.jsonl"
CHECKPOINTS = "checkpoints"
LOCK_FILE = ".train.lock"


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps with a checkpoint directory on disk (finished or not), ascending; cheap, no orbax."""
    ckpt = Path(run_dir) / CHECKPOINTS
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def _older_layout(data: Any) -> bool:
    """Whether a config dict was written before circuits were stored by name (0.1: read/write fields)."""
    try:
        circuits = [c for s in data["model"]["stages"] for c in s["circuits"]]
    except (KeyError, TypeError):
        return False
    return any(isinstance(c, dict) and ("read" in c or "write" in c) for c in circuits)


def _read_config_dict(path: Path, run_dir: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise CheckpointError(f"{path} is corrupt (not YAML); delete {run_dir} to start over") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is corrupt (not a mapping); delete {run_dir} to start over")
    if _older_layout(data):
        raise CheckpointError(f"{run_dir} {OLDER_LAYOUT}")
    return data


def resume_changes(cfg: Config, run_dir: Path) -> list[Change]:
    """What ``cfg`` changes against the config a run directory was trained with (nothing for a fresh
    directory). CheckpointError naming the first field when the architecture or the task differs."""
    saved = run_dir / CONFIG_FILE
    if not (saved.is_file() and checkpoint_steps(run_dir)):
        return []
    old = _read_config_dict(saved, run_dir)
    with contextlib.suppress(ConfigError):  # fields added since the run was written compare at their defaults
        old = config_from_dict(old).to_dict()
    changes = config_changes(old, cfg.to_dict())
    refused = [c for c in changes if c.part in (ARCHITECTURE, TASK)]
    if refused:
        what = "architecture" if refused[0].part == ARCHITECTURE else "task"
        raise CheckpointError(
            f"{run_dir} holds a run with a different {what} ({refused[0]}); resume it with its own {what}, "
            f"or pick a new run.name (or delete {run_dir}) to start fresh")
    return changes


def describe_change(change: Change) -> str:
    """``loops of X: uniform(8, 16) -> uniform(8, 24)``."""
    label = circuit_label(change.path)
    if change.part == SCHEDULE:
        return f"{label}: {change.old} -> {change.new}"
    return f"{label}: {change.old!r} -> {change.new!r}"


def make_run_dir(cfg: Config) -> Path:
    """Create the run directory; ConfigError with the fix if it cannot be written."""
    run_dir = cfg.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_test.{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run.dir: cannot write to {run_dir} ({e.strerror or e}); set run.dir=<a writable "
                          f"directory> or run.name=<another name>") from None
    return run_dir


def lock_file(run_dir: Path, process: int = 0) -> Path:
    return Path(run_dir) / (LOCK_FILE if process == 0 else f"{LOCK_FILE}.{process}")


@contextlib.contextmanager
def run_lock(run_dir: Path, process: int | None = None) -> Iterator[Path]:
    """Hold an exclusive OS lock (``flock``) on the run directory while training it.

    The lock belongs to the open file, so the kernel releases it when the process exits, however it
    exits (``kill -9`` included): a stale lock file never blocks a later run. The file also names the
    holder (pid, host, start time) for the error the next trainer prints. In a multi-process run each
    process locks its own file (``.train.lock`` for process 0, ``.train.lock.<i>``), so a second job
    fails in every process at once instead of hanging in a collective. A filesystem without locks
    (some network mounts) trains unlocked, with a note."""
    process = jax.process_index() if process is None else process
    path = lock_file(run_dir, process)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                info = json.loads(os.pread(fd, 4096, 0) or b"{}")
                holder = f" (pid {info['pid']} on {info['host']}, since {info['since']})"
            raise ConfigError(f"{run_dir} is being trained by another process{holder}; wait for it to finish "
                              f"(or stop it), or set run.name=<another name> to start a separate run") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            if process == 0:
                print(f"note: {run_dir}'s filesystem has no file locks ({e.strerror}); nothing stops a second "
                      f"trainer on this directory", flush=True)
        else:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def trained_to(run_dir: Path) -> int | None:
    """The newest checkpoint step on disk, or None."""
    steps = checkpoint_steps(run_dir)
    return steps[-1] if steps else None


def prepare_run_dir(cfg: Config) -> tuple[Path, list[Change]]:
    """Create the run directory (`make_run_dir`), check a resume against the run's config
    (`resume_changes`) and write the new config, unless the run is already trained to train.steps
    (a rerun that trains nothing leaves config.yaml as it was). Returns the directory and the changes."""
    run_dir = make_run_dir(cfg)
    changes = resume_changes(cfg, run_dir)
    done = trained_to(run_dir)
    if jax.process_index() == 0 and not (done is not None and done >= cfg.train.steps):
        saved = run_dir / CONFIG_FILE
        tmp = saved.with_suffix(".yaml.tmp")
        tmp.write_text(cfg.to_yaml())
        tmp.replace(saved)  # atomic: never a half-written config.yaml
    return run_dir, changes


def record_changes(run_dir: Path, step: int, changes: list[Change]) -> None:
    """Append a resume's changes to ``config_changes.jsonl`` (the run's history of settings)."""
    if not changes or jax.process_index() != 0:
        return
    line = {"step": step, "changes": [{"path": c.path, "old": c.old, "new": c.new, "part": c.part} for c in changes]}
    with open(run_dir / CHANGES_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config of an existing run (for the analysis commands)."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"no run at {run_dir}: {path} is missing (train first, or point --run at a "
                              f"directory made by `loopformer train`)")
    return config_from_dict(_read_config_dict(path, run_dir))


# ----------------------------------------------------------------------------- models and params


def make_model(cfg: Config, data: DataSource) -> LoopedTransformer:
    """A freshly initialised model of ``cfg`` with the vocabulary of its data."""
    vocab = cfg.model.vocab_size or data.vocab_size
    if vocab < data.vocab_size:
        raise ConfigError(f"model.vocab_size ({vocab}) is smaller than the data needs ({data.vocab_size}); set "
                          f"model.vocab_size=0 to take it from the data")
    return build_model(cfg.model, vocab, cfg.seed)


def abstract_like(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


def abstract_model(cfg: Config, data: DataSource | None = None) -> LoopedTransformer:
    """The model of ``cfg``, shaped only (``eval_shape``: nothing initialised): its structure, circuit
    names and parameter shapes."""
    return nnx.eval_shape(lambda: make_model(cfg, data if data is not None else build_data(cfg)))


def restore_params(cfg: Config, step: int | None = None, data: DataSource | None = None
                   ) -> tuple[LoopedTransformer, Any, int]:
    """Model structure and trained params of a run (latest checkpoint, or ``step``).

    The model and train state are only *shaped* (no initialisation is computed), so opening a run is
    fast; the returned model is abstract: use it for its structure and pass the returned params to it."""
    model = abstract_model(cfg, data)
    params = nnx.to_pure_dict(nnx.state(model))
    state = jax.eval_shape(lambda p: init_state(p, make_optimizer(cfg.train)), params)
    with Checkpoints(cfg.run_dir / CHECKPOINTS, keep=cfg.train.keep_checkpoints, async_save=False) as ckpts:
        restored = ckpts.restore(state, None, step=step)
    return model, restored["params"], int(restored["step"])


# ----------------------------------------------------------------------------- analysis


def read_run(path: str | Path) -> RunInfo:
    """Parse ``<path>/config.yaml``; the config's run.dir/run.name are re-pointed at ``path`` so a
    moved or copied run directory still finds its own checkpoints."""
    path = Path(path)
    if not path.is_dir():
        raise AnalysisError(f"--run {path}: no such directory (point --run at a directory made by "
                            f"`loopformer train`, e.g. runs/quickstart)")
    cfg = load_run_config(path)
    cfg.run.dir, cfg.run.name = str(path.resolve().parent), path.resolve().name
    return RunInfo(path, cfg, build_data(cfg))


def load_run(info: RunInfo, step: int | None = None) -> LoadedRun:
    """Restore the latest checkpoint of ``info`` (or ``step``)."""
    model, params, restored = restore_params(info.cfg, step, info.data)  # type: ignore[arg-type]
    log(f"loaded {info.path} at step {restored}")
    return LoadedRun(info, model, params, restored, evaluator_for(model))
