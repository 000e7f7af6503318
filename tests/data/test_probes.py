"""Probe files: parsing (one line per bad probe), batching (mask on the answer's targets only)."""

import numpy as np
import pytest

from loopformer.data.probes import probe_batches, read_probes
from loopformer.errors import DataError


@pytest.mark.parametrize("text,message", [
    ('{"prompt": "a", "answer": "b"}\nnot json\n', r"p.jsonl:2: not a JSON object"),
    ('{"prompt": "a", "answer": ""}\n', r"p.jsonl:1: a probe is .* with a non-empty answer"),
    ('{"prompt": "a"}\n', r"p.jsonl:1: a probe is"),
    ("\n\n", r"the file holds no probes"),
    ('{"prompt": "a", "answer": "b"}\n' + "[" * 100000 + "\n", r"p.jsonl:2: not a JSON object"),  # #27 pass 24
])
def test_bad_probe_files_are_one_line(tmp_path, text, message):
    (tmp_path / "p.jsonl").write_text(text)
    with pytest.raises(DataError, match=message):
        read_probes(tmp_path / "p.jsonl")


def test_missing_files_and_assets(tmp_path):
    with pytest.raises(DataError, match=r"--probe .*nope.jsonl does not exist \(a JSONL file"):
        read_probes(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"--probe asset:nope.jsonl does not exist"):
        read_probes("asset:nope.jsonl")


def test_a_folder_or_a_device_is_named_as_such(tmp_path):  # #27 pass 8: both said "no such file"
    with pytest.raises(DataError, match=r"--probe .* is a folder \(a JSONL file"):
        read_probes(tmp_path)
    with pytest.raises(DataError, match=r"--probe /dev/null is a pipe or a device"):
        read_probes("/dev/null")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(DataError, match=r"--probe .*loop is a symlink that leads nowhere \(or in a loop\)"):
        read_probes(tmp_path / "loop")


def test_batches_mask_exactly_the_answer():
    enc = lambda s: [ord(c) for c in s]  # noqa: E731
    (batch,) = probe_batches([("ab", "cd"), ("xyz", "w")], lambda s: [1, *enc(s)], enc, batch_size=2)
    assert batch["inputs"].shape == (2, 16)
    np.testing.assert_array_equal(batch["inputs"][0, :4], [1, 97, 98, 99])
    np.testing.assert_array_equal(batch["targets"][0, :4], [97, 98, 99, 100])
    np.testing.assert_array_equal(batch["mask"][0, :5], [0, 0, 1, 1, 0])  # targets c, d
    np.testing.assert_array_equal(batch["mask"][1, :5], [0, 0, 0, 1, 0])  # target w
    assert batch["segment_ids"].sum() == 4 + 4


def test_a_probe_the_tokenizer_cannot_encode_is_named(tmp_path):
    """#27 pass 20: a probe whose prompt encodes to no tokens (an imported tokenizer adds no BOS) was refused as
    "--prompt encodes to no tokens", a flag not given; an answer's characters the tokenizer has no token for (and
    no unknown token) were dropped, and a shorter answer scored, with no word."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer as HF
    from tokenizers import models

    from loopformer.cli.common import probe_sets
    from loopformer.data.tokenizers import HFTokenizer

    bpe = HFTokenizer(HF(models.BPE(vocab={"a": 0, "b": 1, "</s>": 2, "ab": 3}, merges=[("a", "b")])), "file", "t.json")
    run = SimpleNamespace(info=SimpleNamespace(data=bpe, path=tmp_path, cfg=SimpleNamespace(
        data=SimpleNamespace(prompt_format="tokenizer"))), check_fits=lambda sets: sets)
    probe = tmp_path / "p.jsonl"
    args = SimpleNamespace(probe=str(probe), split=None, examples=10)
    probe.write_text('{"prompt": "a", "answer": "ab"}\n')
    assert probe_sets(args, run)["probe"][0]["mask"].sum() == 1  # "ab" is one token
    for line, message in (('{"prompt": "", "answer": "b"}', r"the prompt '' encodes to no tokens; give a non-empty"),
                          ('{"prompt": "a", "answer": "b日"}', r"the answer 'b日': the run's tokenizer has no token for "
                                                              r"'日' and no unknown token, so they would be dropped")):
        probe.write_text(line + "\n")
        with pytest.raises(DataError, match=rf"^--probe {probe}: {message}"):
            probe_sets(args, run)


def test_a_utf8_byte_order_mark_is_read_past(tmp_path):
    """#27 pass 22: a probe file saved with a BOM (Notepad's UTF-8) was refused as "1: not a JSON object"."""
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "answer": "b"}\r\n{"prompt": "c", "answer": "d"}\r\n')
    assert read_probes(p) == [("a", "b"), ("c", "d")]


def test_a_key_given_twice_is_one_line(tmp_path):
    """#27 pass 22: {"prompt": "a", "answer": "b", "answer": "c"} was scored against "c", with no word."""
    p = tmp_path / "twice.jsonl"
    p.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a", "answer": "b", "answer": "c"}\n')
    with pytest.raises(DataError, match=r"twice.jsonl:2: key 'answer' is given twice; keep one$"):
        read_probes(p)
