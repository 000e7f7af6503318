"""Grain pipelines over synthetic tasks: an endless, checkpointable training stream and fixed eval sets.

Every example is a pure function of ``(seed, split, index)`` (see ``example_at``), so streams are
reproducible, need no shuffling, and shard by index. A batch is a dict of numpy arrays:
``inputs``/``targets`` int32 [B, T], ``mask`` float32 [B, T], ``segment_ids`` int32 [B, T] and
``difficulty`` int32 [B, T] (the example's difficulty at each of its tokens, 0 on padding: the loop-count
rule ``per_difficulty`` reads it). A training stream may follow a difficulty curriculum (`Curriculum`):
the range its examples are drawn from then depends on the step they belong to.

Checkpointing the training iterator (verified against grain 0.2.18 and orbax-checkpoint 0.12.8):

* ``train_iterator`` returns a ``grain.DatasetIterator``; ``it.get_state()`` is a small JSON-able
  dict and ``it.set_state(state)`` rewinds a fresh iterator to it.
* ``grain.checkpoint.CheckpointSave`` / ``grain.checkpoint.CheckpointRestore`` (re-exported here)
  are orbax ``CheckpointArgs`` registered with ``grain.checkpoint.CheckpointHandler``. Use them as
  one item of a composite orbax checkpoint::

      mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=CheckpointSave(it)))
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=CheckpointRestore(it)))

  Restoring calls ``it.set_state`` in place (``restored.data is it``). The handler writes
  ``data/process_<i>-of-<n>.json`` using ``jax.process_index()`` / ``jax.process_count()``, so each
  process saves and restores its own shard's position.
* ``DatasetIterator`` also has async ``save(directory)`` / ``load(directory)`` for the orbax v1
  ``StatefulCheckpointable`` API, unused here.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import zlib

import grain
import numpy as np
from grain.checkpoint import CheckpointHandler, CheckpointRestore, CheckpointSave

from loopformer.data.tasks import Task
from loopformer.errors import DataError

__all__ = [
    "CheckpointHandler",
    "CheckpointRestore",
    "CheckpointSave",
    "Curriculum",
    "eval_batches",
    "example_at",
    "split_seed",
    "train_dataset",
    "train_iterator",
]

STREAM_LENGTH = 2**62  # examples in the global training stream: endless in practice
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def split_seed(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of example ``index`` of ``split``: deterministic in (seed, split, index)."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def example_at(
    task: Task, seed: int, split: str, index: int, difficulty: tuple[int, int], seq_len: int
) -> dict[str, np.ndarray]:
    """Example ``index`` of ``split``: difficulty d drawn uniformly in [lo, hi], then ``task.example``,
    with ``difficulty`` [T] = d on the example's tokens (``segment_ids`` > 0), 0 on padding."""
    rng = split_seed(seed, split, index)
    d = int(rng.integers(difficulty[0], difficulty[1] + 1))
    ex = task.example(rng, d, seq_len)
    ex["difficulty"] = np.where(ex["segment_ids"] > 0, d, 0).astype(np.int32)
    return ex


@dataclasses.dataclass(frozen=True)
class Curriculum:
    """Difficulty ranges that open up over training: stage j's range [lo_j, hi_j] applies from its
    step s_j until the next stage's (s_0 = 0; the last range lasts to the end). The examples of step s
    are examples s*B .. (s+1)*B - 1 of the global stream (B the global batch), so the range of every
    example is a function of its index: the stream stays deterministic in (seed, index) and a resumed
    run draws exactly what an uninterrupted one would."""

    steps: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]
    global_batch: int

    def range_at(self, step: int) -> tuple[int, int]:
        """The difficulty range of training step ``step`` (0-based)."""
        j = bisect.bisect_right(self.steps, step) - 1
        return self.ranges[max(j, 0)]

    def hi(self) -> int:
        return max(hi for _, hi in self.ranges)


