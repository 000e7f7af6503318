"""Text corpora: packing, split, shuffled/sharded/resumable stream, BPE, prepare -> ArrayRecord, bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loopformer.cli import main
from loopformer.config import load_config
from loopformer.data.prepare import prepare_corpus
from loopformer.data.sources import build_data, load_tokenizer
from loopformer.data.text import pack_window, split_of
from loopformer.data.tokenizers import BOS, EOS, NUM_SPECIAL, PAD, ByteTokenizer, read_tokenizer, train_bpe
from loopformer.errors import ConfigError, DataError
from loopformer.train.trainer import _reading_corpus

WORDS = ["the", "of", "and", "to", "in", "that", "he", "shall", "unto", "lord", "his", "for", "i", "with", "god",
         "them", "is", "be", "naïve", "日本", "→"]


def corpus(tmp_path, docs=48, name="corpus.txt"):
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, rng.integers(5, 40))) + "." for _ in range(docs)]
    path = tmp_path / name
    path.write_text("\n\n".join(texts), encoding="utf-8")
    return path, texts


def cfg_for(tmp_path, paths, *extra):
    return load_config(None, ["data.task=text", f"data.paths={json.dumps([str(p) for p in paths])}",
                              'data.doc_separator="\\n\\n"', "data.seq_len=16", "data.val_fraction=0.25",
                              "data.eval_examples=8", "data.eval_batch_size=4", f"run.dir={tmp_path}/runs", *extra])


def test_pack_window_segments_positions_and_mask():
    a, b, c = 10, 11, 12
    window = np.array([a, b, EOS, BOS, c, a, EOS, BOS, b])  # tail of doc 1 | doc 2 | head of doc 3
    ex = pack_window(window, seq_len=10, bos=BOS, eos=EOS)
    n = len(window) - 1
    np.testing.assert_array_equal(ex["inputs"][:n], window[:-1])
    np.testing.assert_array_equal(ex["targets"][:n], window[1:])
    np.testing.assert_array_equal(ex["segment_ids"], [1, 1, 1, 2, 2, 2, 2, 3, 0, 0])
    np.testing.assert_array_equal(ex["positions"], [0, 1, 2, 0, 1, 2, 3, 0, 0, 0])
    # No target crosses a document boundary (EOS -> next BOS) and padding counts for nothing.
    np.testing.assert_array_equal(ex["mask"], [1, 1, 0, 1, 1, 1, 0, 1, 0, 0])
    assert ex["inputs"][n:].tolist() == ex["targets"][n:].tolist() == [PAD, PAD]


def test_pack_window_with_one_end_of_text_token():
    """GPT-2 style: one id is both BOS and EOS. The EOS after a text token is predicted (the document
    ends); the BOS after it is not (nothing predicts the next document); each BOS input starts a segment."""
    e, a, b, c = 7, 10, 11, 12
    window = np.array([a, b, e, e, c, a, e, e, b])  # tail of doc 1 | doc 2 | head of doc 3
    ex = pack_window(window, seq_len=8, bos=e, eos=e)
    np.testing.assert_array_equal(ex["mask"], [1, 1, 0, 1, 1, 1, 0, 1])
    np.testing.assert_array_equal(ex["segment_ids"], [1, 1, 2, 3, 3, 3, 4, 5])
    np.testing.assert_array_equal(ex["positions"], [0, 1, 0, 0, 1, 2, 0, 0])


def test_split_is_deterministic_disjoint_and_stable(tmp_path):
    path, texts = corpus(tmp_path)
    # A fixed hash of the text (blake2b, the same in every process; pinned here): a document in val at
    # 0.25 stays in val at any larger fraction.
    named = [f"document {i}" for i in range(12)]
    assert [i for i, t in enumerate(named) if split_of(t, 0.25) == "val"] == [0, 3, 6]
    assert [i for i, t in enumerate(named) if split_of(t, 0.5) == "val"] == [0, 2, 3, 4, 5, 6, 11]
    src = build_data(cfg_for(tmp_path, [path]))
    tok = src.tokenizer

    def docs(split):
        stream = src.streams[split].read(0, 10**9)
        return [tok.decode(d) for d in np.split(stream, np.flatnonzero(stream == BOS)[1:])]

    train, val = docs("train"), docs("val")
    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(texts)
    assert 0 < len(val) < len(texts) / 2
    assert docs("val") == [t for t in texts if split_of(t, 0.25) == "val"]  # corpus order, same every time


def test_train_stream_shuffles_shards_and_resumes_exactly(tmp_path):
    path, _ = corpus(tmp_path)
    src = build_data(cfg_for(tmp_path, [path]))
    it = src.train_iterator(4, seed=3)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    resumed = src.train_iterator(4, seed=3)
    resumed.set_state(state)
    for want, got in zip(expected, [next(resumed) for _ in range(4)], strict=True):
        assert want.keys() == got.keys() == {"inputs", "targets", "mask", "segment_ids", "positions"}
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])
    other_seed = next(src.train_iterator(4, seed=4))["inputs"]
    assert not np.array_equal(next(src.train_iterator(4, seed=3))["inputs"], other_seed)
    # Two processes see disjoint windows that together make up the single-process stream.
    whole = next(src.train_iterator(4, seed=3))["inputs"]
    p0, p1 = (next(src.train_iterator(2, seed=3, shard_index=i, shard_count=2))["inputs"] for i in (0, 1))
    np.testing.assert_array_equal(np.stack([p0[0], p1[0], p0[1], p1[1]]), whole)


def test_bpe_round_trip_and_save(tmp_path):
    _, texts = corpus(tmp_path)
    tok = train_bpe(texts, vocab_size=300)
    assert 259 < tok.vocab_size <= 300
    for s in [texts[0], "unseen ✓ emoji 🙂 and\ttabs\n\nnewlines  ", "", "   x__y 42"]:
        assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode(texts[0])) < len(texts[0].encode())  # it compresses
    assert train_bpe(texts, vocab_size=300).to_str() == tok.to_str()  # deterministic: same vocabulary and merges
    tok.save(tmp_path / "tok.json")
    again = read_tokenizer(tmp_path / "tok.json")
    assert again.to_str() == tok.to_str() and again.encode(texts[1]) == tok.encode(texts[1])
    assert ByteTokenizer().decode(ByteTokenizer().encode("héllo")) == "héllo"


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_prepare_arrayrecord_gives_the_same_batches(tmp_path, tokenizer):
    path, _ = corpus(tmp_path)
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"record {i} " * (i + 3)}) for i in range(12)))
    extra = [f"data.tokenizer={tokenizer}", *(["data.vocab_size=300"] if tokenizer == "bpe" else [])]
    raw = build_data(cfg_for(tmp_path, [path, jsonl], *extra))
    out = tmp_path / "prepared"
    meta = prepare_corpus(cfg_for(tmp_path, [path, jsonl], *extra), out, chunk_tokens=64, shard_tokens=256,
                          progress=False)
    assert len(meta["splits"]["train"]["files"]) > 1  # several shards, windows straddle records
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    prepared = build_data(cfg_for(tmp_path, [out], *extra))
    assert prepared.prepared == out and prepared.vocab_size == raw.vocab_size
    a, b = raw.train_iterator(4, seed=1), prepared.train_iterator(4, seed=1)
    for _ in range(3):
        x, y = next(a), next(b)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    for split, batches in raw.eval_sets().items():
        for x, y in zip(batches, prepared.eval_sets()[split], strict=True):
            np.testing.assert_array_equal(x["targets"], y["targets"])
    with pytest.raises(DataError, match="already holds a prepared corpus; pass --force"):
        prepare_corpus(cfg_for(tmp_path, [path], *extra), out, progress=False)
    # #27 pass 20: beside other paths its shards were read as text ("not UTF-8 text; convert it with iconv")
    with pytest.raises(DataError, match=rf"^data.paths: {out} is a corpus written by `loopformer prepare`, which is "
                                        r"read alone; make it the only entry of data.paths"):
        build_data(cfg_for(tmp_path, [out, path], *extra))
    # #27 pass 33: alone, under data.format=text or jsonl, its shards were read as text too, and the line said to
    # convert a shard with iconv
    for fmt in ("text", "jsonl"):
        with pytest.raises(DataError, match=rf"^data.paths: {out} is a corpus written by `loopformer prepare` "
                                            rf"\(ArrayRecord shards, not {fmt}\), and data.format={fmt} would read its "
                                            rf"files as {fmt}; set data.format=auto \(or arrayrecord\)"):
            build_data(cfg_for(tmp_path, [out], *extra, f"data.format={fmt}"))
    # #27 pass 34: one of its shards named as a path was read as text, and the line said to convert it with iconv
    shard = sorted(out.glob("train-*"))[0]
    for paths in ([shard], [path, shard], [out / "train-*.array_record"]):  # (a pattern too)
        with pytest.raises(DataError, match=rf"^data.paths: {shard} is an ArrayRecord shard of a prepared corpus, "
                                            rf"not text; name its folder, data.paths=\[{out}\]$"):
            build_data(cfg_for(tmp_path, paths, *extra))


def test_a_prepared_corpus_of_more_shards_than_files_may_be_open_is_read_or_named(tmp_path, monkeypatch):
    """#27 pass 34: `prepare --chunk-tokens 1 --shard-tokens 1` wrote thousands of shards, and training on them was a
    RuntimeError traceback ("Too many open files") from the ArrayRecord reader at the first batch: the soft limit is
    raised to the hard one where that is enough, else one line names the shards and a --shard-tokens that fits."""
    import resource

    path, _ = corpus(tmp_path)
    out = tmp_path / "prepared"
    meta = prepare_corpus(cfg_for(tmp_path, [path]), out, chunk_tokens=64, shard_tokens=256, progress=False)
    shards = sum(len(meta["splits"][s]["files"]) for s in ("train", "val"))
    raised = []
    monkeypatch.setattr(resource, "setrlimit", lambda what, limits: raised.append(limits))
    monkeypatch.setattr(resource, "getrlimit", lambda what: (shards, 100_000))
    next(build_data(cfg_for(tmp_path, [out])).train_iterator(4, seed=1))
    assert raised == [(100_000, 100_000)]
    out = tmp_path / "again"  # (a corpus's streams are opened once per process)
    prepare_corpus(cfg_for(tmp_path, [path]), out, chunk_tokens=64, shard_tokens=256, progress=False)
    monkeypatch.setattr(resource, "getrlimit", lambda what: (shards, shards + 100))
    with pytest.raises(DataError, match=rf"^{out}: its {shards} shards are more files than this process may open at "
                                        rf"once \({shards + 100}, `ulimit -Hn`, less 256 for the rest\); prepare it "
                                        r"again with fewer, e.g. --shard-tokens [0-9,]+ or more$"):
        next(build_data(cfg_for(tmp_path, [out])).train_iterator(4, seed=1))


@pytest.mark.parametrize(("key", "value"), [("chunk_tokens", 0), ("chunk_tokens", "a"), ("dtype", "bogus"),
                                            ("dtype", "float64"), ("splits.train.files", []), ("splits.val", None),
                                            ("splits.train.files", ["../x/train-00000-of-00001.array_record"]),
                                            ("splits.train.tokens", -1), ("splits.val.tokens", True)])
def test_a_meta_json_edited_by_hand_is_one_line(tmp_path, key, value):
    """#27 pass 34: a prepared corpus's meta.json with a field prepare never writes (chunk_tokens 0 or a string, an
    unknown dtype, no shard files, no val split) was a ZeroDivisionError, ValueError, TypeError or KeyError traceback
    (a file of another folder was read)."""
    path, _ = corpus(tmp_path)
    out = tmp_path / "prepared"
    prepare_corpus(cfg_for(tmp_path, [path]), out, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    *parents, last = key.split(".")
    at = meta
    for k in parents:
        at = at[k]
    at[last] = value
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=rf"^{out}/meta.json: {key} is {re.escape(repr(value))}, which `loopformer "
                                        r"prepare` never writes \(edited by hand\?\); run `loopformer prepare` again$"):
        next(build_data(cfg_for(tmp_path, [out])).train_iterator(4, seed=1))


@pytest.mark.parametrize("damage", ["vocab_size", "tokenizer"])
def test_a_corpus_whose_tokenizer_is_not_the_one_its_meta_names_is_one_line(tmp_path, damage):
    """#27 pass 36: meta.json's vocab_size was not compared with the corpus's tokenizer.json, so a tokenizer.json
    copied from another corpus (or a vocab_size edited by hand) decoded the shards' ids silently wrong."""
    path, _ = corpus(tmp_path)
    out = tmp_path / "prepared"
    prepare_corpus(cfg_for(tmp_path, [path]), out, progress=False)
    if damage == "vocab_size":
        meta = json.loads((out / "meta.json").read_text())
        meta["vocab_size"] += 1
        (out / "meta.json").write_text(json.dumps(meta))
    else:
        other = tmp_path / "other"
        prepare_corpus(cfg_for(tmp_path, [path], "data.tokenizer=bpe", "data.vocab_size=300"), other, progress=False)
        (out / "tokenizer.json").write_bytes((other / "tokenizer.json").read_bytes())
    with pytest.raises(DataError, match=rf"^{out}/tokenizer.json is a \w+ tokenizer of \d+ tokens, where "
                                        rf"{out}/meta.json says its shards hold ids of a bytes tokenizer of \d+ tokens "
                                        r"as uint16 \(one of them replaced or edited by hand\?\); prepare the corpus "
                                        r"again \(`loopformer prepare --force` replaces it\)$"):
        next(build_data(cfg_for(tmp_path, [out])).train_iterator(4, seed=1))
    prepare_corpus(cfg_for(tmp_path, [path]), tmp_path / "whole", progress=False)  # an intact corpus still reads
    next(build_data(cfg_for(tmp_path, [tmp_path / "whole"])).train_iterator(4, seed=1))


