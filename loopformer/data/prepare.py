"""Tokenize a text corpus once into ArrayRecord shards (the library behind ``loopformer prepare``).

    loopformer prepare --config configs/text_bytes.yaml --out data/kjv [key=value ...]

writes ``<out>/``::

    meta.json                           splits, token counts, chunk size, dtype, settings used
    tokenizer.json                      the tokenizer (BPE: trained on the training split)
    train-00000-of-00001.array_record   the training token stream in records of chunk_tokens tokens
    val-00000-of-00001.array_record     the validation stream

Everything is written into a hidden temporary directory that is renamed to ``<out>`` only when
complete, so an interrupted prepare leaves nothing half-written; the next prepare to the same ``<out>``
removes what a killed one left (``.<out>.tmp-PID``, ``.<out>.old-PID`` of processes that are gone), and
directory listings in ``data.paths`` never read hidden entries. Train on it with ``data.paths=[<out>]``
(the format is detected from meta.json).

Nothing it did not write is ever deleted: ``--force`` replaces only a directory that holds exactly a
prepared corpus (meta.json of this version and the files it lists), never one that holds anything else
(the source corpus, say), a plain file or a symbolic link.

A corpus of one document (a book, ``input.txt``) is split by position, its last ``data.val_fraction``
of tokens held out, exactly as training from the raw file splits it (meta.json: ``"split": "position"``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loopformer import jsontext
from loopformer.config import Config
from loopformer.data.sources import (
    META_VERSION,
    TEXT_TASK,
    TOKENIZER_FILE,
    make_tokenizer,
    prepared_dir,
    split_one_document,
    token_dtype,
)
from loopformer.data.text import (
    HASH_SPLIT,
    META_FILE,
    POSITION_SPLIT,
    SPLITS,
    SplitStats,
    encode_document,
    expand_paths,
    iter_documents,
    split_of,
    training_text,
)
from loopformer.errors import DataError, not_utf8, printable
from loopformer.runs.layout import dead_siblings, not_a_folder, outside_runs, unwritable_target
from loopformer.runs.lock import exclusive, in_use
from loopformer.runs.log import progress_bar

CHUNK_TOKENS = 4096  # tokens per ArrayRecord record: a window read touches one or two records
SHARD_TOKENS = 2**26  # tokens per shard file (128 MiB of uint16)
_WRITER_OPTIONS = "group_size:1,uncompressed"  # random access to single records


@contextlib.contextmanager
def _os_errors() -> Iterator[None]:
    """The ArrayRecord writer's RuntimeError for a failed write ("write() failed: No space left on device; writing
    ...") as the OSError it is, which `prepare_corpus` reports as one line (it was a traceback on a full disk)."""
    try:
        yield
    except RuntimeError as e:
        raise OSError(str(e).split("failed: ", 1)[-1].split(";")[0]) from None


class ShardWriter:
    """Appends documents to one split's token stream, cut into records of ``chunk`` tokens and
    files of ``records_per_shard`` records (named ``<split>-NNNNN-of-MMMMM.array_record`` on close)."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, chunk: int, records_per_shard: int):
        self.directory, self.split, self.dtype = directory, split, dtype
        self.chunk, self.records_per_shard = chunk, records_per_shard
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.files: list[Path] = []
        self.records_in_file = 0
        self._writer: Any = None

    def add(self, tokens: np.ndarray) -> None:
        self.buffer.append(tokens.astype(self.dtype))
        self.buffered += len(tokens)
        if self.buffered >= self.chunk:
            stream = np.concatenate(self.buffer)
            full = len(stream) // self.chunk * self.chunk
            for i in range(0, full, self.chunk):
                self._write(stream[i : i + self.chunk])
            self.buffer, self.buffered = [stream[full:]], len(stream) - full

    def _write(self, record: np.ndarray) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        with _os_errors():
            if self._writer is None or self.records_in_file == self.records_per_shard:
                self._close_file()
                path = self.directory / f"{self.split}-{len(self.files):05d}.array_record"
                self._writer = ArrayRecordWriter(str(path), _WRITER_OPTIONS)
                self.files.append(path)
                self.records_in_file = 0
            self._writer.write(record.astype(self.dtype.newbyteorder("<")).tobytes())
        self.records_in_file += 1

    def _close_file(self) -> None:
        if self._writer is not None:
            if not self._writer.ok():
                raise DataError(f"writing {self.files[-1]} failed (disk full?)")
            with _os_errors():
                self._writer.close()
            self._writer = None

    def close(self) -> list[str]:
        """Flush the last partial record; rename the files to their final names; return them."""
        if self.buffered:
            self._write(np.concatenate(self.buffer))
        self._close_file()
        names = []
        for i, path in enumerate(self.files):
            final = path.with_name(f"{self.split}-{i:05d}-of-{len(self.files):05d}.array_record")
            path.rename(final)
            names.append(final.name)
        return names


def _documents(cfg: Config, paths: list[Path], progress: bool, label: str) -> Iterator[str]:
    """The corpus's documents, with a progress bar over the bytes of its files."""
    d = cfg.data
    with progress_bar(label, sum(p.stat().st_size for p in paths), unit="B", enabled=progress) as bar:
        for path in paths:
            read = 0
            for doc in iter_documents([path], d.format, d.text_field, d.doc_separator):
                yield doc
                size = len(doc.encode("utf-8"))
                read += size
                bar.update(size)
            bar.update(path.stat().st_size - read)  # separators and skipped text


