"""One entry point for training data: ``build_data(cfg)`` -> a `DataSource`, for synthetic tasks and
for text corpora alike.

A source gives the trainer and the analysis commands everything they need::

    source.vocab_size, source.seq_len          model vocabulary, training window length T
    source.train_iterator(B, seed, ...)        endless grain.DatasetIterator of batches (get/set_state)
    source.eval_sets(splits, examples, B)      {split: [batch, ...]}, fixed on every call
    source.bytes_per_token(batches)            text bytes per predicted token (None: not text)
    source.tokenizer                           encode/decode for text (None for synthetic tasks)

A batch is ``inputs``/``targets`` int32 [B, T] and ``mask`` float32 [B, T]; text batches add
``segment_ids`` and ``positions`` int32 [B, T] (documents packed into one window stay apart in
attention, and positions restart at each document).
"""

from __future__ import annotations

import abc
import functools
import glob
import os
import shlex
import time
from collections.abc import Iterable, Sequence, Sized
from pathlib import Path
from typing import Any

import grain
import numpy as np

from loopformer import jsontext
from loopformer.config import Config, load_config
from loopformer.data import pipeline
from loopformer.data.tasks import TASKS, Task, make_task
from loopformer.data.text import (
    ARRAYRECORD_SUFFIXES,
    HASH_SPLIT,
    META_FILE,
    POSITION_SPLIT,
    SPLITS,
    ArrayRecordStream,
    ArrayStream,
    SplitStats,
    TokenStream,
    empty_window,
    encode_document,
    expand_paths,
    iter_documents,
    num_windows,
    position_split,
    read_window,
    split_of,
    training_text,
)
from loopformer.data.tokenizers import (
    CORPUS_FIX,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    read_tokenizer,
    tokenizer_kind,
    train_bpe,
)
from loopformer.errors import ConfigError, DataError, shorten
from loopformer.runs.layout import CONFIG_FILE, TOKENIZER_FILE, RunDir, unreadable
from loopformer.runs.log import log

Batch = dict[str, np.ndarray]
TEXT_TASK = "text"
META_VERSION = 1
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


class DataSource(abc.ABC):
    """Training stream, eval sets and metrics of one run's data (see the module docstring)."""

    task: Task | None = None
    tokenizer: Tokenizer | None = None

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def seq_len(self) -> int: ...

    @property
    @abc.abstractmethod
    def split_names(self) -> list[str]:
        """Eval splits, in display order."""

    @abc.abstractmethod
    def train_iterator(self, batch_size: int, seed: int, *, shard_index: int = 0,
                       shard_count: int = 1) -> grain.DatasetIterator:
        """Endless batches of ``batch_size`` rows for process ``shard_index`` of ``shard_count``."""

    @abc.abstractmethod
    def eval_sets(self, splits: Sequence[str] | None = None, examples: int | None = None,
                  batch_size: int | None = None) -> dict[str, list[Batch]]:
        """The first ``examples`` examples (default data.eval_examples) of each split, in batches of
        ``batch_size`` (default data.eval_batch_size); the last batch is padded with mask-0 rows."""

    def bytes_per_token(self, batches: Sequence[Batch]) -> float | None:
        """UTF-8 bytes per predicted token of host ``batches`` (None for synthetic tasks)."""
        return None

    @property
    def digits(self) -> tuple[int, int] | None:
        """The token ids [lo, hi] of the digits 0..9 (or a task's bits), for abacus places; None if it has none."""
        return None

    @property
    def max_place(self) -> int | None:
        """The longest run of digit tokens in any example of the training and eval splits (None: unbounded)."""
        return None

    def save(self, run_dir: Path) -> None:  # noqa: B027 - optional hook
        """Write what a run needs to read its data later (the tokenizer) into ``run_dir``."""

    def describe(self) -> str:
        return ""

    @property
    def eval_seq_len(self) -> int:
        """The longest sequence of an eval split (a synthetic task's eval range may reach past training's)."""
        return self.seq_len

    def length_settings(self, longest: int | None = None) -> tuple[str, str]:
        """The settings that set ``seq_len`` and ``eval_seq_len``, for a refusal to name (``longest``: the most
        tokens that fit, where not even one sequence does)."""
        return "data.seq_len", "data.seq_len"