def test_arrayrecord_format_of_a_text_file_does_not_say_to_prepare_into_it(tmp_path):
    """#27 pass 34: data.format=arrayrecord of a text file said "run `loopformer prepare --out FILE`", the file."""
    path, _ = corpus(tmp_path)
    with pytest.raises(DataError, match=rf"^{path}: not a prepared corpus but a file, and data.format=arrayrecord "
                                        r"reads the folder `loopformer prepare --out DIR` writes; set data.format=auto"):
        next(build_data(cfg_for(tmp_path, [path], "data.format=arrayrecord")).train_iterator(4, seed=1))


@pytest.mark.parametrize("damage", ["garbage", "deleted"])
def test_a_prepared_corpus_s_damaged_tokenizer_names_prepare_as_the_fix(tmp_path, damage):
    """#27 pass 34: a prepared corpus's tokenizer.json that is not JSON said "delete it to rebuild it" (a run's fix),
    and deleted it was "no such file": `prepare --force` rebuilds it."""
    path, _ = corpus(tmp_path)
    out = tmp_path / "prepared"
    prepare_corpus(cfg_for(tmp_path, [path]), out, progress=False)
    if damage == "garbage":
        (out / "tokenizer.json").write_text("garbage")
    else:
        (out / "tokenizer.json").unlink()
    with pytest.raises(DataError, match=r"; prepare the corpus again \(`loopformer prepare --force` replaces it\)$"):
        next(build_data(cfg_for(tmp_path, [out])).train_iterator(4, seed=1))
    prepare_corpus(cfg_for(tmp_path, [path]), out, force=True, progress=False)
    next(build_data(cfg_for(tmp_path, [out])).train_iterator(4, seed=1))


