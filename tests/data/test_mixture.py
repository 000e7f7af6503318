"""Multi-task data (`loopformer.data.mixture`): one token layout, mixing by weight that is a pure function
of (seed, index), resumable and shardable like a single task's stream, NAME/SPLIT eval splits."""

import numpy as np
import pytest

from loopformer.config import load_config
from loopformer.data.mixture import MixtureSource
from loopformer.data.sources import TaskSource, build_data
from loopformer.errors import ConfigError, DataError

PARITY = "{task: prefix_parity, train_difficulty: [1, 8], eval_splits: {train: [1, 8], 2x: [16, 16]}"
MAZE = "{task: maze, task_args: {rows: 3, entrance: true}, train_difficulty: [1, 4], eval_splits: {train: [1, 4]}"


def mixture(*entries, extra=()):
    return load_config(None, ["model.causal=false", "data.task=mixture", f"data.mixture=[{', '.join(entries)}]",
                              "data.eval_examples=10", "data.eval_batch_size=4", *extra])


def test_layout_offsets_lengths_and_splits():
    src = build_data(mixture(PARITY + ", weight: 3}", MAZE + "}"))
    assert isinstance(src, MixtureSource)
    assert src.offsets == [0, 5] and src.vocab_size == 5 + 12
    assert src.seq_len == max(9, 16)  # parity 1 + 8 bits; 3-row maze of 4 columns
    assert src.split_names == ["prefix_parity/train", "prefix_parity/2x", "maze/train"]
    batch = next(src.train_iterator(64, 0))
    assert batch["inputs"].shape == (64, 16) and batch["task"].shape == (64,)
    for k, (lo, hi) in enumerate([(0, 5), (5, 17)]):
        rows = batch["task"] == k
        real = batch["segment_ids"][rows] > 0
        assert np.all((batch["inputs"][rows][real] >= lo) & (batch["inputs"][rows][real] < hi))
        assert np.all(batch["inputs"][rows][~real] == 0) and np.all(batch["mask"][rows][~real] == 0)


def test_one_entry_is_the_single_task_stream():
    """Entry 0 has offset 0, so a mixture of one task draws today's examples at every index."""
    mix = build_data(mixture(PARITY + "}"))
    single = TaskSource(load_config(None, ["data.task=prefix_parity", "data.train_difficulty=[1, 8]",
                                           "data.eval_splits={train: [1, 8]}"]))
    a, b = next(mix.train_iterator(16, 3)), next(single.train_iterator(16, 3))
    assert set(a) == set(b) | {"task"} and np.all(a["task"] == 0)
    for key in b:
        np.testing.assert_array_equal(a[key], b[key])
    ev_mix = mix.eval_sets(["prefix_parity/train"])["prefix_parity/train"]
    ev_single = single.eval_sets(["train"], 10, 4)["train"]
    for x, y in zip(ev_mix, ev_single, strict=True):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(mix.untag(x)["targets"], y["targets"])


def test_mixing_follows_the_weights_and_the_seed():
    src = build_data(mixture(PARITY + ", weight: 3}", MAZE + ", weight: 1}"))
    tasks = np.array([src.entry_at(0, i) for i in range(4000)])
    assert abs(tasks.mean() - 0.25) < 0.03  # maze has 1 / (3 + 1) of the examples
    assert [src.entry_at(0, i) for i in range(50)] == tasks[:50].tolist()  # a pure function of (seed, index)
    assert [src.entry_at(1, i) for i in range(50)] != tasks[:50].tolist()
    batches = [next(src.train_iterator(32, 0))["task"] for _ in range(2)]
    np.testing.assert_array_equal(batches[0], batches[1])  # two fresh iterators: the same first batch


def test_huge_weights_keep_their_shares():
    """Two weights of 1e308 summed to inf: every share was nan (numpy warned) and the mixture was not the one asked."""
    src = build_data(mixture(PARITY + ", weight: 1e308}", MAZE + ", weight: 1e308}"))
    tasks = np.array([src.entry_at(0, i) for i in range(2000)])
    assert abs(tasks.mean() - 0.5) < 0.05
    assert "prefix_parity (prefix_parity, 50% of examples" in src.describe()  # #27 pass 20: the log said "nan%"


def test_resume_and_shards():
    src = build_data(mixture(PARITY + "}", MAZE + "}"))
    it = src.train_iterator(8, 5)
    next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    again = src.train_iterator(8, 5)
    again.set_state(state)
    for want in expected:
        got = next(again)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    whole = next(src.train_iterator(8, 5))
    half = [next(src.train_iterator(4, 5, shard_index=i, shard_count=2)) for i in range(2)]
    for i in range(2):
        np.testing.assert_array_equal(half[i]["inputs"], whole["inputs"][i::2])


def test_a_text_entry_next_to_a_task():
    src = build_data(mixture(PARITY + "}", "{task: text, name: kjv, paths: ['asset:kjv_genesis_exodus.txt']}",
                             extra=["model.causal=true", "data.seq_len=24"]))
    assert src.split_names[-2:] == ["kjv/val", "kjv/train"] and src.seq_len == 24
    assert src.vocab_size == 5 + src.entries[1].text.vocab_size
    batch = next(src.train_iterator(16, 0))
    assert {"positions", "task"} <= set(batch) and batch["inputs"].shape == (16, 24)
    text_rows = batch["task"] == 1
    assert text_rows.any() and np.all(batch["inputs"][text_rows] >= 5)
    val = src.eval_sets(["kjv/val"], 3, 4)["kjv/val"]
    assert src.bytes_per_token(val) == pytest.approx(src.entries[1].text.bytes_per_token(src.entries[1].text.eval_sets(
        ["val"], 3, 4)["val"]))
    assert src.bytes_per_token(src.eval_sets(["prefix_parity/train"], 3, 4)["prefix_parity/train"]) is None


@pytest.mark.parametrize("entries, error, message", [
    ([PARITY + "}", "{task: addition}"], ConfigError,
     r"model.causal=false needs labels at input positions in every mixture entry, but data.mixture.addition"),
    ([PARITY + "}", "{task: mazes}"], DataError, r"data.mixture.mazes.task='mazes' is not a task"),
    ([PARITY + "}", "{task: maze, task_args: {colour: 1}}"], DataError, r"data.mixture.maze: data.task_args.colour"),
    ([PARITY + "}", "{task: text, paths: ['asset:kjv_genesis_exodus.txt']}"], ConfigError,
     r"data.mixture.text is text"),
    (["{task: maze, task_args: {rows: 2}, train_difficulty: [3, 1]}"], ConfigError,
     r"data.mixture.maze.train_difficulty: expected \[lo, hi\] with 1 <= lo <= hi, got \[3, 1\]"),
])
def test_bad_entries(entries, error, message):
    with pytest.raises(error, match=message):
        build_data(mixture(*entries))