# What prepare writes into <out> (and, while writing, into its hidden temporary directory).
_OUTPUT_FILE = re.compile(r"(train|val)-\d{5}(-of-\d{5})?\.array_record|meta\.json|tokenizer\.json(\.tmp)?")


def clean_leftovers(out: Path) -> list[Path]:
    """Remove what killed prepares to ``out`` left beside it (``.<name>.tmp-PID`` / ``.<name>.old-PID``
    of processes that no longer run, holding nothing but prepare's own files); returns them."""
    removed = []
    for entry in dead_siblings(out, ("tmp", "old"), _OUTPUT_FILE):
        if all(f.is_file() for f in entry.iterdir()):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def is_prepared(folder: Path) -> bool:
    """Whether ``folder`` holds a corpus written by `loopformer prepare` (a ``meta.json`` of this version)."""
    if not (folder / META_FILE).is_file():  # not opened when a pipe (it would block)
        return False
    try:
        meta = jsontext.loads((folder / META_FILE).read_bytes())
        return isinstance(meta, dict) and meta.get("version") == META_VERSION and isinstance(meta.get("splits"), dict)
    except (OSError, ValueError):
        return False


def _check_out(out: Path, sources: Sequence[Path], patterns: Sequence[str], force: bool) -> list[str]:
    """DataError unless prepare may write ``out``; for an existing ``out`` (``force``), the names of the
    files it holds, every one written by prepare (so replacing it deletes nothing else)."""
    problem = unwritable_target(out, "corpus", "corpus")
    if problem:
        raise DataError(problem)
    byte = not_utf8(str(out.absolute()))
    if byte:  # ArrayRecord's writer took it as a TypeError traceback (#27 pass 33)
        shown = printable(out)
        raise DataError(f"--out {shown} holds the byte {byte}, which is not UTF-8 text, and the shards' writer (and "
                        f"reader) cannot take such a path; name it in UTF-8")
    where = out.resolve()
    for pattern in patterns:
        folder = Path(pattern).expanduser()
        if folder.is_dir() and (where == folder.resolve() or folder.resolve() in where.parents):
            raise DataError(f"--out {out} is inside {pattern}, a directory data.paths reads: its shards would be read "
                            f"back as text; write the prepared corpus outside it")
    if not (out.exists() or out.is_symlink()):
        return []
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return []  # an empty directory: the corpus is renamed onto it, as onto a new one
    refuse = (f"--force replaces only a directory written by `loopformer prepare`, so nothing was deleted; choose "
              f"another --out, or remove {out} yourself")
    if out.is_symlink() or not out.is_dir():  # said before "pass --force", which would refuse it too
        raise DataError(f"--out {out} is {'a symbolic link' if out.is_symlink() else 'a file'}, not a directory; "
                        f"choose another --out" + ("" if not force else f" ({refuse})"))
    # what --force would refuse is said without it too: a folder of the user's was told "already exists; pass --force
    # to replace it", and --force then refused it (#27 pass 37; pass 9 mended the same for a file)
    mine = refuse if force else (f"choose another --out, or remove {out} yourself (--force replaces only a directory "
                                 f"written by `loopformer prepare`)")
    inside = [p for p in sources if where in p.resolve().parents]
    if inside:
        raise DataError(f"data.paths reads {inside[0]} from inside --out {out}: replacing {out} would delete the "
                        f"corpus; write the prepared corpus to another --out")
    try:
        meta = jsontext.loads((out / META_FILE).read_text())
        files = [f for s in SPLITS for f in meta["splits"][s]["files"]]
        assert meta["version"] == META_VERSION and all(isinstance(f, str) for f in files)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise DataError(f"{out} is not a corpus written by `loopformer prepare` (no {META_FILE} of version "
                        f"{META_VERSION}); {mine}") from None
    ours = {META_FILE, TOKENIZER_FILE, *files}
    extra = sorted(e.name for e in out.iterdir() if e.name not in ours or not e.is_file() or e.is_symlink())
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise DataError(f"{out} holds {extra[0]}{more}, which `loopformer prepare` did not write; {mine}")
    if not force:
        raise DataError(f"{out} already holds a prepared corpus; pass --force to replace it, or choose another --out")
    return sorted(e.name for e in out.iterdir())