@pytest.mark.parametrize("damage", ["cut", "flipped"])
def test_a_damaged_shard_of_a_prepared_corpus_is_one_line(tmp_path, damage):
    """#27 pass 34: a shard cut or overwritten after `prepare` wrote it was a RuntimeError traceback from the
    ArrayRecord library ("file should be at least 64KB big", "chunk data hash mismatch") in train, eval and resumes."""
    path, _ = corpus(tmp_path)
    out = tmp_path / "prepared"
    prepare_corpus(cfg_for(tmp_path, [path]), out, progress=False)
    shard = sorted(out.glob("train-*"))[0]
    data = bytearray(shard.read_bytes())
    if damage == "cut":
        data = data[:10]
    else:
        for i in range(1000, len(data) - 1000, 997):
            data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError) as info:
        next(build_data(cfg_for(tmp_path, [out])).train_iterator(4, seed=1))
    line = str(info.value).splitlines()[0]  # (grain adds a note below an error raised under its iterator)
    assert re.fullmatch(rf"{out}: a shard of this prepared corpus cannot be read \(.+\); it was changed after "
                        r"`loopformer prepare` wrote it: prepare it again \(--force replaces it\)", line), line


def test_metrics_and_tokenizer_of_a_config(tmp_path):
    path, _ = corpus(tmp_path)
    cfg = cfg_for(tmp_path, [path])
    src = build_data(cfg)
    sets = src.eval_sets()
    assert set(sets) == {"val", "train"} and sets["val"][0]["inputs"].shape == (4, 16)
    assert src.bytes_per_token(sets["train"]) == 1.0  # bytes: one per token (EOS stands for one)
    bpe = build_data(cfg_for(tmp_path, [path], "data.tokenizer=bpe", "data.vocab_size=320"))
    assert bpe.bytes_per_token(bpe.eval_sets()["train"]) > 1.5
    assert load_tokenizer(cfg).encode("ab") == [ord("a") + 3, ord("b") + 3]