def _curriculum_example(task: Task, seed: int, curriculum: Curriculum, seq_len: int, index: int) -> dict[str, np.ndarray]:
    return example_at(task, seed, "train", index, curriculum.range_at(index // curriculum.global_batch), seq_len)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(task: Task, difficulty: tuple[int, int], seed: int, **positive: int) -> tuple[int, int]:
    if not isinstance(difficulty, tuple | list) or len(difficulty) != 2:
        raise DataError(f"difficulty must be a pair [low, high], got {difficulty!r}")
    lo, hi = difficulty
    task.validate_difficulty(lo, hi)
    if not _is_int(seed) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    for name, value in positive.items():
        if not _is_int(value) or value < 1:
            raise DataError(f"{name} must be a positive integer, got {value!r}")
    return int(lo), int(hi)


def train_dataset(
    task: Task,
    difficulty: tuple[int, int],
    batch_size: int,
    seed: int,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    curriculum: Curriculum | None = None,
) -> grain.IterDataset:
    """Endless stream of training batches of ``batch_size`` (per process) examples.

    Example i of the global stream is ``example_at(task, seed, "train", i, ...)``; process
    ``shard_index`` of ``shard_count`` reads examples ``shard_index, shard_index + shard_count, ...``.
    With a ``curriculum``, example i draws its difficulty from the range of step i // global batch;
    sequences are padded to ``difficulty``'s hi (the final range) throughout, so every batch has one shape.
    """
    lo, hi = _check(task, difficulty, seed, batch_size=batch_size, shard_count=shard_count)
    if not _is_int(shard_index) or not 0 <= shard_index < shard_count:
        raise DataError(f"shard_index must be in [0, {shard_count}), got {shard_index!r}")
    if curriculum is None:
        make = functools.partial(example_at, task, seed, "train", difficulty=(lo, hi), seq_len=task.seq_len(hi))
    else:
        if curriculum.hi() > hi:
            raise DataError(f"a curriculum range reaches difficulty {curriculum.hi()}, above the training range's "
                            f"hi {hi}")
        make = functools.partial(_curriculum_example, task, seed, curriculum, task.seq_len(hi))
    return (
        grain.MapDataset.range(STREAM_LENGTH)
        .map(make)
        .slice(slice(shard_index, None, shard_count))
        .batch(batch_size, drop_remainder=True)
        .to_iter_dataset(_READ_OPTIONS)
    )


def train_iterator(
    task: Task,
    difficulty: tuple[int, int],
    batch_size: int,
    seed: int,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    curriculum: Curriculum | None = None,
) -> grain.DatasetIterator:
    """``iter(train_dataset(...))``: supports ``get_state()`` / ``set_state()`` for checkpointing."""
    ds = train_dataset(task, difficulty, batch_size, seed, shard_index=shard_index, shard_count=shard_count,
                       curriculum=curriculum)
    return iter(ds)


def eval_batches(
    task: Task, split: str, difficulty: tuple[int, int], num_examples: int, batch_size: int, seed: int
) -> list[dict[str, np.ndarray]]:
    """The same ``num_examples`` examples of ``split`` on every call, in batches of ``batch_size``.

    Example i is ``example_at(task, seed, "eval:" + split, i, ...)``: the prefix keeps an eval split
    named "train" apart from the training stream. The last batch is filled with padding examples
    (all PAD, mask all zero) that count for nothing.
    """
    lo, hi = _check(task, difficulty, seed, num_examples=num_examples, batch_size=batch_size)
    if not isinstance(split, str) or not split:
        raise DataError(f"eval split name must be a non-empty string, got {split!r}")
    seq_len = task.seq_len(hi)
    examples = [example_at(task, seed, f"eval:{split}", i, (lo, hi), seq_len) for i in range(num_examples)]
    pad = {key: np.zeros_like(value) for key, value in examples[0].items()}
    examples += [pad] * (-num_examples % batch_size)
    return [
        {key: np.stack([ex[key] for ex in examples[i : i + batch_size]]) for key in pad}
        for i in range(0, len(examples), batch_size)
    ]
