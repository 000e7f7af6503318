"""Text corpora: reading documents, the train/validation split, packing into windows, token streams.

A split of a corpus is one *token stream*: its documents, in corpus order, each written as
``BOS ids EOS`` and concatenated. Window ``k`` of a stream is ``stream[k*T : k*T + T + 1]`` and
becomes one example (`pack_window`)::

    inputs, targets   int32 [T]    window[:-1], window[1:] (right-padded with 0 in a short window)
    mask              float32 [T]  1 where the target is predicted: every target but a BOS that follows
                                   an EOS (the next document's start, which nothing predicts)
    segment_ids       int32 [T]    1, 2, ... per document piece in the window (0 on padding)
    positions         int32 [T]    offset inside that piece (restarts at each BOS input)

BOS and EOS are the tokenizer's own ids (a tokenizer with one end-of-text token, like GPT-2's, uses
it for both: its EOS target after a text token is predicted, the BOS after it is not). Every BOS input
starts a segment, so the packing needs no side index: a stream held in memory (`ArrayStream`) and
one read from ArrayRecord shards (`ArrayRecordStream`) give the same windows.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from loopformer import jsontext
from loopformer.data.tokenizers import Tokenizer
from loopformer.errors import DataError
from loopformer.runs.layout import not_a_file

SPLITS = ("train", "val")
ASSET_PREFIX = "asset:"
META_FILE = "meta.json"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
ARRAYRECORD_SUFFIXES = (".array_record", ".arrayrecord")


# ----------------------------------------------------------------------------- files and documents


def asset_path(name: str) -> Path:
    """A text shipped with the package under ``loopformer/assets/`` (a bare file name: ``asset:`` never
    reaches outside that folder)."""
    path = Path(str(resources.files("loopformer") / "assets" / name))
    if not name or Path(name).name != name or name in (".", ".."):
        raise DataError(f"data.paths: {ASSET_PREFIX}{name!s} must name one shipped file, e.g. "
                        f"{ASSET_PREFIX}kjv_genesis_exodus.txt (no directories)")
    if not path.is_file():
        shipped = sorted(p.name for p in path.parent.glob("*.txt")) if path.parent.is_dir() else []
        raise DataError(f"data.paths: {ASSET_PREFIX}{name} is not a shipped asset; shipped texts: "
                        f"{', '.join(ASSET_PREFIX + s for s in shipped) or 'none'}")
    return path


def expand_paths(patterns: Sequence[str]) -> list[Path]:
    """Files named by ``data.paths``: ``asset:NAME``, plain paths, globs (``**`` recurses) and
    directories (their files, recursively), each expansion sorted; DataError if one matches nothing, or a file is
    matched twice (its documents were read twice, with no word)."""
    if not patterns:
        raise DataError("data.paths is empty: name the corpus files, e.g. data.paths=['corpus/*.txt'] "
                        "(or data.paths=['asset:kjv_genesis_exodus.txt'] for the shipped text)")
    out: list[Path] = []
    by: dict[Path, tuple[str, Path]] = {}  # each file's first pattern and path
    for pattern in patterns:
        if pattern.startswith(ASSET_PREFIX):
            _once(asset_path(pattern[len(ASSET_PREFIX):]), pattern, by, out)
            continue
        expanded = Path(pattern).expanduser()
        if glob.has_magic(pattern):
            found = [Path(p) for p in sorted(glob.glob(str(expanded), recursive=True)) if Path(p).is_file()]
        elif expanded.is_dir():  # hidden files and directories (.git, a killed prepare's .x.tmp-PID) are not corpus
            found = sorted(p for p in expanded.rglob("*")
                           if p.is_file() and not any(part.startswith(".") for part in p.relative_to(expanded).parts))
        else:
            found = [expanded] if expanded.is_file() else []
            what = not_a_file(expanded)
            if what and what != "does not exist":  # /dev/zero, a FIFO (not opened), a dangling link: there, no corpus
                raise DataError(f"data.paths: '{pattern}' {what}; name the corpus files")
        if not found:
            what = "glob" if glob.has_magic(pattern) else "path"
            raise DataError(f"data.paths: {what} '{pattern}' matches no file (relative paths are read from "
                            f"{Path.cwd()}); fix the path or run from the directory it is relative to")
        for path in found:
            _once(path, pattern, by, out)
    return out


def _once(path: Path, pattern: str, by: dict[Path, tuple[str, Path]], out: list[Path]) -> None:
    """Add ``path`` (matched by ``pattern``) to ``out``; DataError when it, or a link to its file, was matched before."""
    key = path.resolve()
    if key in by:
        first, seen = by[key]
        both = f"'{pattern}' names" if first == pattern else f"'{first}' and '{pattern}' name"
        what = str(path) if seen == path else f"one file twice ({seen} and {path})"
        raise DataError(f"data.paths: {both} {what}{' twice' if seen == path else ''}, and its documents would be "
                        f"read twice; name each file once")
    by[key] = (pattern, path)
    out.append(path)


def file_format(path: Path, fmt: str) -> str:
    """``text`` or ``jsonl`` for one file (``auto`` goes by its extension)."""
    if fmt != "auto":
        return fmt
    return "jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "text"


class RepeatedKey(ValueError):
    """A JSON object that gives one key twice: `json.loads` keeps the last value, with no word."""


def json_line(line: str) -> Any:
    """One line of a JSONL file (a corpus record, a probe) as `json.loads` reads it; RepeatedKey (the key) for an object
    that gives a key twice (a probe's second "answer" replaced the first silently, #27 pass 22; YAML configs refuse
    it too)."""
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise RepeatedKey(key)
            out[key] = value
        return out

    return jsontext.loads(line, object_pairs_hook=pairs)


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {e.start}); convert it, e.g. "
                        f"`iconv -f latin1 -t utf-8`, or drop it from data.paths") from None


def iter_documents(paths: Sequence[Path], fmt: str = "auto", text_field: str = "text",
                   doc_separator: str = "") -> Iterator[str]:
    """Documents of ``paths`` in order: one per JSONL record (its ``text_field``), else one per
    plain-text file, split at ``doc_separator`` when set. Empty documents are skipped; a file with
    none raises DataError."""
    for path in paths:
        kind = file_format(path, fmt)
        if kind == "arrayrecord":
            raise DataError(f"{path}: ArrayRecord shards are read as a whole prepared directory; point "
                            f"data.paths at the directory `loopformer prepare` wrote")
        text = _read_text(path)
        count = 0
        if kind == "jsonl":  # past a leading BOM (Notepad's UTF-8): its first line was "not a JSON object"
            for line_no, line in enumerate(text.removeprefix("\ufeff").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json_line(line)
                except RepeatedKey as e:
                    raise DataError(f"{path}:{line_no}: key '{e}' is given twice in one record; keep one") from None
                except json.JSONDecodeError:
                    raise DataError(f"{path}:{line_no}: not a JSON object; each line of a .jsonl file must be "
                                    f"one JSON object (or set data.format=text)") from None
                doc = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(doc, str):
                    raise DataError(f"{path}:{line_no}: no string field '{text_field}'; set data.text_field "
                                    f"to the key holding the text")
                if doc:
                    count += 1
                    yield doc
        else:
            for doc in text.split(doc_separator) if doc_separator else [text]:
                if doc.strip():
                    count += 1
                    yield doc
        if count == 0:
            raise DataError(f"{path}: the file is empty (no text); remove it from data.paths or fill it")


def split_of(doc: str, val_fraction: float) -> str:
    """``"val"`` for a stable ``val_fraction`` share of documents (by a hash of the text), else
    ``"train"``; identical documents always land in the same split. (A corpus of one document is
    split by position instead: `position_split`.)"""
    h = int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest(), "little")
    return "val" if h < val_fraction * 2.0**64 else "train"


HASH_SPLIT, POSITION_SPLIT = "hash", "position"


def val_tokens(n: int, val_fraction: float) -> int:
    """Tokens of a one-document corpus's val split: the last ceil(val_fraction * n), at least 2 (one
    target)."""
    return min(max(2, math.ceil(val_fraction * n)), max(n - 1, 0))


def position_split(tokens: np.ndarray, val_fraction: float) -> dict[str, np.ndarray]:
    """A corpus of one document (a book, ``input.txt``): its token stream ``BOS ids EOS`` cut in two,
    the last ``val_fraction`` of the tokens held out as val (nanoGPT's split), the rest train."""
    cut = len(tokens) - val_tokens(len(tokens), val_fraction)
    return {"train": tokens[:cut], "val": tokens[cut:]}


def training_text(doc: str, val_fraction: float) -> str:
    """The part of a one-document corpus a BPE is trained on: the text before its last
    ``val_fraction`` (by characters: the token cut is only known once there is a tokenizer)."""
    return doc[: len(doc) - math.ceil(val_fraction * len(doc))]


def encode_document(tokenizer: Tokenizer, doc: str) -> np.ndarray:
    """int32 [n + 2]: ``BOS ids EOS`` with the tokenizer's ids."""
    ids = tokenizer.encode_array(doc)
    out = np.empty(len(ids) + 2, np.int32)
    out[0], out[1:-1], out[-1] = tokenizer.bos_id, ids, tokenizer.eos_id
    return out


# ----------------------------------------------------------------------------- token streams


class TokenStream(Protocol):
    """Random access to one split's token stream."""

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> np.ndarray:
        """int32 tokens [start, min(stop, len))."""
        ...


class ArrayStream:
    """A token stream held in memory."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = np.asarray(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.tokens[start:stop].astype(np.int32)


class ArrayRecordStream:
    """A token stream stored as ArrayRecord records of ``chunk`` tokens each (the last may be
    shorter), in the files' order; a read fetches only the records it overlaps."""

    def __init__(self, files: Sequence[Path], num_tokens: int, chunk: int, dtype: str):
        import grain

        where = files[0].parent if files else "the prepared directory"
        self.where = where
        try:
            self.source = grain.sources.ArrayRecordDataSource([str(f) for f in files])
        except RuntimeError as e:  # a shard cut or overwritten: the ArrayRecord library's traceback (#27 pass 34)
            raise self.damaged(e) from None
        self.num_tokens, self.chunk = int(num_tokens), int(chunk)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        expected = math.ceil(self.num_tokens / self.chunk)
        if len(self.source) != expected:
            raise DataError(f"{where}: the shards hold {len(self.source)} records but {META_FILE} says "
                            f"{expected}; the data is incomplete: run `loopformer prepare` again")

    def damaged(self, error: RuntimeError) -> DataError:
        """The one line for a shard the ArrayRecord library cannot read (``error``, its message)."""
        return DataError(f"{self.where}: a shard of this prepared corpus cannot be read ({error}); it was changed "
                         f"after `loopformer prepare` wrote it: prepare it again (--force replaces it)")

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, self.num_tokens)
        if stop <= start:
            return np.zeros(0, np.int32)
        first, last = start // self.chunk, (stop - 1) // self.chunk
        try:
            records = self.source.__getitems__(list(range(first, last + 1)))
        except RuntimeError as e:
            raise self.damaged(e) from None
        tokens = np.concatenate([np.frombuffer(r, self.dtype) for r in records])
        offset = first * self.chunk
        return tokens[start - offset : stop - offset].astype(np.int32)