def error(tmp_path, paths, *extra):
    with pytest.raises(DataError) as info:
        src = build_data(cfg_for(tmp_path, paths, *extra))
        src.train_iterator(2, 0)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_bad_inputs_raise_one_line_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert str(empty) in error(tmp_path, [empty]) and "empty" in error(tmp_path, [empty])
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café crème".encode("latin-1"))
    msg = error(tmp_path, [latin])
    assert str(latin) in msg and "not UTF-8" in msg and "iconv" in msg
    msg = error(tmp_path, [tmp_path / "nope" / "*.txt"])
    assert "matches no file" in msg and "nope" in msg
    fifo = tmp_path / "fifo"  # #27 pass 14: said "matches no file" (and a device, /dev/zero, too)
    os.mkfifo(fifo)
    for there in (fifo, Path("/dev/zero")):
        assert error(tmp_path, [there]) == f"data.paths: '{there}' is a pipe or a device; name the corpus files"
    loop = tmp_path / "loop.txt"  # #27 pass 17: a symlink in a loop "matched no file" (it is there)
    loop.symlink_to(loop)
    assert error(tmp_path, [loop]) == (f"data.paths: '{loop}' is a symlink that leads nowhere (or in a loop); name "
                                       f"the corpus files")
    small, _ = corpus(tmp_path, name="small.txt")
    msg = error(tmp_path, [small], "data.seq_len=100000")
    assert str(small) in msg and "fewer than one sequence" in msg and "lower data.seq_len" in msg
    two = tmp_path / "two"  # two documents that both hash into train: the hash split cannot work
    two.mkdir()
    (two / "a.txt").write_text("first document " * 20)
    (two / "b.txt").write_text("third document " * 20)
    assert [split_of(p.read_text(), 0.25) for p in sorted(two.iterdir())] == ["train", "train"]
    msg = error(tmp_path, [two], "data.doc_separator=''")
    assert "all 2 document(s) fell in the train split" in msg and "data.doc_separator" in msg
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\nnot json\n')
    assert f"{bad_json}:2" in error(tmp_path, [bad_json])
    half = tmp_path / "half"
    half.mkdir()
    (half / "train-00000.array_record").write_bytes(b"")
    assert "meta.json is missing" in error(tmp_path, [half], "data.format=arrayrecord")
    # #27 pass 20: a file that data.paths names twice (itself twice, or a folder and a file in it) was read twice,
    # every document of it doubled, with no word
    a = two / "a.txt"
    assert error(tmp_path, [a, a]) == (f"data.paths: '{a}' names {a} twice, and its documents would be read twice; "
                                       f"name each file once")
    assert error(tmp_path, [two, two / "*.txt"]).startswith(f"data.paths: '{two}' and '{two}/*.txt' name {a} twice")
    (two / "link.txt").symlink_to(a)  # a folder holding a link to one of its files
    assert error(tmp_path, [two]).startswith(f"data.paths: '{two}' names one file twice ({a} and {two / 'link.txt'})")


