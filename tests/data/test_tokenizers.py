"""Tokenizers through the Hugging Face `tokenizers` library: the trained BPE, GPT-2- and Llama-style
tokenizer.json files (built here, offline), byte accounting, saving with a run, and bad files."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer as HF
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from loopformer.config import load_config
from loopformer.data.prepare import prepare_corpus
from loopformer.data.sources import build_data, load_tokenizer
from loopformer.data.tokenizers import BOS, EOS, PAD, ByteTokenizer, read_tokenizer, train_bpe
from loopformer.errors import DataError

WORDS = ["the", "of", "and", "to", "in", "that", "he", "shall", "unto", "lord", "his", "for", "with", "god",
         "them", "is", "be", "naïve", "日本", "→"]
ODD = "unseen ✓ emoji 🙂 and\ttabs\n\nnewlines  "


def documents(n=48):
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, rng.integers(5, 40))) + "." for _ in range(n)]


def gpt2_style(path, texts):
    """A byte-level BPE with <|endoftext|> as its only special token, at the last id (GPT-2's layout)."""
    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=320, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))  # pretty-printed, as the files people download are
    return path


def llama_style(path, texts):
    """A sentencepiece-style BPE: "▁" for spaces, <0x00>..<0xFF> byte-fallback tokens in the vocab,
    <unk>/<s>/</s> at 0/1/2, and a post-processor that prepends <s> (which encode must not use)."""
    tok = HF(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=360, show_progress=False,
                                                       special_tokens=["<unk>", "<s>", "</s>", *byte_tokens]))
    data = json.loads(tok.to_str())
    data["added_tokens"] = data["added_tokens"][:3]  # byte tokens are plain vocabulary, as in Llama's file
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def cfg_for(tmp_path, corpus, *extra):
    return load_config(None, ["data.task=text", f"data.paths=[{corpus}]", 'data.doc_separator="\\n\\n"',
                              "data.seq_len=16", "data.val_fraction=0.25", "data.eval_examples=8",
                              "data.eval_batch_size=4", f"run.dir={tmp_path}/runs", *extra])


def write_corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(documents()), encoding="utf-8")
    return path


def test_trained_bpe_round_trips_and_is_deterministic(tmp_path):
    texts = documents()
    tok = train_bpe(texts, vocab_size=300)
    assert tok.kind == "bpe" and 259 < tok.vocab_size <= 300
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (PAD, BOS, EOS)
    assert [tok.hf.id_to_token(i) for i in (PAD, BOS, EOS)] == ["<pad>", "<s>", "</s>"]
    sizes = tok.token_bytes()
    assert sizes[[PAD, BOS, EOS]].tolist() == [0, 0, 1]
    for s in [texts[0], ODD, "", "   x__y 42", "a </s> b <s>"]:
        ids = tok.encode(s)
        assert tok.decode(ids) == s and sizes[ids].sum() == len(s.encode())
        assert not {PAD, BOS, EOS} & set(ids)  # specials' text inside a document is just text
    assert len(tok.encode(texts[0])) < len(texts[0].encode())  # it compresses
    assert train_bpe(texts, vocab_size=300).to_str() == tok.to_str()  # same vocabulary and merges
    tok.save(tmp_path / "tokenizer.json")
    again = read_tokenizer(tmp_path / "tokenizer.json")
    assert again.kind == "bpe" and again.encode(texts[1]) == tok.encode(texts[1])
    assert HF.from_file(str(tmp_path / "tokenizer.json")).get_vocab_size() == tok.vocab_size  # a standard file
    with pytest.raises(DataError, match="data.vocab_size=259 is too small"):
        train_bpe(texts, vocab_size=259)


def test_train_bpe_refuses_one_string_for_its_documents():
    """docs/surgery.md calls train_bpe([text], 512); train_bpe(text, 512) read each character as a document and
    returned a BPE without a single merge, with no word."""
    for texts in ("hello world hello world", b"hello world"):
        with pytest.raises(DataError, match=r"texts is one string; pass a list of documents, e.g. train_bpe\(\[text\]"):
            train_bpe(texts, 300)