# ----------------------------------------------------------------------------- synthetic tasks


class TaskSource(DataSource):
    """A synthetic task (`loopformer.data.tasks`) through `loopformer.data.pipeline`."""

    def __init__(self, cfg: Config):
        if cfg.data.task == TEXT_TASK:
            raise ConfigError("data.task=text is a text corpus, not a synthetic task: build its data with "
                              "loopformer.data.sources.build_data(cfg)")
        if cfg.data.task not in TASKS:
            raise DataError(f"data.task={cfg.data.task!r} is not a task; valid tasks: "
                            f"{', '.join(sorted(TASKS))}, or {TEXT_TASK} for a text corpus (data.paths)")
        self.cfg = cfg
        self.task = make_task(cfg.data.task, **cfg.data.task_args)
        if not cfg.model.causal and not self.task.labels_aligned:
            raise ConfigError(f"model.causal=false needs labels at input positions, but task '{cfg.data.task}' "
                              "predicts next tokens (bidirectional attention would see every target); set "
                              "model.causal=true, or use an aligned task (e.g. prefix_parity, maze)")
        for key, (lo, hi) in [("data.train_difficulty", cfg.data.train_difficulty)] + [
                (f"data.eval_splits.{k}", v) for k, v in cfg.data.eval_splits.items()]:
            try:
                self.task.validate_difficulty(lo, hi)
            except DataError as e:
                raise ConfigError(f"{key}: {e}") from None

    @property
    def vocab_size(self) -> int:
        return self.task.vocab_size

    @property
    def seq_len(self) -> int:
        return self.task.seq_len(self.cfg.data.train_difficulty[1])

    @property
    def eval_seq_len(self) -> int:
        return max(self.task.seq_len(hi) for _, hi in self.cfg.data.eval_splits.values())

    def length_settings(self, longest: int | None = None) -> tuple[str, str]:
        # a length no difficulty changes is set by the task's arguments (addition's width): lowering the
        # difficulties, as the refusal said, changed nothing; nor where the shortest example, at difficulty 1, is
        # longer than ``longest`` (maze's rows: 100,000,000 was "lower data.train_difficulty" at [1, 1]; #27 pass 38)
        floor = self.task.seq_len(1)
        fixed = self.cfg.data.task_args and (floor == max(self.seq_len, self.eval_seq_len)
                                             or (longest is not None and floor > longest))
        return ("data.task_args", "data.task_args") if fixed else ("data.train_difficulty", "data.eval_splits")

    @property
    def digits(self) -> tuple[int, int] | None:
        return self.task.digits

    @property
    def max_place(self) -> int | None:
        d = self.cfg.data
        return max(self.task.max_place(hi) for _, hi in [d.train_difficulty, *d.eval_splits.values()])

    @property
    def split_names(self) -> list[str]:
        return list(self.cfg.data.eval_splits)

    def train_iterator(self, batch_size: int, seed: int, *, shard_index: int = 0,
                       shard_count: int = 1) -> grain.DatasetIterator:
        d = self.cfg.data
        curriculum = None if not d.curriculum else pipeline.Curriculum(
            steps=(0, *(stage.until for stage in d.curriculum)),
            ranges=(*(tuple(stage.difficulty) for stage in d.curriculum), tuple(d.train_difficulty)),
            global_batch=d.batch_size)
        return pipeline.train_iterator(self.task, tuple(d.train_difficulty), batch_size, seed,
                                       shard_index=shard_index, shard_count=shard_count, curriculum=curriculum)

    def eval_sets(self, splits: Sequence[str] | None = None, examples: int | None = None,
                  batch_size: int | None = None) -> dict[str, list[Batch]]:
        d = self.cfg.data
        examples, batch_size = examples or d.eval_examples, batch_size or d.eval_batch_size
        return {s: pipeline.eval_batches(self.task, s, tuple(d.eval_splits[s]), examples, batch_size, self.cfg.seed)
                for s in _check_splits(splits, self.split_names)}