def test_settings_prepare_read_must_match_its_corpus(tmp_path):
    """Issue #27 pass 11: a run on a prepared corpus with another data.vocab_size (BPE) or data.doc_separator was
    accepted, recorded in its config.yaml and unused (the shards hold the prepared tokens); like val_fraction, both
    must match."""
    path, _ = corpus(tmp_path)
    extra = ("data.tokenizer=bpe", "data.vocab_size=300")
    prepare_corpus(cfg_for(tmp_path, [path], *extra), tmp_path / "p", chunk_tokens=64, progress=False)
    assert build_data(cfg_for(tmp_path, [tmp_path / "p"], *extra)).vocab_size == 300
    assert error(tmp_path, [tmp_path / "p"], "data.tokenizer=bpe", "data.vocab_size=500") == (
        f"{tmp_path / 'p'} was prepared with a BPE of vocab_size=300 but data.vocab_size=500; set it to match, or "
        f"prepare again")
    assert "was prepared with doc_separator='\\n\\n' but data.doc_separator='@'" in error(
        tmp_path, [tmp_path / "p"], *extra, "data.doc_separator=@")


def test_prepare_command_line(tmp_path, capsys):
    path, _ = corpus(tmp_path)
    out = tmp_path / "p"
    args = ["prepare", "--out", str(out), "data.task=text", f"data.paths=[{path}]", 'data.doc_separator="\\n\\n"',
            "data.val_fraction=0.25"]
    assert main(args) == 0
    # quoted for the shell (its brackets are a glob; #27 pass 30)
    assert (out / "meta.json").is_file() and f"train with 'data.paths=[{out}]'" in capsys.readouterr().out
    assert main(args) == 2 and "already holds a prepared corpus" in capsys.readouterr().err
    assert main(["prepare", "--out", str(tmp_path / "q"), "data.task=text", "data.paths=[/no/such/*.txt]"]) == 2
    assert "matches no file" in capsys.readouterr().err and not (tmp_path / "q").exists()


# ----------------------------------------------------------------------------- issue #17: one-file corpora, prepare