def test_bpe_training_leaves_the_main_thread_free_for_a_ctrl_c():
    """Python runs signal handlers on the main thread between its own steps, so a Ctrl-C during the tokenizers
    library's training (Rust, up to minutes) waited for it to end. The training runs on a worker thread (where
    the library reads the texts) and the main thread, waiting, is interrupted at once; the worker's errors still
    reach the caller."""
    import _thread
    import threading

    readers, release = [], threading.Event()

    def texts():
        readers.append(threading.current_thread())
        yield "hello hello world"
        release.wait(60)  # the training, stuck

    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            train_bpe(texts(), vocab_size=300)
    finally:
        release.set()
        timer.cancel()
    assert readers and readers[0] is not threading.main_thread()

    def broken():
        yield "text"
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    with pytest.raises(Exception, match="invalid start byte"):
        train_bpe(broken(), vocab_size=300)


def test_gpt2_style_file_loads_as_is(tmp_path):
    path = gpt2_style(tmp_path / "gpt2.json", documents())
    tok = read_tokenizer(path, "data.tokenizer")
    eot = tok.hf.token_to_id("<|endoftext|>")
    assert tok.kind == "file" and eot == tok.vocab_size - 1 == tok.hf.get_vocab_size() - 1
    assert tok.bos_id == tok.eos_id == tok.pad_id == eot  # GPT-2: one token for all three
    sizes = tok.token_bytes()
    assert sizes[eot] == 1
    for s in [documents()[3], ODD, "x<|endoftext|>y"]:
        ids = tok.encode(s)
        assert tok.decode(ids) == s and sizes[ids].sum() == len(s.encode()) and eot not in ids
    assert tok.decode([*tok.encode("ab"), eot]) == "ab"


def test_llama_style_file_counts_metaspace_and_byte_fallback(tmp_path):
    path = llama_style(tmp_path / "llama.json", documents())
    tok = read_tokenizer(path, "data.tokenizer")
    assert tok.kind == "file" and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)  # no pad token: EOS pads
    sizes = tok.token_bytes()
    assert sizes[[0, 1, 2]].tolist() == [0, 0, 1] and sizes[tok.hf.token_to_id("<0xF0>")] == 1
    assert sizes[tok.hf.token_to_id("▁the")] == 4
    for s in [documents()[5], "the lord 🙂 said"]:
        ids = tok.encode(s)
        assert ids[0] != tok.bos_id and tok.decode(ids) == s  # no <s> from the post-processor
        assert sizes[ids].sum() == len(s.encode()) + 1  # + the space the pre-tokenizer puts in front
    assert tok.encode("🙂")[-4:] == [tok.hf.token_to_id(f"<0x{b:02X}>") for b in "🙂".encode()]  # unseen: bytes


@pytest.mark.parametrize("style", [gpt2_style, llama_style])
def test_a_tokenizer_file_trains_a_text_source_and_is_saved_unchanged(tmp_path, style):
    corpus = write_corpus(tmp_path)
    path = style(tmp_path / "tokenizer-src.json", documents())
    cfg = cfg_for(tmp_path, corpus, f"data.tokenizer={path}")
    src = build_data(cfg)
    sets = src.eval_sets()
    assert src.tokenizer.kind == "file" and src.vocab_size == read_tokenizer(path).vocab_size > 260
    assert sets["val"][0]["inputs"].shape == (4, 16) and int(sets["train"][0]["inputs"].max()) < src.vocab_size
    assert 1.5 < src.bytes_per_token(sets["train"]) < 8
    run = cfg.run_dir
    run.mkdir(parents=True)
    src.save(run)
    assert (run / "tokenizer.json").read_bytes() == path.read_bytes()  # byte-identical copy
    (run / "checkpoints" / "2").mkdir(parents=True)  # from now on the run's copy is the tokenizer
    assert load_tokenizer(run).encode("the lord") == src.tokenizer.encode("the lord")
    path.unlink()  # the run no longer needs the user's file
    assert build_data(cfg).tokenizer.encode("the lord") == src.tokenizer.encode("the lord")
    for setting, msg in [("bpe", "uses a file tokenizer but data.tokenizer=bpe"),
                         (str(gpt2_style(tmp_path / "other.json", ["x y z"] * 3)), "different tokenizer")]:
        with pytest.raises(DataError, match=msg):
            build_data(cfg_for(tmp_path, corpus, f"data.tokenizer={setting}")).tokenizer  # noqa: B018