# ----------------------------------------------------------------------------- text corpora


def _check_splits(splits: Sequence[str] | None, valid: list[str]) -> list[str]:
    for s in splits or ():
        if s not in valid:
            raise DataError(f"no eval split '{s}'; this run's splits are {', '.join(valid)}")
    return list(dict.fromkeys(splits)) if splits else valid


OPEN_FILES_SPARE = 256  # files a process keeps open besides a prepared corpus's shards (libraries, checkpoints, logs)


def room_for_shards(root: Path, count: int, tokens: int, chunk: int) -> None:
    """Let this process hold ``count`` shards of the prepared corpus ``root`` open at once (the ArrayRecord reader keeps
    each open): its soft limit on open files is raised to the hard one where that is needed and allows; DataError
    naming the shards and the --shard-tokens that fits where it does not (`prepare --shard-tokens 1` wrote thousands
    of shards, and training on them was a RuntimeError traceback, "Too many open files", at the first batch; #27 pass
    34)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = count + OPEN_FILES_SPARE
    if soft == resource.RLIM_INFINITY or need <= soft:
        return
    if hard == resource.RLIM_INFINITY or need <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return
    fits = max(chunk, -(-tokens // max(1, hard - OPEN_FILES_SPARE)))
    raise DataError(f"{root}: its {count:,} shards are more files than this process may open at once ({hard:,}, "
                    f"`ulimit -Hn`, less {OPEN_FILES_SPARE} for the rest); prepare it again with fewer, e.g. "
                    f"--shard-tokens {fits:,} or more")


def prepared_dir(cfg: Config) -> Path | None:
    """The directory written by `loopformer prepare` that ``data.paths`` names, or None for raw files."""
    d = cfg.data
    paths = [Path(p).expanduser() for p in d.paths]
    for path in paths:  # a folder this user may not enter: every check under it was a PermissionError traceback
        nearest = next(a for a in (path, *path.parents) if os.access(a, os.F_OK))
        if nearest.is_dir() and not os.access(nearest, os.R_OK | os.X_OK):
            raise DataError(f"data.paths: this user may not read the folder {nearest}; make it readable (chmod -R u+rX "
                            f"{shlex.quote(str(nearest))})")
    shard = next((Path(f) for p in paths if p.suffix in ARRAYRECORD_SUFFIXES
                  for f in sorted(glob.glob(str(p)))[:1] if Path(f).is_file()), None)  # a file or a pattern
    if shard:  # it was read as text: "not UTF-8 text; convert it with iconv" (#27 pass 34)
        fix = (f"name its folder, data.paths=[{shard.parent}]" if (shard.parent / META_FILE).is_file()
               else "name the folder `loopformer prepare` wrote, or the raw text files")
        raise DataError(f"data.paths: {shard} is an ArrayRecord shard of a prepared corpus, not text; {fix}")
    prepared = [p for p in paths if p.name == META_FILE or (p / META_FILE).is_file()]
    if d.format == "auto" and prepared and len(paths) > 1:  # its shards were read as text: "not UTF-8; iconv it"
        raise DataError(f"data.paths: {prepared[0]} is a corpus written by `loopformer prepare`, which is read alone; "
                        f"make it the only entry of data.paths, or name the raw text files instead")
    shards = [p for p in prepared if p.is_dir() and any(f.suffix in ARRAYRECORD_SUFFIXES for f in p.iterdir())]
    if d.format in ("text", "jsonl") and shards:  # its shards were read as text: "not UTF-8; iconv it" (#27 pass 33)
        raise DataError(f"data.paths: {shards[0]} is a corpus written by `loopformer prepare` (ArrayRecord shards, not "
                        f"{d.format}), and data.format={d.format} would read its files as {d.format}; set "
                        f"data.format=auto (or arrayrecord), or name the raw files instead")
    looks_prepared = len(paths) == 1 and bool(prepared)
    if d.format == "arrayrecord" or (d.format == "auto" and looks_prepared):
        if len(paths) != 1:
            raise DataError(f"data.format=arrayrecord reads one directory made by `loopformer prepare`; "
                            f"data.paths names {len(paths)}")
        root = paths[0].parent if paths[0].name == META_FILE else paths[0]
        if root.is_file():  # its fix was `prepare --out` that file (#27 pass 34)
            raise DataError(f"{root}: not a prepared corpus but a file, and data.format=arrayrecord reads the folder "
                            f"`loopformer prepare --out DIR` writes; set data.format=auto to read it as text, or "
                            f"prepare it and name DIR in data.paths")
        if not (root / META_FILE).is_file():
            hint = (" (it holds ArrayRecord files but no meta.json: an interrupted prepare?)"
                    if root.is_dir() and any(p.suffix in ARRAYRECORD_SUFFIXES for p in root.iterdir()) else "")
            raise DataError(f"{root}: not a prepared corpus, {META_FILE} is missing{hint}; run "
                            f"`loopformer prepare --out {root}` with the corpus in data.paths")
        return root
    return None


def read_meta(root: Path) -> dict[str, Any]:
    hidden = unreadable(root / META_FILE)
    if hidden:  # "run prepare again" would rebuild a corpus that is whole
        raise DataError(f"{hidden}: this user may not read it; make the prepared corpus readable (chmod -R u+rX "
                        f"{shlex.quote(str(root))})")
    try:
        meta = jsontext.loads((root / META_FILE).read_text())
    except (OSError, ValueError):
        raise DataError(f"{root / META_FILE} is unreadable; run `loopformer prepare` again") from None
    if not isinstance(meta, dict) or meta.get("version") != META_VERSION:
        raise DataError(f"{root / META_FILE}: not a loopformer prepared corpus of version {META_VERSION}; "
                        f"run `loopformer prepare` again")
    bad = _meta_field(meta)
    if bad:  # a ZeroDivisionError, TypeError, KeyError or ValueError traceback from the reader (#27 pass 34)
        raise DataError(f"{root / META_FILE}: {bad[0]} is {shorten(repr(bad[1]))}, which `loopformer prepare` never "
                        f"writes (edited by hand?); run `loopformer prepare` again")
    return meta


def _meta_field(meta: dict[str, Any]) -> tuple[str, Any] | None:
    """The first field of a prepared corpus's ``meta`` that the reader reads and `loopformer prepare` never writes so
    (name, value), or None."""
    def whole(v: Any, least: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= least

    if not whole(meta.get("chunk_tokens"), 1):
        return "chunk_tokens", meta.get("chunk_tokens")
    if meta.get("dtype") not in ("uint16", "uint32"):
        return "dtype", meta.get("dtype")
    splits = meta.get("splits")
    for split in SPLITS:
        info = splits.get(split) if isinstance(splits, dict) else None
        if not isinstance(info, dict):
            return f"splits.{split}", info
        files = info.get("files")
        if (not isinstance(files, list) or not files
                or not all(isinstance(f, str) and f == Path(f).name and Path(f).suffix in ARRAYRECORD_SUFFIXES
                           for f in files)):
            return f"splits.{split}.files", files
        for key in ("documents", "tokens", "bytes"):
            if not whole(info.get(key), 0):
                return f"splits.{split}.{key}", info.get(key)
    return None


def make_tokenizer(cfg: Config, train_docs: Iterable[str]) -> Tokenizer:
    """A fresh tokenizer of data.tokenizer: bytes, a BPE trained on ``train_docs`` (only read for bpe),
    or the tokenizer.json it names."""
    setting = cfg.data.tokenizer
    if setting == "bytes":
        return ByteTokenizer()
    if setting != "bpe":
        return read_tokenizer(setting, "data.tokenizer")
    t0 = time.time()
    tok = train_bpe(train_docs, cfg.data.vocab_size)
    docs = f" from {len(train_docs)} documents" if isinstance(train_docs, Sized) else ""
    log(f"trained a byte-level BPE tokenizer: {tok.vocab_size} tokens{docs} in {time.time() - t0:.1f}s")
    return tok


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def split_one_document(tokenizer: Tokenizer, doc: str, val_fraction: float
                       ) -> tuple[dict[str, np.ndarray], dict[str, SplitStats]]:
    """A corpus of one document, split by position (`loopformer.data.text.position_split`): the
    token streams of train and val and what each holds (the text's bytes shared out by where the cut
    falls). Raw files and `loopformer prepare` both split a one-document corpus with this."""
    parts = position_split(encode_document(tokenizer, doc), val_fraction)
    total = len(doc.encode("utf-8"))
    val_bytes = min(total, len(tokenizer.decode(parts["val"]).encode("utf-8")))
    stats = {"train": SplitStats(1, len(parts["train"]), total - val_bytes),
             "val": SplitStats(1, len(parts["val"]), val_bytes)}
    return parts, stats


class TextSource(DataSource):
    """A text corpus (``data.task: text``): raw text/JSONL files tokenized at start-up, or a
    directory of ArrayRecord shards written by `loopformer prepare`.

    Nothing is read until needed: a run with a checkpoint takes its vocabulary from
    ``<run_dir>/tokenizer.json`` without touching the corpus.
    """

    def __init__(self, cfg: Config):
        if cfg.data.task != TEXT_TASK:
            raise ConfigError(f"data.task={cfg.data.task!r} is not text")
        if not cfg.model.causal:
            raise ConfigError("model.causal=false cannot train a language model on text (bidirectional attention "
                              "would see every next token); set model.causal=true")
        self.cfg = cfg
        self.prepared = prepared_dir(cfg)
        self._tokenizer: Tokenizer | None = None
        self._streams: dict[str, TokenStream] | None = None
        self.stats: dict[str, SplitStats] = {}
        self.split_kind = HASH_SPLIT  # or POSITION_SPLIT: a corpus of one document
        self._token_bytes: np.ndarray | None = None

    # ------------------------------------------------------------------ tokenizer
    @property
    def tokenizer(self) -> Tokenizer:  # type: ignore[override]
        if self._tokenizer is None:
            self._tokenizer = self._resolve_tokenizer()
        return self._tokenizer

    def _resolve_tokenizer(self, train_docs: Sequence[str] | None = None, corpus: Tokenizer | None = None) -> Tokenizer:
        """The run's own tokenizer once it has a checkpoint, else the prepared corpus's (``corpus`` where it was read
        already), else bytes or the data.tokenizer file, else a BPE trained on ``train_docs`` (the corpus's training
        split, read on demand)."""
        run = RunDir(self.cfg.run_dir)
        run_file = run.tokenizer
        if run_file.is_file() and run.checkpoint_steps():
            return self._checked(read_tokenizer(run_file), run_file)
        if self.prepared is not None:
            return self._checked(corpus or read_tokenizer(self.prepared / TOKENIZER_FILE), self.prepared / TOKENIZER_FILE)
        if self.cfg.data.tokenizer != "bpe":
            return make_tokenizer(self.cfg, ())
        if train_docs is None:
            self._load()  # trains the BPE on the way
            assert self._tokenizer is not None
            return self._tokenizer
        return make_tokenizer(self.cfg, train_docs)

    def _checked(self, tok: Tokenizer, where: Path) -> Tokenizer:
        """``tok`` (saved with the run or the prepared corpus) if data.tokenizer asks for it: the same
        kind, and for a path, the same file while it still exists (the saved copy is what counts)."""
        d = self.cfg.data
        want = tokenizer_kind(d.tokenizer)
        if tok.kind != want and not (want == "file" and isinstance(tok, HFTokenizer)):
            fix = tok.kind if tok.kind in ("bytes", "bpe") else where  # a file: that copy of it
            raise DataError(f"{where} uses a {tok.kind} tokenizer but data.tokenizer={d.tokenizer}; set "
                            f"data.tokenizer={fix} (or start a fresh run / prepare again)")
        if tok.kind == "bpe" and want == "bpe" and tok.vocab_size > d.vocab_size:
            raise DataError(f"{where} has a BPE vocabulary of {tok.vocab_size} but data.vocab_size="
                            f"{d.vocab_size}; set data.vocab_size={tok.vocab_size}")
        if want == "file" and Path(d.tokenizer).expanduser().is_file():
            configured = read_tokenizer(d.tokenizer, "data.tokenizer")
            if not (isinstance(configured, HFTokenizer) and isinstance(tok, HFTokenizer)
                    and configured.hf.to_str() == tok.hf.to_str()):
                raise DataError(f"{where} was made with a different tokenizer than data.tokenizer={d.tokenizer}; "
                                f"point data.tokenizer at the file it used (or start a fresh run / prepare again)")
        return tok

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def digits(self) -> tuple[int, int] | None:
        """The bytes '0'..'9' under the byte tokenizer (a BPE merges digits into multi-digit tokens: none)."""
        if tokenizer_kind(self.cfg.data.tokenizer) != "bytes":
            return None
        zero = int(self.tokenizer.encode_array("0")[0])
        return zero, zero + 9

    @property
    def seq_len(self) -> int:
        return self.cfg.data.seq_len

    @property
    def split_names(self) -> list[str]:
        return ["val", "train"]

    # ------------------------------------------------------------------ corpus
    @property
    def streams(self) -> dict[str, TokenStream]:
        if self._streams is None:
            self._load()
        assert self._streams is not None
        return self._streams

    def _load(self) -> None:
        if self.prepared is not None:
            self._load_prepared()
        else:
            self._load_files()
        self._check_sizes()

    def _load_files(self) -> None:
        d = self.cfg.data
        self.paths = expand_paths(d.paths)
        every = list(iter_documents(self.paths, d.format, d.text_field, d.doc_separator))
        if len(every) == 1:
            self._load_one_document(every[0])
            return
        docs: dict[str, list[str]] = {s: [] for s in SPLITS}
        for doc in every:
            docs[split_of(doc, d.val_fraction)].append(doc)
        self._check_documents({s: len(v) for s, v in docs.items()})
        if self._tokenizer is None:
            self._tokenizer = self._resolve_tokenizer(docs["train"])
        dtype = token_dtype(self._tokenizer.vocab_size)
        self._streams = {}
        for split, texts in docs.items():
            stats, parts = SplitStats(), []
            for doc in texts:
                ids = encode_document(self._tokenizer, doc)
                stats.add(doc, ids)
                parts.append(ids.astype(dtype))
            self.stats[split] = stats
            self._streams[split] = ArrayStream(np.concatenate(parts) if parts else np.zeros(0, dtype))

    def _load_one_document(self, doc: str) -> None:
        """One document (a book, ``input.txt``; no data.doc_separator, or none found): a hash split
        would put it all in one split, so it is split by position, the last data.val_fraction of its
        tokens held out (`split_one_document`)."""
        vf = self.cfg.data.val_fraction
        self.split_kind = POSITION_SPLIT
        if self._tokenizer is None:
            self._tokenizer = self._resolve_tokenizer([training_text(doc, vf)])
        dtype = token_dtype(self._tokenizer.vocab_size)
        parts, self.stats = split_one_document(self._tokenizer, doc, vf)
        self._streams = {s: ArrayStream(parts[s].astype(dtype)) for s in SPLITS}

    def _load_prepared(self) -> None:
        root = self.prepared
        assert root is not None
        meta = read_meta(root)
        own = read_tokenizer(root / TOKENIZER_FILE)
        if (meta.get("tokenizer"), meta.get("vocab_size")) != (own.kind, own.vocab_size) or (
                token_dtype(own.vocab_size).name != meta["dtype"]):
            # the shards hold the ids of the tokenizer meta.json names: another tokenizer.json (copied from another
            # corpus) decodes them silently wrong, and ids past uint16 do not fit its shards (#27 pass 36)
            raise DataError(f"{root / TOKENIZER_FILE} is a {own.kind} tokenizer of {own.vocab_size} tokens, where "
                            f"{root / META_FILE} says its shards hold ids of a {meta.get('tokenizer')} tokenizer of "
                            f"{meta.get('vocab_size')} tokens as {meta['dtype']} (one of them replaced or edited "
                            f"by hand?); {CORPUS_FIX}")
        d = self.cfg.data
        if abs(float(meta.get("val_fraction", -1)) - d.val_fraction) > 1e-12:
            raise DataError(f"{root} was prepared with val_fraction={meta.get('val_fraction')} but "
                            f"data.val_fraction={d.val_fraction}; set it to match, or prepare again")
        # settings that prepare read, and that a run on its shards would record without using (issue 27 pass 11)
        if d.tokenizer == "bpe" and meta.get("tokenizer") == "bpe" and meta.get("vocab_size") != d.vocab_size:
            raise DataError(f"{root} was prepared with a BPE of vocab_size={meta.get('vocab_size')} but "
                            f"data.vocab_size={d.vocab_size}; set it to match, or prepare again")
        if "doc_separator" in meta and meta["doc_separator"] != d.doc_separator:
            raise DataError(f"{root} was prepared with doc_separator={meta['doc_separator']!r} but "
                            f"data.doc_separator={d.doc_separator!r}; set it to match, or prepare again")
        if self._tokenizer is None:
            self._tokenizer = self._resolve_tokenizer(corpus=own)
        self.split_kind = meta.get("split", HASH_SPLIT)
        self._streams = {}
        room_for_shards(root, sum(len(meta["splits"][s]["files"]) for s in SPLITS),
                        sum(meta["splits"][s]["tokens"] for s in SPLITS), meta["chunk_tokens"])
        for split in SPLITS:
            info = meta["splits"][split]
            files = [root / f for f in info["files"]]
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise DataError(f"{missing[0]} is missing: the prepared corpus {root} is incomplete; run "
                                f"`loopformer prepare` again")
            hidden = unreadable(*files)
            if hidden:  # the ArrayRecord library's RuntimeError traceback
                raise DataError(f"{hidden}: this user may not read it; make the prepared corpus readable (chmod -R "
                                f"u+rX {shlex.quote(str(root))})")
            self.stats[split] = SplitStats(info["documents"], info["tokens"], info["bytes"])
            self._streams[split] = ArrayRecordStream(files, info["tokens"], meta["chunk_tokens"], meta["dtype"])

    def _where(self) -> str:
        if self.prepared is not None:
            return str(self.prepared)
        names = [str(p) for p in getattr(self, "paths", [])] or list(self.cfg.data.paths)
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    def _check_documents(self, counts: dict[str, int]) -> None:
        d, total = self.cfg.data, sum(counts.values())
        for split, other in (("train", "val"), ("val", "train")):
            if counts[split] == 0:
                raise DataError(
                    f"{self._where()}: all {total} document(s) fell in the {other} split (data.val_fraction="
                    f"{d.val_fraction}), none in {split}; add documents, split files into documents with "
                    f"data.doc_separator (e.g. '\\n\\n'), or change data.val_fraction")

    def _check_sizes(self) -> None:
        need = self.seq_len + 1
        have = len(self.streams["train"])
        if have < need:
            raise DataError(f"{self._where()}: the training split has {have} tokens, fewer than one sequence "
                            f"(data.seq_len + 1 = {need}); lower data.seq_len or add text")

    # ------------------------------------------------------------------ batches
    def train_iterator(self, batch_size: int, seed: int, *, shard_index: int = 0,
                       shard_count: int = 1) -> grain.DatasetIterator:
        """Full windows of the training stream, shuffled with ``seed`` (reshuffled each epoch),
        repeated forever; process ``shard_index`` takes every ``shard_count``-th window."""
        if not 0 <= shard_index < shard_count:
            raise DataError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
        stream = self.streams["train"]
        windows = num_windows(len(stream), self.seq_len, full_only=True)
        ds = (grain.MapDataset.range(windows)
              .shuffle(seed % 2**32)
              .repeat()
              .slice(slice(shard_index, None, shard_count))
              .map(functools.partial(_window_at, stream, self.seq_len, self.tokenizer.bos_id, self.tokenizer.eos_id))
              .batch(batch_size, drop_remainder=True))
        return iter(ds.to_iter_dataset(_READ_OPTIONS))

    def eval_sets(self, splits: Sequence[str] | None = None, examples: int | None = None,
                  batch_size: int | None = None) -> dict[str, list[Batch]]:
        """Windows 0, 1, ... of each split's stream in corpus order: the whole split when it has at
        most ``examples`` windows (the last one right-padded)."""
        d = self.cfg.data
        examples = examples or d.eval_examples
        out = {}
        for split in _check_splits(splits, self.split_names):
            stream = self.streams[split]
            n = min(examples, num_windows(len(stream), self.seq_len, full_only=False))
            tok = self.tokenizer
            rows = [read_window(stream, i, self.seq_len, tok.bos_id, tok.eos_id) for i in range(n)]
            size = min(batch_size or d.eval_batch_size, n)
            rows += [empty_window(self.seq_len)] * (-n % size)
            out[split] = [{k: np.stack([r[k] for r in rows[i : i + size]]) for k in rows[0]}
                          for i in range(0, len(rows), size)]
        return out

    def bytes_per_token(self, batches: Sequence[Batch]) -> float:
        """UTF-8 bytes per predicted token (mask 1) of host ``batches``."""
        if self._token_bytes is None:
            self._token_bytes = self.tokenizer.token_bytes()
        tokens = sum(float(np.sum(b["mask"])) for b in batches)
        nbytes = sum(float(np.sum(self._token_bytes[np.asarray(b["targets"])] * b["mask"])) for b in batches)
        return nbytes / max(tokens, 1.0)

    def save(self, run_dir: Path) -> None:
        self.tokenizer.save(RunDir(run_dir).tokenizer)

    def describe(self) -> str:
        parts = [f"{s} {st.documents:,} docs / {st.tokens:,} tokens / {st.bytes:,} bytes" for s, st in self.stats.items()]
        if self.split_kind == POSITION_SPLIT:
            parts = [f"{s} {st.tokens:,} tokens / {st.bytes:,} bytes" for s, st in self.stats.items()]
            split = (f"one document, split by position: val is its last {100 * self.cfg.data.val_fraction:g}% of tokens "
                     f"(data.val_fraction)")
        else:
            split = f"documents split by a hash of their text (data.val_fraction={self.cfg.data.val_fraction})"
        return (f"text corpus {self._where()} ({split}): {self.tokenizer.kind} tokenizer (vocab {self.vocab_size}), "
                f"seq_len {self.seq_len}; " + "; ".join(parts))


def _window_at(stream: TokenStream, seq_len: int, bos: int, eos: int, index: int) -> Batch:
    return read_window(stream, int(index), seq_len, bos, eos)


# ----------------------------------------------------------------------------- entry points


def build_data(cfg: Config) -> DataSource:
    """The data source of ``cfg``: `TextSource` for ``data.task: text``, `MixtureSource` for
    ``data.task: mixture`` (`loopformer.data.mixture`), else `TaskSource`."""
    if cfg.data.mixture:
        from loopformer.data.mixture import MixtureSource  # it builds on this module's sources

        return MixtureSource(cfg)
    return TextSource(cfg) if cfg.data.task == TEXT_TASK else TaskSource(cfg)


def load_tokenizer(run: str | Path | Config) -> Tokenizer:
    """The text tokenizer of a run directory (its ``tokenizer.json``) or of a config (built from its
    corpus, or bytes). DataError for a synthetic-task run, which has no text tokenizer."""
    if isinstance(run, Config):
        cfg = run
    else:
        run_dir = Path(run)
        if RunDir(run_dir).tokenizer.is_file():
            return read_tokenizer(RunDir(run_dir).tokenizer)
        if not RunDir(run_dir).config.is_file():
            raise DataError(f"{run_dir}: no {TOKENIZER_FILE} or {CONFIG_FILE}; point at a run directory made by "
                            f"`loopformer train`")
        cfg = load_config(RunDir(run_dir).config)
        cfg.run.dir, cfg.run.name = str(run_dir.resolve().parent), run_dir.resolve().name
    if cfg.data.task != TEXT_TASK:
        raise DataError(f"data.task={cfg.data.task!r} is a synthetic task with no text tokenizer "
                        f"(only data.task=text runs read and write text)")
    return TextSource(cfg).tokenizer