def check_sizes(chunk_tokens: int, shard_tokens: int,
                names: tuple[str, str] = ("chunk_tokens", "shard_tokens")) -> None:
    """DataError unless 1 <= chunk_tokens <= shard_tokens (a shard holds whole records); ``names``: what the
    caller calls them (the command line's --chunk-tokens and --shard-tokens)."""
    chunk, shard = names
    if chunk_tokens < 1:
        raise DataError(f"{chunk} {chunk_tokens}: give a number of tokens per record >= 1 (default {CHUNK_TOKENS})")
    if shard_tokens < chunk_tokens and chunk_tokens > SHARD_TOKENS:  # past the default shard: the record is the typo
        raise DataError(f"{chunk} {chunk_tokens} is above {shard} {shard_tokens}: a shard holds whole records; lower "
                        f"{chunk} (default {CHUNK_TOKENS})")
    if shard_tokens < chunk_tokens:
        raise DataError(f"{shard} {shard_tokens} is below {chunk} {chunk_tokens}: a shard holds whole records; give "
                        f"{shard} >= {chunk_tokens} (default {SHARD_TOKENS})")


def prepare_corpus(cfg: Config, out: str | Path, *, force: bool = False, chunk_tokens: int = CHUNK_TOKENS,
                   shard_tokens: int = SHARD_TOKENS, progress: bool = True) -> dict[str, Any]:
    """Tokenize ``cfg.data``'s corpus into ArrayRecord shards under ``out`` (atomically); returns the
    meta.json contents. The training split, tokenizer and streams equal what training from the
    raw files would build, so both paths give the same batches."""
    d = cfg.data
    if d.task != TEXT_TASK:
        raise DataError(f"prepare tokenizes text corpora: set data.task=text and data.paths (got data.task="
                        f"{d.task!r})")
    if prepared_dir(cfg) is not None:
        raise DataError(f"data.paths names a prepared corpus ({d.paths[0]}): point it at the raw text files")
    check_sizes(chunk_tokens, shard_tokens)
    out = Path(out).expanduser()
    outside_runs(out)  # in a run's checkpoints/ the corpus was read as a corrupt step, and pruned with them
    problem = unwritable_target(out, "corpus", "corpus")  # before the lock beside it: a name past 255 bytes was
    if problem:  # "cannot write to PARENT (File name too long); choose a writable --out" (#27 pass 41)
        raise DataError(problem)
    try:
        outer = next((p for p in out.resolve().parents if is_prepared(p)), None)
    except (OSError, RuntimeError):  # a symlink loop: `unwritable_target` names it
        outer = None
    if outer is not None:  # the outer corpus's --force then refused it as a folder prepare did not write (pass 40)
        raise DataError(f"--out {out} is inside {outer}, a corpus written by `loopformer prepare`, which holds its own "
                        f"files alone (its --force would refuse the folder); write the prepared corpus outside it")
    paths = expand_paths(d.paths)
    blocked = not_a_folder(out.parent)
    if blocked:  # mkdir's "File exists" named neither the file nor what to do (#27 pass 40)
        raise DataError(f"--out {out}: {blocked[0]} is {blocked[1]}, not a directory; choose an --out whose parents "
                        f"are directories")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {out}: cannot write to {out.parent} ({e.strerror or e}); choose a writable "
                        f"--out") from None
    # one prepare per --out: a second would find the first's output half made (and clean its work away)
    busy = f"--out {out} is being written by another `loopformer prepare`{{holder}}; wait for it, or choose another --out"
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(exclusive(out.parent / f".{out.name}.prepare.lock", busy, remove=True))
        except OSError as e:
            raise DataError(f"--out {out}: cannot write to {out.parent} ({e.strerror or e}); choose a writable "
                            f"--out") from None
        return _prepare_locked(cfg, out, paths, force, chunk_tokens, shard_tokens, progress)


