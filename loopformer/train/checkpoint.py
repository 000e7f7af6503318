"""Checkpoints: a thin wrapper over `orbax.checkpoint.CheckpointManager`.

Each step directory holds two orbax items: `state` (the train-state pytree, written with
`StandardSave`, restored onto the shapes/dtypes/shardings of an abstract tree) and, optionally, `data`
(the grain iterator state, written with grain's orbax handler). Atomicity comes from orbax: a step is
written to a temporary directory and renamed when finished, and unfinished steps are never listed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from loopformer.errors import CheckpointError

PyTree = Any

OLDER_LAYOUT = ("comes from an older loopformer layout (before 0.2: circuit weights stored by group, "
                "stages/S/groups/G) that this version cannot read; retrain the run with this version, or read it "
                "with loopformer 0.1 (git commit 31e85c4 and earlier)")
_STATE = "state"
_DATA = "data"
_ITERATORS = (grain.DatasetIterator, grain.DataLoaderIterator)


def _leaf_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
    """Maps "a/b/0/c" -> shape for every array-like leaf of `tree`."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(getattr(leaf, "shape", ()))
            for path, leaf in leaves}


def _with_default_sharding(abstract_state: PyTree) -> PyTree:
    """Leaves without a sharding go to this process's first device, not to the sharding they were
    saved with (whose devices may not exist here)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def fill(leaf: Any) -> Any:
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)
        return leaf

    return jax.tree.map(fill, abstract_state)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0] if text else ''}"
    return line if len(line) <= 200 else line[:197] + "..."


class Checkpoints:
    """Saves and restores train state (and the data-iterator position) under `directory/<step>/`."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise CheckpointError(f"keep={keep} is invalid: keep at least 1 checkpoint")
        self.directory = Path(directory).expanduser().absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=False, enable_async_checkpointing=async_save
        )
        handlers = {_STATE: ocp.StandardCheckpointHandler(), _DATA: grain.checkpoint.CheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._last_saved: int | None = None

    def all_steps(self) -> list[int]:
        """Finished checkpoint steps, ascending (a save still in flight is not included)."""
        saving = self._manager.is_saving_in_progress()
        steps = sorted(self._manager.all_steps())
        return [s for s in steps if not (saving and s == self._last_saved)]

    def latest_step(self) -> int | None:
        """The newest finished step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: PyTree, data_iterator: Any = None, *, force: bool = False) -> bool:
        """Starts saving `state` (and `data_iterator`'s position) as `step`; returns whether it did.

        Nothing is saved when `step` is not newer than the latest checkpoint. The save runs in the
        background when async; call `wait()` before reading it from another process.
        """
        if data_iterator is not None and not isinstance(data_iterator, _ITERATORS):
            raise TypeError(f"data_iterator must be a grain iterator, got {type(data_iterator).__name__}")
        if step in self._manager.all_steps():
            return False
        items = {_STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[_DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        self.directory.mkdir(parents=True, exist_ok=True)
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            self._last_saved = step
        return saved

    def restore(self, abstract_state: PyTree, data_iterator: Any = None, step: int | None = None) -> PyTree:
        """Restores `step` (default: latest) onto `abstract_state`'s shapes, dtypes and shardings.

        When `data_iterator` is given, its position is restored in place from the same step.
        """
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(
                f"no checkpoint in {self.directory}: train first, or point --run at a run directory"
            )
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}: available steps are "
                f"{', '.join(map(str, steps))}"
            )
        step_dir = self.directory / str(step)
        earlier = [s for s in steps if s < step]
        corrupt = (
            f"checkpoint step {step} in {self.directory} is corrupt or incomplete: delete {step_dir}"
            + (f" or restore an earlier step with step={earlier[-1]}" if earlier else "")
            + " ({})"
        )
        try:
            metadata = self._manager.metadata(step)
            saved_items = set(metadata.item_handlers or {})
            state_metadata = metadata.item_metadata[_STATE]
        except Exception as e:
            raise CheckpointError(corrupt.format(f"cannot read its metadata: {_first_line(e)}")) from e
        if state_metadata is None:  # orbax logs a warning and returns None when _METADATA is unreadable
            raise CheckpointError(corrupt.format(f"{step_dir / _STATE} has no readable metadata"))
        saved_shapes = _leaf_shapes(state_metadata)
        if any("/groups/" in path for path in saved_shapes):
            raise CheckpointError(f"checkpoint step {step} in {self.directory} {OLDER_LAYOUT}")
        self._check_compatible(step, saved_shapes, _leaf_shapes(abstract_state))
        if data_iterator is not None and _DATA not in saved_items:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} has no data-iterator state: "
                "restore without a data iterator, or start the data pipeline from the beginning"
            )
        items = {_STATE: ocp.args.StandardRestore(_with_default_sharding(abstract_state))}
        if data_iterator is not None:
            items[_DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise CheckpointError(corrupt.format(_first_line(e))) from e
        return restored[_STATE]

    def _check_compatible(
        self,
        step: int,
        saved: Mapping[str, tuple[int, ...]],
        wanted: Mapping[str, tuple[int, ...]],
    ) -> None:
        """Raises CheckpointError naming a leaf whose path or shape differs (dtypes may be cast)."""
        problems = {}
        for path in set(saved) | set(wanted):
            if path not in saved:
                problems[path] = f"leaf {path!r} is missing from the checkpoint"
            elif path not in wanted:
                problems[path] = f"leaf {path!r} is in the checkpoint but not in the model"
            elif saved[path] != wanted[path]:
                shapes = f"{list(saved[path])} there but {list(wanted[path])} here"
                problems[path] = f"leaf {path!r} has shape {shapes}"
        if problems:
            # Name the shallowest leaf: "params/w" rather than its optimizer mirror "opt_state/0/mu/w".
            first = min(problems, key=lambda p: (p.count("/"), p))
            more = f", and {len(problems) - 1} more" if len(problems) > 1 else ""
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} belongs to a model with different shapes "
                f"({problems[first]}{more}): use the config it was trained with, or a fresh run directory"
            )

    def wait(self) -> None:
        """Blocks until any in-flight save has finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for in-flight saves and releases orbax's resources."""
        self._manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
