"""Checkpoints: a thin wrapper over `orbax.checkpoint.CheckpointManager`.

Each step directory holds orbax items: `state` (the train-state pytree, written with `StandardSave`,
restored onto the shapes/dtypes/shardings of an abstract tree), `checksums` (one checksum per array of
`state`, JSON) and, optionally, `data` (the grain iterator state, written with grain's orbax handler).
Atomicity comes from orbax: a step is written to a temporary directory and renamed when finished, and
unfinished steps are never listed.

Nothing silently wrong: `save` refuses a state holding NaN or inf (a diverged run must not replace a
good checkpoint), and `restore` recomputes every array's checksum and compares it with the one saved
(a changed byte on disk is an error naming the step and the fix, not a quietly different model), then
checks that the restored values are finite. Checkpoints written before checksums existed restore
without the comparison.

A partial restore reads only some top-level parts of the saved state (the analysis commands read
``params`` or ``ema`` and ``step``, never the optimizer state): those parts are checked and verified the
same way. `Checkpoints.saved_parts` names the parts a step holds (``ema``: a run with EMA weights).

The checksum of an array is ``sum_i fmix32(word_i ^ (i * 0x9E3779B9))`` over its 32-bit words
(narrower dtypes widened, 64-bit ones split) modulo 2^32: integer addition is exact and order-free,
so it is computed on device, under any sharding or mesh, and equal on restore to what was saved; any
single changed word changes it (fmix32 is a bijection).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shlex
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from loopformer.errors import CheckpointError
from loopformer.runs.layout import OLDER_LAYOUT, misnamed_step, read_only, unreadable

PyTree = Any

_STATE = "state"
_DATA = "data"
_CHECKSUMS = "checksums"
CHECKSUM_KIND = "fmix32-sum-v1"
_REMOVED_RETRIES = 3  # reads of the latest step while a trainer prunes the ones it read
_ITERATORS = (grain.DatasetIterator, grain.DataLoaderIterator)
_OS_ERROR = re.compile(r": ([A-Z][a-z][^:\[\]]*) \[os_error_code='\d+'\]")  # tensorstore's form of an OS error


def _file_system_reason(error: BaseException | None) -> str | None:
    """Why a checkpoint write failed on the file system ("No space left on device"), from ``error`` or an
    exception it was raised from or during; None when it failed for another reason."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.strerror:
            return error.strerror
        found = _OS_ERROR.search(str(error))
        if found:
            return found.group(1)
        error = error.__cause__ or error.__context__
    return None


class _FileSystemNoise(logging.Filter):
    """Drops the checkpoint library's ERROR records (with their tracebacks) about a write that failed on the
    file system: the failure surfaces as `Checkpoints`' one CheckpointError (`_disk_errors`), which names the
    reason, the directory and the checkpoints kept; the same failure logged by each of orbax's threads
    stood above it as hundreds of lines. Likewise its "Failed to read Metadata file" records about a damaged
    checkpoint, logged by each read of it: `Checkpoints.restore` names the step as corrupt in one line (or, its
    "Failed to get existing items" WARNING, as unreadable); and its
    WARNING that it removes the unfinished folder a failed save left (``<step>.orbax-checkpoint-tmp``) when the
    resumed run saves that step again, which printed above the resumed run's log. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Attempted to create temporary directory"):
            return False  # the next save's removal of the unfinished folder of one that failed (a full disk, a kill)
        if record.getMessage().startswith("Failed to get existing items from directory"):
            return False  # a step folder it cannot read: `Checkpoints.restore` says which file, in one line
        if record.levelno < logging.ERROR:
            return True
        if record.getMessage().startswith("Failed to read Metadata file"):
            return False
        error = record.exc_info[1] if record.exc_info else None
        return not (_file_system_reason(error) or _OS_ERROR.search(record.getMessage()))


def _quiet_file_system_noise() -> None:
    logger = logging.getLogger("absl")  # orbax logs through absl's logger
    if not any(isinstance(f, _FileSystemNoise) for f in logger.filters):
        logger.addFilter(_FileSystemNoise())
    # a save that failed on a full disk leaves one of the library's coroutines unawaited: Python printed "sys:1:
    # RuntimeWarning: coroutine 'JsonCheckpointHandler.async_save' was never awaited" (and a tracemalloc hint)
    # below the one line, at exit
    warnings.filterwarnings("ignore", r"coroutine '.*CheckpointHandler\.async_save' was never awaited", RuntimeWarning)


def _leaf_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
    """Maps "a/b/0/c" -> shape for every array-like leaf of `tree`."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(getattr(leaf, "shape", ()))
            for path, leaf in leaves}