@pytest.mark.parametrize("separator", ["", "@@@"])  # none set, or set but not found
def test_a_single_text_file_is_split_by_position(tmp_path, capsys, separator):
    """Issue #17.10: a book / input.txt (one document) stopped with "all 1 document(s) fell in the train
    split". It is now split by position: the last data.val_fraction of its tokens is val (nanoGPT's
    split), said so in the description line."""
    path, _ = corpus(tmp_path)
    text = path.read_text()
    src = build_data(cfg_for(tmp_path, [path], f"data.doc_separator={json.dumps(separator)}"))
    train, val = src.streams["train"].read(0, 10**9), src.streams["val"].read(0, 10**9)
    whole = np.concatenate([train, val])
    np.testing.assert_array_equal(whole, [BOS, *ByteTokenizer().encode(text), EOS])  # cut, nothing lost or repeated
    assert len(val) == int(np.ceil(0.25 * len(whole)))
    tail = np.frombuffer(text.encode(), np.uint8)[-(len(val) - 1):]
    assert val[-1] == EOS and np.array_equal(val[:-1] - NUM_SPECIAL, tail)  # the end of the text's bytes
    assert src.stats["train"].bytes + src.stats["val"].bytes == len(text.encode())
    line = src.describe()
    assert "one document, split by position: val is its last 25% of tokens" in line
    assert src.eval_sets()["val"][0]["inputs"].shape == (4, 16) and next(src.train_iterator(2, 0))["inputs"].shape == (2, 16)
    many = build_data(cfg_for(tmp_path, [path]))  # the same file split into documents: the hash split
    assert len(many.streams["train"]) > 0
    assert "documents split by a hash of their text" in many.describe() and many.stats["train"].documents > 1


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_a_prepared_single_file_matches_the_raw_one(tmp_path, tokenizer):
    """Prepared corpora follow the same rule: one document is split by position (meta.json says so)
    and gives the same batches as the raw file."""
    path, _ = corpus(tmp_path)
    bpe = ["data.vocab_size=300"] if tokenizer == "bpe" else []  # a byte tokenizer refuses the BPE's size
    extra = ["data.doc_separator=''", f"data.tokenizer={tokenizer}", *bpe]
    raw = build_data(cfg_for(tmp_path, [path], *extra))
    meta = prepare_corpus(cfg_for(tmp_path, [path], *extra), tmp_path / "p", chunk_tokens=64, progress=False)
    assert meta["split"] == "position" and meta["splits"]["val"]["tokens"] == len(raw.streams["val"])
    prepared = build_data(cfg_for(tmp_path, [tmp_path / "p"], *extra))
    assert prepared.tokenizer.to_str() == raw.tokenizer.to_str()
    for split in ("train", "val"):
        np.testing.assert_array_equal(prepared.streams[split].read(0, 10**9), raw.streams[split].read(0, 10**9))
    x, y = next(raw.train_iterator(4, seed=1)), next(prepared.train_iterator(4, seed=1))
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
    assert len(prepared.streams["val"]) > 0
    assert "split by position" in prepared.describe()


