"""Several tasks in one run (``data.task: mixture``, ``data.mixture: [...]``): one token layout, batches
mixed by weight, eval splits named ``NAME/SPLIT``.

The layout every entry shares:

- **vocabulary**: entry k's token ids are shifted by ``offset_k = V_0 + ... + V_{k-1}`` (its own id
  range, so two tasks never share a token by accident); the model's vocabulary is the sum of the V_k.
  Padding (segment 0) keeps id 0.
- **length**: training examples are padded to the longest entry's training length T (segment 0 =
  padding, which attention and statistics already skip); eval splits keep their own lengths.
- **task id**: every batch carries ``task`` int32 [B], the entry of each row (gradient routing reads
  it; the model does not). With a text entry every batch also carries ``positions``.

Example i of the global training stream is a pure function of (seed, i): its entry is drawn from
(seed, i) by weight, then the entry's example i (`loopformer.data.pipeline.example_at`: the same
example a single-task run draws at index i; text: a window drawn uniformly from (seed, i), with
replacement). So the stream is deterministic, shards by index and resumes from grain's state like a
single task's.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Sequence
from pathlib import Path

import grain
import numpy as np

from loopformer.config import Config, MixtureEntry
from loopformer.config.schema import SPLIT_SEP
from loopformer.data import pipeline
from loopformer.data.sources import TEXT_TASK, Batch, DataSource, TextSource, _check_splits
from loopformer.data.tasks import TASKS, Task, make_task
from loopformer.data.text import num_windows, read_window
from loopformer.errors import ConfigError, DataError

_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


@dataclasses.dataclass
class _Entry:
    """One mixture entry, resolved: its config and either a synthetic task or a text source."""

    cfg: MixtureEntry
    task: Task | None = None
    text: TextSource | None = None

    @property
    def vocab_size(self) -> int:
        return self.task.vocab_size if self.task is not None else self.text.vocab_size  # type: ignore[union-attr]

    def seq_len(self) -> int:
        if self.task is not None:
            return self.task.seq_len(self.cfg.train_difficulty[1])
        return self.text.seq_len  # type: ignore[union-attr]

    def eval_seq_len(self) -> int:
        if self.task is not None:
            return max(self.task.seq_len(hi) for _, hi in self.cfg.eval_splits.values())
        return self.text.seq_len  # type: ignore[union-attr]


class MixtureSource(DataSource):
    """The entries of ``data.mixture`` as one data source (see the module docstring)."""

    def __init__(self, cfg: Config):
        if not cfg.data.mixture:
            raise ConfigError("data.task=mixture needs data.mixture, e.g. [{task: prefix_parity}, {task: maze}]")
        self.cfg = cfg
        self.entries = [self._resolve(e, cfg) for e in cfg.data.mixture]
        weights = np.asarray([e.weight for e in cfg.data.mixture], np.float64)
        weights = weights / weights.max()  # two weights of 1e308 summed to inf: every share was nan
        self.cumulative = np.cumsum(weights) / weights.sum()
        self._offsets: list[int] | None = None

    @staticmethod
    def _resolve(e: MixtureEntry, cfg: Config) -> _Entry:
        where = f"data.mixture.{e.name}"
        if e.task == TEXT_TASK:
            if not cfg.model.causal:
                raise ConfigError(f"model.causal=false needs labels at input positions in every mixture entry, but "
                                  f"{where} is text (next tokens: bidirectional attention would see every target); "
                                  f"set model.causal=true or drop the text entry")
            data = dataclasses.replace(cfg.data, task=TEXT_TASK, paths=list(e.paths), mixture=[])
            return _Entry(e, text=TextSource(dataclasses.replace(cfg, data=data)))
        if e.task not in TASKS:
            raise DataError(f"{where}.task={e.task!r} is not a task; valid tasks: {', '.join(sorted(TASKS))}, or "
                            f"{TEXT_TASK} (a corpus in paths)")
        try:
            task = make_task(e.task, **e.task_args)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        if not cfg.model.causal and not task.labels_aligned:
            raise ConfigError(f"model.causal=false needs labels at input positions in every mixture entry, but "
                              f"{where} ({e.task}) predicts next tokens; set model.causal=true, or mix only aligned "
                              f"tasks (e.g. prefix_parity, maze)")
        for key, (lo, hi) in [(f"{where}.train_difficulty", e.train_difficulty)] + [
                (f"{where}.eval_splits.{k}", v) for k, v in e.eval_splits.items()]:
            try:
                task.validate_difficulty(lo, hi)
            except DataError as err:
                raise ConfigError(f"{key}: {err}") from None
        return _Entry(e, task=task)

    # ------------------------------------------------------------------ layout
    @property
    def offsets(self) -> list[int]:
        """First token id of each entry in the shared vocabulary."""
        if self._offsets is None:
            sizes = [e.vocab_size for e in self.entries]
            self._offsets = [int(sum(sizes[:k])) for k in range(len(sizes))]
        return self._offsets

    @property
    def vocab_size(self) -> int:
        return self.offsets[-1] + self.entries[-1].vocab_size

    @property
    def seq_len(self) -> int:
        return max(e.seq_len() for e in self.entries)

    @property
    def eval_seq_len(self) -> int:
        return max(e.eval_seq_len() for e in self.entries)

    def length_settings(self, longest: int | None = None) -> tuple[str, str]:
        """The settings of the entries with the longest training and eval sequences (an entry's task_args where its
        shortest example, at difficulty 1, is longer than ``longest``: lowering its difficulties cannot help)."""
        def setting(e: _Entry, key: str) -> str:
            if e.task is None:
                return "data.seq_len"
            return f"data.mixture.{e.cfg.name}.{'task_args' if longest is not None and e.task.seq_len(1) > longest else key}"

        return (setting(max(self.entries, key=lambda e: e.seq_len()), "train_difficulty"),
                setting(max(self.entries, key=lambda e: e.eval_seq_len()), "eval_splits"))

    @property
    def has_text(self) -> bool:
        return any(e.text is not None for e in self.entries)

    @property
    def names(self) -> list[str]:
        return [e.cfg.name for e in self.entries]

    @property
    def split_names(self) -> list[str]:
        return [s for e in self.entries for s in e.cfg.split_ranges()]

    def entry_of_split(self, split: str) -> tuple[int, str]:
        """``maze/2x`` -> (the entry's index, ``2x``)."""
        name, _, local = split.partition(SPLIT_SEP)
        return self.names.index(name), local

    def entry_at(self, seed: int, index: int) -> int:
        """The entry of example ``index`` of the training stream: drawn by weight from (seed, index)."""
        u = np.random.default_rng([seed, zlib.crc32(b"mixture"), index]).random()
        return int(min(np.searchsorted(self.cumulative, u, side="right"), len(self.entries) - 1))

    def tag(self, example: Batch, k: int, seq_len: int | None = None) -> Batch:
        """An entry-``k`` example (or batch) in the shared layout: ids shifted by its offset on real
        tokens, ``task`` = k ([] or [B]), right-padded to ``seq_len`` when given."""
        out = {key: np.asarray(v) for key, v in example.items()}
        if seq_len is not None and out["inputs"].shape[-1] < seq_len:
            pad = [(0, 0)] * (out["inputs"].ndim - 1) + [(0, seq_len - out["inputs"].shape[-1])]
            out = {key: np.pad(v, pad) for key, v in out.items()}
        real = out["segment_ids"] > 0
        for key in ("inputs", "targets"):
            out[key] = np.where(real, out[key] + self.offsets[k], 0).astype(np.int32)
        out["task"] = np.full(out["inputs"].shape[:-1], k, np.int32)
        return out

    def untag(self, batch: Batch) -> Batch:
        """A tagged batch of one entry back in that entry's own ids (``task`` dropped)."""
        k = int(np.asarray(batch["task"]).reshape(-1)[0])
        real = np.asarray(batch["segment_ids"]) > 0
        out = {key: np.asarray(v) for key, v in batch.items() if key != "task"}
        for key in ("inputs", "targets"):
            out[key] = np.where(real, out[key] - self.offsets[k], 0).astype(np.int32)
        return out

    # ------------------------------------------------------------------ batches
    def example(self, seed: int, index: int) -> Batch:
        """Example ``index`` of the global training stream, in the shared layout."""
        k, T = self.entry_at(seed, index), self.seq_len
        e = self.entries[k]
        if e.task is not None:
            ex = pipeline.example_at(e.task, seed, "train", index, tuple(e.cfg.train_difficulty), T)
        else:
            text = e.text
            assert text is not None
            stream = text.streams["train"]
            windows = num_windows(len(stream), text.seq_len, full_only=True)
            w = int(np.random.default_rng([seed, zlib.crc32(b"mixture:text"), index]).integers(windows))
            ex = read_window(stream, w, text.seq_len, text.tokenizer.bos_id, text.tokenizer.eos_id)
        out = self.tag(ex, k, T)
        if self.has_text and "positions" not in out:
            out["positions"] = np.arange(T, dtype=np.int32)
        if "difficulty" not in out:  # a text row in a batch of task rows: no difficulty
            out["difficulty"] = np.zeros(T, np.int32)
        return out

    def train_iterator(self, batch_size: int, seed: int, *, shard_index: int = 0,
                       shard_count: int = 1) -> grain.DatasetIterator:
        if not 0 <= shard_index < shard_count:
            raise DataError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
        _ = self.offsets, self.seq_len  # resolve tokenizers and corpora before the workers start
        ds = (grain.MapDataset.range(pipeline.STREAM_LENGTH)
              .map(functools.partial(_example_at, self, seed))
              .slice(slice(shard_index, None, shard_count))
              .batch(batch_size, drop_remainder=True))
        return iter(ds.to_iter_dataset(_READ_OPTIONS))

    def eval_sets(self, splits: Sequence[str] | None = None, examples: int | None = None,
                  batch_size: int | None = None) -> dict[str, list[Batch]]:
        """Each split's batches from its entry (the same examples a single-task run of that entry has),
        in the shared layout."""
        d = self.cfg.data
        examples, batch_size = examples or d.eval_examples, batch_size or d.eval_batch_size
        out = {}
        for split in _check_splits(splits, self.split_names):
            k, local = self.entry_of_split(split)
            e = self.entries[k]
            if e.task is not None:
                rng = tuple(e.cfg.eval_splits[local])
                batches = pipeline.eval_batches(e.task, local, rng, examples, batch_size, self.cfg.seed)
            else:
                assert e.text is not None
                batches = e.text.eval_sets([local], examples, batch_size)[local]
            out[split] = [self.tag(b, k) for b in batches]
        return out

    def bytes_per_token(self, batches: Sequence[Batch]) -> float | None:
        """Text bytes per predicted token of a text entry's batches; None for a synthetic entry's."""
        if not batches:
            return None
        text = self.entries[int(np.asarray(batches[0]["task"]).reshape(-1)[0])].text
        return None if text is None else text.bytes_per_token([self.untag(b) for b in batches])

    def save(self, run_dir: Path) -> None:
        for e in self.entries:
            if e.text is not None:
                e.text.save(run_dir)

    def describe(self) -> str:
        shares = np.diff(self.cumulative, prepend=0.0)  # the draw's own shares (a sum of the weights may be inf)
        parts = [f"{e.cfg.name} ({e.cfg.task}, {100 * share:.0f}% of examples, ids {o}..{o + e.vocab_size - 1}, T "
                 f"{e.seq_len()})" for e, o, share in zip(self.entries, self.offsets, shares, strict=True)]
        tasks = "1 task" if len(parts) == 1 else f"{len(parts)} tasks"
        return f"mixture of {tasks}: " + "; ".join(parts) + f"; vocab {self.vocab_size}, seq_len {self.seq_len}"


def _example_at(source: MixtureSource, seed: int, index: int) -> Batch:
    return source.example(seed, int(index))