def abstract_like(tree: PyTree) -> PyTree:
    """``tree`` as shapes, dtypes and shardings only (what `Checkpoints.restore` restores onto)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


def _with_default_sharding(abstract_state: PyTree) -> PyTree:
    """Leaves without a sharding go to this process's first device, not to the sharding they were
    saved with (whose devices may not exist here)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def fill(leaf: Any) -> Any:
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)
        return leaf

    return jax.tree.map(fill, abstract_state)


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 that mixes every bit into every other."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32 words (same shape; 64-bit dtypes get a trailing axis of 2)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_digest(x: Any) -> tuple[jax.Array, jax.Array]:
    """(checksum, all finite) of one array, on device: see the module docstring."""
    x = jnp.asarray(x)
    words = _words(x)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):  # flat position, built from iotas so sharding is kept
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(stride % 2**32)
        stride *= words.shape[axis]
    checksum = jnp.sum(_fmix32(words ^ (index * np.uint32(0x9E3779B9))), dtype=jnp.uint32)
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.asarray(True)
    return checksum, finite


_digest = jax.jit(lambda tree: jax.tree.map(_leaf_digest, tree))


def _host(x: Any) -> Any:
    """A replicated scalar result on this host (also when the computation spans several processes)."""
    return np.asarray(x.addressable_data(0) if hasattr(x, "addressable_data") else x).item()


