"""Text tokenizers. ``data.tokenizer`` picks one:

    bytes                    `ByteTokenizer`: PAD=0, BOS=1, EOS=2, then the byte values at 3..258 (vocab 259)
    bpe                      a byte-level BPE trained on the training split with the Hugging Face
                             `tokenizers` library; its specials <pad>, <s>, </s> keep ids 0, 1, 2
    path/to/tokenizer.json   a Hugging Face tokenizer file (GPT-2, Llama, ...) loaded as is; its
                             BOS/EOS/PAD are found by name (`HFTokenizer.kind` is "file")

``encode`` never emits specials, not even for a special token's text inside a document (the packer
wraps each document as ``BOS ids EOS``). A run saves its tokenizer as ``<run_dir>/tokenizer.json``
(``{"kind": "bytes"}``, or the standard Hugging Face file, a user's file unchanged), so a run never
needs its corpus or the user's path again to read or write text.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import tokenizers as hf

from loopformer import jsontext
from loopformer.errors import DataError

PAD, BOS, EOS = 0, 1, 2
NUM_SPECIAL = 3
NUM_BYTES = 256
BYTE_VOCAB = NUM_SPECIAL + NUM_BYTES  # 259
BPE_SPECIALS = ("<pad>", "<s>", "</s>")  # ids PAD, BOS, EOS of a trained BPE

# Special tokens of common tokenizer files, most specific first. GPT-2 has only <|endoftext|>, so it
# is both BOS and EOS; a file without a pad token pads with EOS (padding is masked out anyway).
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "[BOS]", "<|startoftext|>", "[CLS]")
EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[EOS]", "<|im_end|>", "<|eot_id|>", "<|end|>",
             "[SEP]")
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<|finetune_right_pad_id|>")
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # sentencepiece byte tokens: one byte each


def tokenizer_kind(setting: str) -> str:
    """The kind a ``data.tokenizer`` value asks for: bytes, bpe, or file (anything else is a path)."""
    return setting if setting in ("bytes", "bpe") else "file"


class Tokenizer:
    """``encode(str) -> list[int]``, ``decode(ids) -> str``, byte accounting and saving."""

    kind: str = ""
    bos_id, eos_id, pad_id = BOS, EOS, PAD

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """int32 [n] ids of ``text`` (no BOS/EOS)."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; specials and out-of-range ids are skipped, broken UTF-8 becomes U+FFFD."""
        raise NotImplementedError

    def token_bytes(self) -> np.ndarray:
        """int32 [vocab]: text bytes each id predicts, for bits per byte. EOS counts 1 (the document
        break it stands for); PAD, BOS and other specials count 0."""
        raise NotImplementedError

    def to_str(self) -> str:
        """The contents of the saved ``tokenizer.json``."""
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        """Write ``to_str()`` atomically (tmp then rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_str(), encoding="utf-8")
        tmp.replace(path)


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte: vocab 259, no files needed."""

    kind = "bytes"

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + NUM_SPECIAL

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i - NUM_SPECIAL for i in map(int, ids) if NUM_SPECIAL <= i < BYTE_VOCAB).decode("utf-8", "replace")

    def token_bytes(self) -> np.ndarray:
        out = np.ones(BYTE_VOCAB, np.int32)
        out[[PAD, BOS]] = 0
        return out

    def to_str(self) -> str:
        return json.dumps({"kind": "bytes"})


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer`: a trained BPE (kind "bpe") or a user's file (kind "file")."""

    def __init__(self, tok: hf.Tokenizer, kind: str, where: str, text: str | None = None):
        self.hf, self.kind = tok, kind
        self._text = tok.to_str() if text is None else text  # saved unchanged
        tok.no_truncation()  # a file's truncation/padding settings would silently cut documents
        tok.no_padding()
        tok.encode_special_tokens = True  # "</s>" inside a document is text, never a document break
        self._vocab_size = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        find = lambda names: next((i for i in map(tok.token_to_id, names) if i is not None), None)
        eos = find(EOS_NAMES)
        if eos is None:
            raise DataError(f"{where} has no end-of-text token (one of {', '.join(EOS_NAMES[:4])}, ...) to separate "
                            f"documents; add one to its special tokens, or set data.tokenizer=bpe or bytes")
        bos, pad = find(BOS_NAMES), find(PAD_NAMES)
        self.eos_id, self.bos_id = eos, eos if bos is None else bos
        self.pad_id = eos if pad is None else pad

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode_array(self, text: str) -> np.ndarray:
        try:
            ids = self.hf.encode(text, add_special_tokens=False).ids
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception (e.g. WordLevel without [UNK])
            raise DataError(f"the tokenizer cannot encode this text ({e}); give it an unknown token, or use "
                            f"data.tokenizer=bpe or bytes") from None
        return np.asarray(ids, np.int32)

    def encode_prompt(self, text: str) -> list[int]:
        """``text`` with the special tokens the tokenizer's own post-processor adds (Llama 3's
        <|begin_of_text|>; nothing for Qwen2's): what transformers' tokenizer gives."""
        try:
            return list(self.hf.encode(text, add_special_tokens=True).ids)
        except Exception as e:  # noqa: BLE001 - as in encode_array
            raise DataError(f"the tokenizer cannot encode this text ({e})") from None

    def unencodable(self, text: str) -> list[str]:
        """The characters of ``text`` (but whitespace) this tokenizer drops: no token covers them and it has no
        unknown token to stand for them."""
        return [c for c in dict.fromkeys(text) if not c.isspace() and not len(self.encode_array(c))]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([i for i in map(int, ids) if 0 <= i < self._vocab_size], skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        spec = json.loads(self._text)
        decoder = json.dumps(spec.get("decoder"), ensure_ascii=False)
        byte_level = '"ByteLevel"' in decoder  # GPT-2 style: one character per byte
        metaspace = "\u2581" in decoder  # sentencepiece style: "▁" is a space
        byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
        alphabet = set(hf.pre_tokenizers.ByteLevel.alphabet())
        added = self.hf.get_added_tokens_decoder()
        out = np.zeros(self._vocab_size, np.int32)
        for i in range(self._vocab_size):
            token = added[i].content if i in added else self.hf.id_to_token(i)
            if token is None or (i in added and added[i].special):
                continue
            if i in added:
                out[i] = len(token.encode("utf-8"))
            elif byte_level and set(token) <= alphabet:
                out[i] = len(token)
            elif byte_fallback and _BYTE_FALLBACK.fullmatch(token):
                out[i] = 1
            elif metaspace:
                out[i] = len(token.replace("\u2581", " ").encode("utf-8"))
            else:
                out[i] = len(self.hf.decode([i], skip_special_tokens=False).encode("utf-8"))
        out[[self.pad_id, self.bos_id]] = 0
        out[self.eos_id] = 1
        return out

    def to_str(self) -> str:
        return self._text


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE of at most ``vocab_size`` tokens (3 specials + 256 bytes + merges) learned from
    ``texts``; deterministic for the same texts. Pairs seen once are not merged."""
    if isinstance(texts, (str, bytes)):  # each character was a document: a BPE without merges, with no word
        raise DataError("train_bpe: texts is one string; pass a list of documents, e.g. train_bpe([text], "
                        f"{vocab_size}) (a string is read character by character, which learns no merges)")
    if vocab_size <= BYTE_VOCAB:
        raise DataError(f"data.vocab_size={vocab_size} is too small for data.tokenizer=bpe: it needs >= "
                        f"{BYTE_VOCAB + 1} (3 specials + 256 bytes + merges); raise it, or use data.tokenizer=bytes")
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)  # exact round trip
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(BPE_SPECIALS),
                                     initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    _off_the_main_thread(lambda: tok.train_from_iterator(texts, trainer))
    out = HFTokenizer(tok, "bpe", "the trained BPE")
    assert (out.pad_id, out.bos_id, out.eos_id) == (PAD, BOS, EOS)
    return out


def _off_the_main_thread(work: Callable[[], object]) -> None:
    """Run ``work`` (the tokenizers library's training, in Rust for seconds to minutes) on a worker thread while
    this one waits: Python runs signal handlers only on the main thread and only between its own steps, so a
    Ctrl-C or SIGTERM during the training waited for it to end (8 s on a 22 MB corpus); now it interrupts at once
    (the worker, a daemon, ends with the process). Whatever ``work`` raises is raised here."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as e:  # noqa: BLE001 (re-raised in the caller)
            failed.append(e)

    worker = threading.Thread(target=run, name="bpe-training", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)  # wakes to let the signal handlers run
    if failed:
        raise failed[0]


def _is_our_bpe(data: dict) -> bool:
    specials = [(t.get("id"), t.get("content")) for t in data.get("added_tokens") or [] if isinstance(t, dict)]
    pre = data.get("pre_tokenizer") or {}
    return (specials == list(enumerate(BPE_SPECIALS)) and (data.get("model") or {}).get("type") == "BPE"
            and pre.get("type") == "ByteLevel")


CORPUS_FIX = "prepare the corpus again (`loopformer prepare --force` replaces it)"


def tokenizer_from_json(text: str, where: str = "tokenizer.json", setting: str | None = None,
                        fix: str | None = None) -> Tokenizer:
    """The tokenizer a ``tokenizer.json``'s text describes; DataError naming ``where`` on anything else.
    ``setting`` (e.g. "data.tokenizer") names the config field the file came from, for the fix; ``fix`` replaces
    the fix (a prepared corpus's file, `CORPUS_FIX`)."""
    fix = fix or (f"point {setting} at a Hugging Face tokenizer.json (or use bytes / bpe)" if setting
                  else "delete it to rebuild it (a run trained on it needs a fresh run)")
    try:
        data = jsontext.loads(text)
    except json.JSONDecodeError:
        raise DataError(f"{where} is not JSON, so not a tokenizer.json; {fix}") from None
    if isinstance(data, dict) and data.get("kind") == "bytes":
        return ByteTokenizer()
    if isinstance(data, dict) and data.get("kind") == "bpe":
        raise DataError(f"{where} is a BPE tokenizer from an older loopformer that this version cannot read; delete it "
                        f"to retrain the BPE (a run trained on it needs a fresh run; a prepared corpus, prepare --force)")
    if not (isinstance(data, dict) and isinstance(data.get("model"), dict)):
        raise DataError(f"{where} is not a tokenizer (a Hugging Face tokenizer.json has a \"model\"); {fix}")
    try:
        tok = hf.Tokenizer.from_str(text)
    except Exception as e:  # the library raises a bare Exception with a serde message
        raise DataError(f"{where}: the tokenizers library cannot read it ({str(e).splitlines()[0][:200]}); "
                        f"{fix}") from None
    return HFTokenizer(tok, "bpe" if _is_our_bpe(data) else "file", where, text)


def read_tokenizer(path: str | Path, setting: str | None = None) -> Tokenizer:
    """Load a ``tokenizer.json``: one saved with a run or a prepared corpus, or (``setting`` = the config
    field naming it) a user's Hugging Face file."""
    from loopformer.data.text import META_FILE

    path = Path(path).expanduser()
    where = f"{setting}={path}" if setting else str(path)
    # a prepared corpus's own file: deleting it does not rebuild it ("no such file"; #27 pass 34)
    corpus = not setting and (path.parent / META_FILE).is_file()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{where}: no such file" + (f"; point {setting} at a tokenizer.json (or use bytes / bpe)"
                                                    if setting else f"; {CORPUS_FIX}" if corpus else "")) from None
    except IsADirectoryError:
        raise DataError(f"{where} is a directory; point it at the tokenizer.json inside") from None
    except UnicodeDecodeError:
        raise DataError(f"{where} is not UTF-8 text, so not a tokenizer.json (a sentencepiece .model file must be "
                        f"converted to tokenizer.json first)") from None
    except OSError as e:
        raise DataError(f"{where}: cannot read it ({e.strerror})") from None
    return tokenizer_from_json(text, where, setting, CORPUS_FIX if corpus else None)