def test_prepare_force_refuses_a_corpus_a_training_reads(tmp_path):
    """#27 pass 19: `prepare --force` replaced a corpus while a training read it, and the run went on (and resumed) on
    the new corpus without a word. The trainer holds a shared lock on its meta.json (`trainer._reading_corpus`)."""
    path, _ = corpus(tmp_path)
    out = tmp_path / "out"
    prepare_corpus(cfg_for(tmp_path, [path]), out, progress=False)
    busy = (r"^--out .*out is being read by a training \(a run whose data.paths names it\), and --force would replace "
            r"the corpus under it; wait for it to finish")
    with _reading_corpus(cfg_for(tmp_path, [out])), pytest.raises(DataError, match=busy):
        prepare_corpus(cfg_for(tmp_path, [path]), out, force=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary folder left
    prepare_corpus(cfg_for(tmp_path, [path]), out, force=True, progress=False)


def test_prepare_force_deletes_nothing_it_did_not_write(tmp_path):
    """Issue #17.3: `prepare --force` deleted whatever was in --out, the source corpus included. It now
    replaces only a directory holding exactly a corpus it wrote; everything else is refused, untouched."""
    data = tmp_path / "data"
    data.mkdir()
    path, _ = corpus(data)
    cfg = cfg_for(tmp_path, [path])
    with pytest.raises(DataError, match=r"data.paths reads .*corpus.txt from inside --out .*data: replacing"):
        prepare_corpus(cfg, data, force=True, progress=False)
    assert path.is_file()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(DataError, match=r"notes is not a corpus written by `loopformer prepare` \(no meta.json"):
        prepare_corpus(cfg, other, force=True, progress=False)
    # #27 pass 37: without --force a folder of the user's (or one holding the corpus) was told "already exists; pass
    # --force to replace it", which --force then refused
    with pytest.raises(DataError, match=r"notes is not a corpus written by `loopformer prepare` \(no meta.json of "
                                        r"version 1\); choose another --out, or remove .*notes yourself \(--force "
                                        r"replaces only"):
        prepare_corpus(cfg, other, progress=False)
    with pytest.raises(DataError, match=r"data.paths reads .*corpus.txt from inside --out .*data: replacing"):
        prepare_corpus(cfg, data, progress=False)
    plain = tmp_path / "plain.bin"
    plain.write_text("x")
    with pytest.raises(DataError, match=r"plain.bin is a file, not a directory; choose another --out \(--force "
                                        r"replaces only"):
        prepare_corpus(cfg, plain, force=True, progress=False)
    # #27 pass 9: without --force a file was told "already exists; pass --force", which then refused it
    with pytest.raises(DataError, match=r"^--out .*plain.bin is a file, not a directory; choose another --out$"):
        prepare_corpus(cfg, plain, progress=False)
    empty = tmp_path / "empty"  # #27 pass 9: an empty directory was "already exists; pass --force", then refused
    empty.mkdir()
    prepare_corpus(cfg, empty, progress=False)
    assert (empty / "meta.json").is_file()
    out = tmp_path / "out"
    prepare_corpus(cfg, out, progress=False)
    (out / "my_notes.txt").write_text("mine")  # a user's file put in a prepared corpus
    with pytest.raises(DataError, match=r"out holds my_notes.txt, which `loopformer prepare` did not write"):
        prepare_corpus(cfg, out, force=True, progress=False)
    assert (other / "todo.txt").read_text() == "mine" and plain.read_text() == "x" and (out / "my_notes.txt").exists()
    (out / "my_notes.txt").unlink()
    meta = prepare_corpus(cfg_for(tmp_path, [path], "data.val_fraction=0.5"), out, force=True, progress=False)
    assert json.loads((out / "meta.json").read_text()) == meta and meta["val_fraction"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no .out.old-PID, no lock
    with pytest.raises(DataError, match=r"--out .*data/prepared is inside .*data, a directory data.paths reads"):
        prepare_corpus(cfg_for(tmp_path, [data]), data / "prepared", progress=False)
    # a corpus inside a corpus: the outer one's --force then refused the folder (#27 pass 40's leftover)
    with pytest.raises(DataError, match=r"^--out .*out/inner/c is inside .*out, a corpus written by `loopformer prepare`"):
        prepare_corpus(cfg, out / "inner" / "c", progress=False)
    assert not (out / "inner").exists()


def test_leftovers_of_a_killed_prepare_are_cleaned_and_never_read(tmp_path):
    """Issue #17.3: a killed prepare left .NAME.tmp-PID (megabytes) forever, and a data.paths directory
    listing walked into it. The next prepare to that --out removes what dead prepares left (and only
    that); hidden entries are never read as corpus."""
    src = tmp_path / "src"
    src.mkdir()
    path, texts = corpus(src)
    pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                             text=True).stdout)  # a process that has exited
    leftovers = {f".out.tmp-{pid}": ["train-00000.array_record", "tokenizer.json.tmp"],
                 f".out.old-{pid}": ["meta.json", "tokenizer.json", "val-00000-of-00001.array_record"],
                 f".out.tmp-{os.getppid()}": ["train-00000.array_record"],  # its process still runs: kept
                 f".out.tmp-{pid + 1}": ["thesis.tex"]}  # not prepare's files: kept
    for name, files in leftovers.items():
        (src / name).mkdir()
        for f in files:
            (src / name / f).write_bytes(b"\x00\xff" * 100)
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref: not corpus")
    listed = build_data(cfg_for(tmp_path, [src]))  # neither the leftovers nor .git are read
    assert len(listed.streams["train"]) > 0
    assert listed.stats["train"].documents + listed.stats["val"].documents == len(texts)
    prepare_corpus(cfg_for(tmp_path, [path]), src / "out", progress=False)
    assert sorted(p.name for p in src.iterdir() if p.name.startswith(".")) == sorted(
        [".git", f".out.tmp-{os.getppid()}", f".out.tmp-{pid + 1}"])


def test_a_second_prepare_on_one_out_names_the_first(tmp_path):
    """Issue #27: two prepares into one --out; the loser blamed "disk full or read-only?". It now names the
    other prepare, and touches nothing."""
    from loopformer.runs.lock import exclusive

    path, _ = corpus(tmp_path)
    out = tmp_path / "out"
    # what a running prepare holds (flock locks belong to the open file: a second open in this process
    # conflicts as another process's would)
    busy = r"^--out .*out is being written by another `loopformer prepare` \(pid \d+ on .*, since .*\); wait for it"
    with exclusive(tmp_path / ".out.prepare.lock", "held", remove=True), pytest.raises(ConfigError, match=busy):
        prepare_corpus(cfg_for(tmp_path, [path]), out, progress=False)
    assert not out.exists()
    prepare_corpus(cfg_for(tmp_path, [path]), out, progress=False)  # once it is done, the next one runs
    assert (out / "meta.json").is_file()


