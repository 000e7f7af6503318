"""Text tokenizers: raw UTF-8 bytes, and a byte-level BPE trained locally on the corpus.

Both share one id layout: ``PAD=0, BOS=1, EOS=2``, then the 256 byte values at ``3..258``, then
(BPE only) one id per learned merge. ``encode`` never emits the specials; the packer wraps each
document as ``BOS ids EOS``. A tokenizer round-trips through a small JSON file saved with the run
(``<run_dir>/tokenizer.json``), so a run never needs its corpus again to read or write text.
"""

from __future__ import annotations

import heapq
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from loopformer.errors import DataError

PAD, BOS, EOS = 0, 1, 2
NUM_SPECIAL = 3
NUM_BYTES = 256
BYTE_VOCAB = NUM_SPECIAL + NUM_BYTES  # 259
KINDS = ("bytes", "bpe")

# GPT-2-style pre-tokenisation with the standard library's `re` (unicode aware): a word, a number,
# a run of punctuation (each with at most one leading space), or whitespace. Merges never cross
# piece boundaries, and the pieces of a text concatenate back to it exactly.
_PIECES = re.compile(r" ?[^\W\d_]+| ?\d+| ?[^\s\w]+| ?_+|\s+(?!\S)|\s+")


class Tokenizer:
    """Base: ``encode(str) -> list[int]``, ``decode(list[int]) -> str`` and byte accounting."""

    kind: str = ""
    bos_id, eos_id, pad_id = BOS, EOS, PAD

    @property
    def vocab_size(self) -> int:
        return len(self.vocab_bytes)

    @property
    def vocab_bytes(self) -> list[bytes]:
        """The UTF-8 bytes each id stands for (empty for the specials)."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """int32 [n] ids of ``text`` (no BOS/EOS)."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; specials and out-of-range ids are skipped, broken UTF-8 becomes U+FFFD."""
        table = self.vocab_bytes
        return b"".join(table[i] for i in map(int, ids) if 0 <= i < len(table)).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """int32 [vocab]: text bytes each id predicts, for bits per byte. EOS counts 1 (the document
        break it stands for); PAD and BOS count 0 (never predicted)."""
        out = np.array([len(b) for b in self.vocab_bytes], np.int32)
        out[EOS] = 1
        return out

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        """Write JSON atomically (tmp then rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json()))
        tmp.replace(path)


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte: vocab 259, no files needed."""

    kind = "bytes"

    def __init__(self) -> None:
        self._vocab = [b""] * NUM_SPECIAL + [bytes([b]) for b in range(NUM_BYTES)]

    @property
    def vocab_bytes(self) -> list[bytes]:
        return self._vocab

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + NUM_SPECIAL

    def to_json(self) -> dict[str, Any]:
        return {"kind": "bytes"}


class BPETokenizer(Tokenizer):
    """Byte-level BPE: merge ``i`` (a pair of ids) creates id ``259 + i``."""

    kind = "bpe"

    def __init__(self, merges: list[tuple[int, int]]):
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.ranks = {pair: i for i, pair in enumerate(self.merges)}
        vocab = [b""] * NUM_SPECIAL + [bytes([b]) for b in range(NUM_BYTES)]
        for a, b in self.merges:
            if not (NUM_SPECIAL <= a < len(vocab) and NUM_SPECIAL <= b < len(vocab)):
                raise DataError(f"BPE merge ({a}, {b}) refers to an id not defined before it: the tokenizer "
                                f"file is corrupt; delete it to retrain")
            vocab.append(vocab[a] + vocab[b])
        self._vocab = vocab
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_bytes(self) -> list[bytes]:
        return self._vocab

    def _encode_piece(self, piece: str) -> list[int]:
        ids = self._cache.get(piece)
        if ids is not None:
            return ids
        ids = [b + NUM_SPECIAL for b in piece.encode("utf-8")]
        while len(ids) > 1:
            best = min(zip(ids, ids[1:], strict=False), key=lambda p: self.ranks.get(p, len(self.ranks)))
            rank = self.ranks.get(best)
            if rank is None:
                break
            ids = _merge(ids, best, BYTE_VOCAB + rank)
        if len(self._cache) < 1_000_000:
            self._cache[piece] = ids
        return ids

    def encode_array(self, text: str) -> np.ndarray:
        out: list[int] = []
        for piece in _PIECES.findall(text):
            out.extend(self._encode_piece(piece))
        return np.asarray(out, np.int32)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "bpe", "vocab_size": self.vocab_size, "merges": self.merges}

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, progress: Callable[[int, int], None] | None = None
              ) -> BPETokenizer:
        """Learn ``vocab_size - 259`` merges from ``texts`` (fewer if pairs run out).

        Deterministic: each step merges the most frequent adjacent pair, ties broken by the smaller
        pair of ids; the result depends only on the multiset of pre-tokenised pieces.
        """
        if vocab_size < BYTE_VOCAB:
            raise DataError(f"data.vocab_size={vocab_size} is too small for a BPE tokenizer: it needs >= "
                            f"{BYTE_VOCAB} (3 specials + 256 bytes); raise it, or use data.tokenizer=bytes")
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(_PIECES.findall(text))
        words = [[b + NUM_SPECIAL for b in w.encode("utf-8")] for w in counts]
        freq = list(counts.values())
        pairs: Counter[tuple[int, int]] = Counter()
        where: dict[tuple[int, int], set[int]] = {}
        for i, w in enumerate(words):
            for p in zip(w, w[1:], strict=False):
                pairs[p] += freq[i]
                where.setdefault(p, set()).add(i)
        heap = [(-c, p) for p, c in pairs.items()]
        heapq.heapify(heap)
        merges: list[tuple[int, int]] = []
        wanted = vocab_size - BYTE_VOCAB
        while len(merges) < wanted and heap:
            neg, pair = heapq.heappop(heap)
            if pairs.get(pair, 0) != -neg:  # stale entry
                continue
            if -neg < 2:
                break
            new_id = BYTE_VOCAB + len(merges)
            merges.append(pair)
            changed: set[tuple[int, int]] = set()
            for i in where.pop(pair, ()):
                old = words[i]
                if len(old) < 2:
                    continue
                new = _merge(old, pair, new_id)
                if len(new) == len(old):
                    continue
                for p in zip(old, old[1:], strict=False):
                    pairs[p] -= freq[i]
                    changed.add(p)
                for p in zip(new, new[1:], strict=False):
                    pairs[p] += freq[i]
                    where.setdefault(p, set()).add(i)
                    changed.add(p)
                words[i] = new
            pairs.pop(pair, None)
            for p in changed:
                c = pairs.get(p, 0)
                if c > 0:
                    heapq.heappush(heap, (-c, p))
                else:
                    pairs.pop(p, None)
            if progress is not None:
                progress(len(merges), wanted)
        return cls(merges)


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    a, b = pair
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def tokenizer_from_json(data: dict[str, Any], where: str = "tokenizer.json") -> Tokenizer:
    """Inverse of ``to_json``; DataError naming ``where`` on anything malformed."""
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe" and isinstance(data.get("merges"), list):
        try:
            return BPETokenizer([tuple(m) for m in data["merges"]])
        except (TypeError, ValueError):
            pass
    raise DataError(f"{where} is not a loopformer tokenizer (expected kind 'bytes' or 'bpe' with merges); "
                    f"delete it to rebuild it from the corpus")


def read_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer JSON file written by ``Tokenizer.save``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: tokenizer file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path} is corrupt (not JSON); delete it to rebuild it from the corpus") from None
    return tokenizer_from_json(data, str(path))