def state_digest(tree: PyTree) -> dict[str, dict[str, Any]]:
    """``{"a/b/0/c": {"dtype": str, "checksum": int, "finite": bool}}`` for every array leaf of
    ``tree`` (see the module docstring); one compiled program per tree structure."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    leaves = [leaf for _, leaf in flat]
    digests = jax.tree.leaves(_digest(leaves))
    out = {}
    for i, (path, leaf) in enumerate(flat):
        checksum, finite = digests[2 * i], digests[2 * i + 1]
        out[jax.tree_util.keystr(path, simple=True, separator="/")] = {
            "dtype": str(jnp.asarray(leaf).dtype if not hasattr(leaf, "dtype") else leaf.dtype),
            "checksum": int(_host(checksum)), "finite": bool(_host(finite))}
    return out


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
        _quiet_file_system_noise()  # before the manager: it reads the checkpoints' metadata as it opens
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=False, enable_async_checkpointing=async_save
        )
        handlers = {_STATE: ocp.StandardCheckpointHandler(), _DATA: grain.checkpoint.CheckpointHandler(),
                    _CHECKSUMS: ocp.JsonCheckpointHandler()}
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

    def saved_parts(self, step: int | None = None) -> set[str]:
        """The top-level parts of the state saved at ``step`` (default: latest), e.g. {"params", "opt_state",
        "step"} and "ema" for a run with EMA weights; read from the metadata only. Empty when there is no
        such step or its metadata is unreadable (`restore` then says why)."""
        steps = self.all_steps()
        step = steps[-1] if step is None and steps else step
        if step not in steps:
            return set()
        try:
            state_metadata = self._manager.metadata(step).item_metadata[_STATE]
        except Exception:
            return set()
        return {path.split("/")[0] for path in _leaf_shapes(state_metadata)} if state_metadata is not None else set()

    def save(self, step: int, state: PyTree, data_iterator: Any = None, *, force: bool = False) -> bool:
        """Starts saving `state` (and `data_iterator`'s position) as `step`; returns whether it did.

        Nothing is saved when `step` is not newer than the latest checkpoint. FloatingPointError, and
        nothing saved, when an array of `state` holds NaN or inf. The save runs in the background when
        async; call `wait()` before reading it from another process.
        """
        if data_iterator is not None and not isinstance(data_iterator, _ITERATORS):
            raise TypeError(f"data_iterator must be a grain iterator, got {type(data_iterator).__name__}")
        if step in self._manager.all_steps():
            return False
        digest = state_digest(state)
        bad = [path for path, d in digest.items() if not d["finite"]]
        if bad:
            raise FloatingPointError(f"not saving step {step}: {bad[0]} holds NaN or inf"
                                     + (f" (and {len(bad) - 1} more arrays)" if len(bad) > 1 else ""))
        checksums = {"kind": CHECKSUM_KIND,
                     "arrays": {path: {"dtype": d["dtype"], "checksum": d["checksum"]} for path, d in digest.items()}}
        items = {_STATE: ocp.args.StandardSave(state), _CHECKSUMS: ocp.args.JsonSave(checksums)}
        if data_iterator is not None:
            items[_DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        self.directory.mkdir(parents=True, exist_ok=True)
        if read_only(self.directory):  # the checkpoint library waited forever for its own failed writer
            raise CheckpointError(f"not saving step {step}: {self.directory} is read-only for this user; make it "
                                  f"writable (chmod -R u+w {shlex.quote(str(self.directory))}) and run the command "
                                  f"again" + self._kept())
        self._check_space(step, state)
        with self._disk_errors(step):
            saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            self._last_saved = step
        return saved

    def restore(self, abstract_state: PyTree, data_iterator: Any = None, step: int | None = None, *,
                partial: bool = False, step_key: str | None = None) -> PyTree:
        """Restores `step` (default: latest) onto `abstract_state`'s shapes, dtypes and shardings.

        When `data_iterator` is given, its position is restored in place from the same step. With
        `partial`, `abstract_state` is a dict of some top-level parts of the saved state (e.g. params
        and step): only those are read, and only they must match the checkpoint. ``step_key`` names the
        state's entry that holds its own step: a checkpoint whose folder names another step is refused.
        """
        steps = self.all_steps()
        if not steps:
            if self.directory.is_dir():
                misnamed_step(self.directory)
            raise CheckpointError(
                f"no checkpoint in {self.directory}: train first, or point --run at a run directory"
            )
        if step is not None and step not in steps:
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}: available steps are "
                f"{', '.join(map(str, steps))}"
            )
        # A trainer of this run prunes its older checkpoints as it saves (train.keep_checkpoints): a step removed while
        # it was read was called unreadable ("chmod") or corrupt ("delete it ... to train from scratch"). The latest
        # is read again from the steps now on disk; a step asked for by number is named as removed.
        for _ in range(_REMOVED_RETRIES):
            at = steps[-1] if step is None else step
            try:
                return self._restore_step(abstract_state, data_iterator, at, steps, partial=partial, step_key=step_key)
            except CheckpointError:
                if not self._removed(at):
                    raise
            steps = sorted(self._disk_steps())
            if step is not None or not steps:
                break
        raise CheckpointError(f"checkpoint step {at} in {self.directory} was removed while it was read (a trainer of this "
                              f"run prunes its older checkpoints as it saves, train.keep_checkpoints); "
                              + (f"read one it keeps (--step {steps[-1]}), or " if step is not None and steps else "")
                              + "run the command again")

    def _disk_steps(self) -> list[int]:
        """The finished steps on disk now (the manager's list read again; ``all_steps(read=True)`` logged a deprecation
        warning above every corrupt-checkpoint refusal's one line)."""
        self._manager.reload()
        return list(self._manager.all_steps())

    def _removed(self, step: int) -> bool:
        """Whether checkpoint ``step`` is gone from disk, or going: while a newer step has appeared (a trainer saved it
        and is pruning this one) its removal is given a moment."""
        step_dir = self.directory / str(step)
        if step_dir.exists() and max(self._disk_steps(), default=step) > step:
            time.sleep(0.5)
        return not step_dir.exists()

    def _restore_step(self, abstract_state: PyTree, data_iterator: Any, step: int, steps: list[int], *,
                      partial: bool, step_key: str | None) -> PyTree:
        """`restore` of ``step``, one of ``steps`` (the finished steps)."""
        step_dir = self.directory / str(step)
        advice = self._advice(step, steps)
        hidden = unreadable(step_dir)
        if hidden:  # the library read it as missing, and the step was called corrupt, with advice to delete it
            raise CheckpointError(f"checkpoint step {step} in {self.directory} cannot be read by this user ({hidden} is "
                                  f"not readable); make it readable (chmod -R u+rX {shlex.quote(str(step_dir))})")

        def corrupt(why: str) -> CheckpointError:
            return CheckpointError(f"checkpoint step {step} in {self.directory} is corrupt or incomplete ({why}); {advice}")

        try:
            metadata = self._manager.metadata(step)
            saved_items = set(metadata.item_handlers or {})
            state_metadata = metadata.item_metadata[_STATE]
        except Exception as e:
            raise corrupt(f"cannot read its metadata: {_first_line(e)}") from e
        if state_metadata is None:  # orbax logs a warning and returns None when _METADATA is unreadable
            raise corrupt(f"{step_dir / _STATE} has no readable metadata")
        saved_shapes = _leaf_shapes(state_metadata)
        if any("/groups/" in path for path in saved_shapes):
            raise CheckpointError(f"checkpoint step {step} in {self.directory} {OLDER_LAYOUT}")
        if partial:  # the parts not asked for are neither read nor compared
            saved_shapes = {path: shape for path, shape in saved_shapes.items()
                            if path.split("/")[0] in abstract_state}
        self._check_compatible(step, saved_shapes, _leaf_shapes(abstract_state))
        if data_iterator is not None and _DATA not in saved_items:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} has no data-iterator state: "
                "restore without a data iterator, or start the data pipeline from the beginning"
            )
        target = _with_default_sharding(abstract_state)
        items: dict[str, Any] = {}
        if not partial:
            items[_STATE] = ocp.args.StandardRestore(target)
        if data_iterator is not None:
            items[_DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        if _CHECKSUMS in saved_items:
            items[_CHECKSUMS] = ocp.args.JsonRestore()
        try:
            restored = dict(self._manager.restore(step, args=ocp.args.Composite(**items))) if items else {}
            if partial:
                restored[_STATE] = self._restore_parts(step_dir / _STATE, target)
        except Exception as e:
            raise corrupt(_first_line(e)) from e
        self._verify(step, steps, restored[_STATE], restored[_CHECKSUMS] if _CHECKSUMS in saved_items else None)
        if step_key is not None and int(restored[_STATE][step_key]) != step:  # renamed or copied from elsewhere:
            # training would go on from another step than it says, and every report would name the wrong one
            raise corrupt(f"its folder is named {step}, but it holds the state of step "
                          f"{int(restored[_STATE][step_key])}")
        return restored[_STATE]

    @staticmethod
    def _restore_parts(directory: Path, target: PyTree) -> PyTree:
        """The parts of a saved state that ``target`` names (orbax's partial restore: what is not asked
        for is not read)."""
        args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                      partial_restore=True)
        handler = ocp.PyTreeCheckpointHandler()
        try:
            return handler.restore(directory, args=args)
        finally:
            handler.close()

    def _advice(self, step: int, steps: list[int]) -> str:
        """What to do about a bad checkpoint ``step``: delete it (the exact command); what happens then."""
        others = [s for s in steps if s != step]
        delete = f"delete it (rm -r {shlex.quote(str(self.directory / str(step)))})"
        if not others:
            return f"{delete} to train from scratch (it is the run's only checkpoint)"
        other = ([s for s in others if s < step] or others)[-1]
        return (f"{delete} and training resumes from step {others[-1]} (analysis commands can read step {other} "
                f"now with --step {other})")

    def _verify(self, step: int, steps: list[int], state: PyTree, saved: Any) -> None:
        """CheckpointError when a restored array differs from the checksum saved with it, or holds
        NaN/inf. Arrays restored into another dtype than they were saved in are not compared."""
        digest = state_digest(state)
        where = f"checkpoint step {step} in {self.directory}"
        if saved is not None:
            arrays = saved.get("arrays", {}) if isinstance(saved, Mapping) else {}
            if not isinstance(saved, Mapping) or saved.get("kind") != CHECKSUM_KIND:
                raise CheckpointError(f"{where} has unreadable checksums; " + self._advice(step, steps))
            changed = [path for path, d in digest.items()
                       if path in arrays and arrays[path].get("dtype") == d["dtype"]
                       and arrays[path].get("checksum") != d["checksum"]]
            if changed:
                more = f" (and {len(changed) - 1} more arrays)" if len(changed) > 1 else ""
                raise CheckpointError(f"{where} is corrupt: {changed[0]}{more} does not match the checksum saved with "
                                      f"it (the file changed on disk); " + self._advice(step, steps))
        bad = [path for path, d in digest.items() if not d["finite"]]
        if bad:
            more = f" (and {len(bad) - 1} more arrays)" if len(bad) > 1 else ""
            raise CheckpointError(f"{where} holds NaN or inf in {bad[0]}{more}: the run had diverged when it was "
                                  f"saved; " + self._advice(step, steps))

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

    @staticmethod
    def _bytes(state: PyTree) -> int:
        """What a checkpoint of ``state`` takes on disk: this process's share (replica 0 of each addressable
        shard), written uncompressed, plus 1 MiB of metadata."""
        need = 2**20 + sum(shard.data.nbytes for x in jax.tree.leaves(state) if isinstance(x, jax.Array)
                           for shard in x.addressable_shards if shard.replica_id == 0)
        return need + sum(np.asarray(x).nbytes for x in jax.tree.leaves(state) if not isinstance(x, jax.Array))

    def _check_space(self, step: int, state: PyTree) -> None:
        """CheckpointError before a save that the disk cannot hold: the checkpoint library would fail mid-write
        with pages of tracebacks from its threads."""
        if self._shortfall(state):
            # the save before it may still be writing: it was left out of the steps named intact ("up to step 4"
            # beside a step 6 that the trainer's close then finished, #27 pass 29), and it takes its space too
            self.wait()
        if short := self._shortfall(state):
            free, need = short
            raise CheckpointError(f"not saving step {step}: {self.directory} has {free} MiB free and the checkpoint "
                                  f"takes {need} MiB; free some space (df -h {shlex.quote(str(self.directory))}) and "
                                  f"run the command again" + self._kept())

    def check_room(self, state: PyTree, where: str) -> None:
        """CheckpointError, before any training, when the disk cannot hold one checkpoint of ``state``
        (``where``: the directory to name, e.g. the run's): else the steps up to the first save would be
        trained and lost. A later save checks again (`_check_space`), as the disk may fill meanwhile."""
        if short := self._shortfall(state):
            free, need = short
            df = shlex.quote(str(Path(where).parent))  # `where` may be a run directory the refusal removes
            raise CheckpointError(f"{where} has {free} MiB free and one checkpoint of this run takes {need} MiB; free "
                                  f"some space (df -h {df}) or set run.dir=<a disk with room>, then train again"
                                  + self._kept())

    def _shortfall(self, state: PyTree) -> tuple[str, str] | None:
        """(free, needed) MiB, formatted, when the disk cannot hold a checkpoint of ``state``; else None."""
        need, free = self._bytes(state), shutil.disk_usage(self.directory).free
        return (f"{free / 2**20:,.1f}", f"{need / 2**20:,.1f}") if free < need else None

    def _kept(self, failed: int | None = None) -> str:
        """The checkpoints a failure leaves, for its message. ``failed``: the step whose save failed. After a failed
        save the library still reports a save in progress, and `all_steps` dropped the step saved before it, which
        was complete ("up to step 42" beside a finished 43)."""
        steps = self.all_steps() if failed is None else sorted(s for s in self._manager.all_steps() if s != failed)
        return f" (the checkpoints there, up to step {steps[-1]}, are intact)" if steps else ""

    @contextlib.contextmanager
    def _disk_errors(self, step: int | None) -> Iterator[None]:
        """A write that fails on the file system (disk full, read-only, quota) as one CheckpointError."""
        try:
            yield
        except Exception as e:
            why = _file_system_reason(e)
            if why is None:
                raise
            raise CheckpointError(f"saving {'a checkpoint' if step is None else f'step {step}'} into {self.directory} "
                                  f"failed: {why}; fix the disk and run the command again" + self._kept(step)) from None

    def wait(self) -> None:
        """Blocks until any in-flight save has finished."""
        with self._disk_errors(self._last_saved):
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for in-flight saves and releases orbax's resources; a save that failed on the file system
        (a disk that filled while it was written) is one CheckpointError."""
        with self._disk_errors(self._last_saved):
            self._manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