def _check_unread(out: Path, replaced: list[str]) -> None:
    """DataError when ``out``, a corpus --force would replace, is read by a training (`runs.lock.shared`): it
    trained on, and resumed from, the new corpus at the old one's position, without a word."""
    if replaced and in_use(out / META_FILE):
        raise DataError(f"--out {out} is being read by a training (a run whose data.paths names it), and --force would "
                        f"replace the corpus under it; wait for it to finish, or choose another --out")


def _prepare_locked(cfg: Config, out: Path, paths: list[Path], force: bool, chunk_tokens: int, shard_tokens: int,
                    progress: bool) -> dict[str, Any]:
    """`prepare_corpus` holding the --out lock."""
    d = cfg.data
    replaced = _check_out(out, paths, d.paths, force)
    _check_unread(out, replaced)
    try:
        for leftover in clean_leftovers(out):
            print(f"removed {leftover}, left by an interrupted prepare", file=sys.stderr)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise DataError(f"--out {out}: cannot write to {out.parent} ({e.strerror or e}); choose a writable "
                        f"--out") from None
    try:
        meta = _write(cfg, paths, tmp, chunk_tokens, shard_tokens, progress)
        if replaced:  # --force: swap the old directory out only once the new one is complete
            _check_unread(out, replaced)
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            for name in replaced:  # exactly the files prepare wrote (checked by _check_out)
                (old / name).unlink(missing_ok=True)
            old.rmdir()
        else:
            tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"--out {out}: writing the prepared corpus failed ({e.strerror or e}; disk full or "
                        f"read-only?); nothing was replaced") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _write(cfg: Config, paths: list[Path], tmp: Path, chunk_tokens: int, shard_tokens: int,
           progress: bool) -> dict[str, Any]:
    """Tokenize the corpus into ``tmp`` (shards, tokenizer.json, meta.json); returns the meta."""
    d = cfg.data
    first = list(itertools.islice(iter_documents(paths, d.format, d.text_field, d.doc_separator), 2))
    split_kind = POSITION_SPLIT if len(first) == 1 else HASH_SPLIT
    if split_kind == POSITION_SPLIT:  # one document: split by position, as training from the file does
        tokenizer = make_tokenizer(cfg, [training_text(first[0], d.val_fraction)])
    else:
        train_docs = (doc for doc in _documents(cfg, paths, progress, "bpe words")  # read only to train a BPE
                      if split_of(doc, d.val_fraction) == "train")
        tokenizer = make_tokenizer(cfg, train_docs)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: ShardWriter(tmp, s, dtype, chunk_tokens, max(1, shard_tokens // chunk_tokens)) for s in SPLITS}
    stats = {s: SplitStats() for s in SPLITS}
    if split_kind == POSITION_SPLIT:
        parts, stats = split_one_document(tokenizer, first[0], d.val_fraction)
        for split in SPLITS:
            writers[split].add(parts[split])
    else:
        for doc in _documents(cfg, paths, progress, "tokenize"):
            split = split_of(doc, d.val_fraction)
            ids = encode_document(tokenizer, doc)
            writers[split].add(ids)
            stats[split].add(doc, ids)
        for split in SPLITS:
            if stats[split].documents == 0:
                raise DataError(f"{', '.join(d.paths)}: no document fell in the {split} split "
                                f"(data.val_fraction={d.val_fraction}); add documents, split files with "
                                f"data.doc_separator (e.g. '\\n\\n'), or change data.val_fraction")
    files = {s: w.close() for s, w in writers.items()}
    tokenizer.save(tmp / TOKENIZER_FILE)
    meta = {"version": META_VERSION, "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
            "dtype": dtype.name, "chunk_tokens": chunk_tokens, "val_fraction": d.val_fraction,
            "doc_separator": d.doc_separator, "format": d.format, "text_field": d.text_field,
            "sources": [str(p) for p in paths], "split": split_kind,
            "splits": {s: {"files": files[s], "documents": stats[s].documents, "tokens": stats[s].tokens,
                           "bytes": stats[s].bytes} for s in SPLITS}}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    return meta