def test_prepare_inside_a_run_is_refused(tmp_path):
    """#27 pass 20: prepare --out RUN/checkpoints/9 wrote the corpus where every command read it as the run's corrupt
    step 9 (advising to delete it) and the trainer prunes it; export, convert and import refused such an --out."""
    path, _ = corpus(tmp_path)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(ConfigError, match=rf"^--out {run}/checkpoints/9 is inside the run {run}; write it outside"):
        prepare_corpus(cfg_for(tmp_path, [path]), run / "checkpoints" / "9", progress=False)
    assert not (run / "checkpoints" / "9").exists()


def test_prepare_into_an_unwritable_place_is_one_line(tmp_path, capsys):
    """Issue #17.7: prepare into a read-only directory gave a raw PermissionError."""
    path, _ = corpus(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    # #27 pass 40: under a file it said "cannot write to FILE (File exists)", naming the OS's reason for mkdir
    with pytest.raises(DataError, match=r"^--out .*file/out: .*file is a file, not a directory; choose an --out whose "
                                        r"parents are directories$"):
        prepare_corpus(cfg_for(tmp_path, [path]), blocker / "out", progress=False)
    if os.geteuid() != 0:  # root writes into read-only directories anyway
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert main(["prepare", "--out", str(ro / "out"), "data.task=text", f"data.paths=[{path}]"]) == 2
        assert "cannot write to" in capsys.readouterr().err


def test_asset_names_stay_inside_the_assets_folder():
    from loopformer.data.text import asset_path

    for name in ("../../pyproject.toml", "", "sub/kjv_genesis_exodus.txt", ".."):
        with pytest.raises(DataError, match="must name one shipped file"):
            asset_path(name)
    assert asset_path("kjv_genesis_exodus.txt").is_file()


@pytest.mark.parametrize("name", ["meta.json", "train-00000-of-00001.array_record"])
def test_a_prepared_corpus_this_user_may_not_read(tmp_path, monkeypatch, name):
    """#27 pass 18, as a user other than root (chmod 000): an unreadable shard was a RuntimeError traceback from the
    ArrayRecord library, an unreadable meta.json "unreadable; run `loopformer prepare` again" (the corpus is whole)."""
    path, _ = corpus(tmp_path)
    prepare_corpus(cfg_for(tmp_path, [path]), tmp_path / "p", chunk_tokens=64, progress=False)
    hidden, real = tmp_path / "p" / name, os.access
    assert hidden.is_file()
    monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != hidden and real(p, mode, **k))
    assert error(tmp_path, [tmp_path / "p"]) == (f"{hidden}: this user may not read it; make the prepared corpus "
                                                 f"readable (chmod -R u+rX {tmp_path / 'p'})")


@pytest.mark.parametrize("pattern", ["", "*.txt"])
def test_a_corpus_folder_this_user_may_not_enter(tmp_path, monkeypatch, pattern):
    """#27 pass 18, as a user other than root (chmod 000 on the folder data.paths names, or holds a glob in): a
    PermissionError traceback from the check for a prepared corpus's meta.json."""
    path, _ = corpus(tmp_path)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: not (Path(p) == tmp_path and mode & os.R_OK)
                        and real(p, mode, **k))
    assert error(tmp_path, [tmp_path / pattern] if pattern else [tmp_path]) == (
        f"data.paths: this user may not read the folder {tmp_path}; make it readable (chmod -R u+rX {tmp_path})")


def test_a_jsonl_corpus_with_a_byte_order_mark_is_read_past_it(tmp_path):
    """#27 pass 22: a .jsonl corpus saved with a BOM (Notepad's UTF-8) was refused as "1: not a JSON object"."""
    from loopformer.data.text import iter_documents

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    assert list(iter_documents([path])) == ["first", "second"]
    path.write_text('{"text": "first", "text": "second"}\n')  # the last one won, with no word
    with pytest.raises(DataError, match=r"bom.jsonl:1: key 'text' is given twice in one record; keep one$"):
        list(iter_documents([path]))


def test_prepare_out_that_is_not_utf8_is_one_line(tmp_path):
    """#27 pass 33: `prepare --out $'pr\\xff'` was a TypeError traceback from ArrayRecord's writer, which takes only
    UTF-8 paths; one line names the byte, and nothing is written."""
    path, _ = corpus(tmp_path)
    out = Path(os.fsdecode(bytes(tmp_path) + b"/pr\xff"))
    with pytest.raises(DataError, match=r"^--out .*/pr\\xff holds the byte \\xff, which is not UTF-8 text"):
        prepare_corpus(cfg_for(tmp_path, [path]), out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]