def test_prepare_with_a_tokenizer_file(tmp_path):
    corpus, path = write_corpus(tmp_path), gpt2_style(tmp_path / "gpt2.json", documents())
    cfg = cfg_for(tmp_path, corpus, f"data.tokenizer={path}")
    meta = prepare_corpus(cfg, tmp_path / "prepared", progress=False)
    assert meta["tokenizer"] == "file" and (tmp_path / "prepared" / "tokenizer.json").read_bytes() == path.read_bytes()
    raw, prepared = build_data(cfg), build_data(cfg_for(tmp_path, tmp_path / "prepared", f"data.tokenizer={path}"))
    x, y = raw.eval_sets()["val"], prepared.eval_sets()["val"]
    for a, b in zip(x, y, strict=True):
        np.testing.assert_array_equal(a["targets"], b["targets"])


def one_line_error(fn, *args):
    with pytest.raises(DataError) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_tokenizer_files_raise_one_line_errors(tmp_path):
    corpus = write_corpus(tmp_path)
    missing = tmp_path / "nope" / "tokenizer.json"
    msg = one_line_error(lambda: build_data(cfg_for(tmp_path, corpus, f"data.tokenizer={missing}")).train_iterator(2, 0))
    assert f"data.tokenizer={missing}: no such file" in msg
    old = tmp_path / "run" / "tokenizer.json"
    old.parent.mkdir()
    old.write_text(json.dumps({"kind": "bpe", "vocab_size": 261, "merges": [[3, 4], [5, 6]]}))
    msg = one_line_error(load_tokenizer, old.parent)
    assert str(old) in msg and "older loopformer" in msg and "delete it" in msg
    cases = {"not JSON": "{oops", "not a tokenizer": '{"vocab": {}}',
             "cannot read it": '{"model": {"type": "Nope"}}',
             "no end-of-text token": HF(models.WordLevel({"a": 0, "b": 1}, unk_token="b")).to_str()}
    for expected, text in cases.items():
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        msg = one_line_error(read_tokenizer, bad, "data.tokenizer")
        assert msg.startswith(f"data.tokenizer={bad}") and expected in msg
    ByteTokenizer().save(tmp_path / "bytes.json")
    assert read_tokenizer(tmp_path / "bytes.json").kind == "bytes"


def test_text_a_tokenizer_cannot_encode_is_named_not_dropped():
    """Issue #27.4 and its WordLevel traceback: a BPE without an unknown token drops characters it has no
    token for (refused for prompts, naming them); a WordLevel without [UNK] raises inside tokenizers (one line)."""
    from loopformer.data.tokenizers import HFTokenizer
    from loopformer.errors import PlanError
    from loopformer.inference.generate import prompt_ids

    bpe = HFTokenizer(HF(models.BPE(vocab={"a": 0, "b": 1, "</s>": 2, "ab": 3}, merges=[("a", "b")])), "file", "t.json")
    assert bpe.encode("ab日本a") == [3, 0] and bpe.unencodable("ab 日本a日") == ["日", "本"]
    with pytest.raises(PlanError, match=r"^--prompt: the run's tokenizer has no token for '日', '本' and no unknown "
                                        r"token, so they would be dropped silently"):
        prompt_ids(bpe, "ab日本")
    assert prompt_ids(bpe, "ab a") == [2, 3, 0]  # BOS (its end-of-text token), then the text
    word = HF(models.WordLevel({"hi": 0, "</s>": 1}))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(DataError, match=r"^the tokenizer cannot encode this text \(WordLevel error: Missing \[UNK\] "
                                        r"token from the vocabulary\); give it an unknown token"):
        HFTokenizer(word, "file", "w.json").encode("hi there")