# ----------------------------------------------------------------------------- windows


def pack_window(tokens: np.ndarray, seq_len: int, bos: int, eos: int) -> dict[str, np.ndarray]:
    """One example from ``tokens`` [n <= seq_len + 1] (see the module docstring); rows past n - 1
    are padding (all zero)."""
    n = max(len(tokens) - 1, 0)
    if n > seq_len:
        raise ValueError(f"window of {len(tokens)} tokens is longer than seq_len + 1 = {seq_len + 1}")
    out = {"inputs": np.zeros(seq_len, np.int32), "targets": np.zeros(seq_len, np.int32),
           "mask": np.zeros(seq_len, np.float32), "segment_ids": np.zeros(seq_len, np.int32),
           "positions": np.zeros(seq_len, np.int32)}
    if n == 0:
        return out
    inputs, targets = tokens[:-1], tokens[1:]
    starts = inputs == bos
    index = np.arange(n)
    out["inputs"][:n], out["targets"][:n] = inputs, targets
    out["mask"][:n] = ~((targets == bos) & (inputs == eos))
    out["segment_ids"][:n] = np.cumsum(starts) + (0 if starts[0] else 1)
    out["positions"][:n] = index - np.maximum.accumulate(np.where(starts, index, 0))
    return out


def num_windows(stream_len: int, seq_len: int, *, full_only: bool) -> int:
    """Windows of a stream: full ones only (training), or enough to cover every target (eval)."""
    targets = max(stream_len - 1, 0)
    return targets // seq_len if full_only else math.ceil(targets / seq_len)


def read_window(stream: TokenStream, index: int, seq_len: int, bos: int, eos: int) -> dict[str, np.ndarray]:
    """Example ``index`` of ``stream``: `pack_window` of tokens [index*T, index*T + T + 1)."""
    start = index * seq_len
    return pack_window(stream.read(start, start + seq_len + 1), seq_len, bos, eos)


def empty_window(seq_len: int) -> dict[str, np.ndarray]:
    return pack_window(np.zeros(0, np.int32), seq_len, 0, 0)


@dataclass
class SplitStats:
    """What a split holds: documents, tokens (with BOS/EOS) and UTF-8 bytes of text."""

    documents: int = 0
    tokens: int = 0
    bytes: int = 0

    def add(self, doc: str, ids: np.ndarray) -> None:
        self.documents += 1
        self.tokens += len(ids)
        self.bytes += len(doc.encode("utf-8"))
