import numpy as np
import pytest

from loopformer.data import pipeline
from loopformer.data.pipeline import eval_batches, example_at, split_seed, train_dataset, train_iterator
from loopformer.data.tasks import make_task
from loopformer.errors import DataError

TASK = make_task("pointer_chase", num_nodes=8, num_symbols=10)
DIFF = (1, 5)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def test_split_seed_deterministic():
    """The same (seed, split, index) draws the same numbers in every process (the split name is hashed
    with crc32, not Python's per-process hash), so examples are fixed numbers, pinned here; any change
    of seed, split or index draws others."""
    keys = [(1, "train", 5), (2, "train", 5), (1, "ood", 5), (1, "train", 6)]
    assert [int(split_seed(*key).integers(1 << 62)) for key in keys] == [
        1023280845930544281, 534097144149071601, 3048986941459727224, 2531562382192089279]


def test_train_batches_follow_the_global_stream():
    batch = next(train_iterator(TASK, DIFF, 4, seed=7))
    seq_len = TASK.seq_len(DIFF[1])
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "inputs": ((4, seq_len), np.int32),
        "targets": ((4, seq_len), np.int32),
        "mask": ((4, seq_len), np.float32),
        "segment_ids": ((4, seq_len), np.int32),
        "difficulty": ((4, seq_len), np.int32),
    }
    for i in range(4):
        expected = example_at(TASK, 7, "train", i, DIFF, seq_len)
        assert _equal({k: v[i] for k, v in batch.items()}, expected)
    assert isinstance(train_dataset(TASK, DIFF, 4, seed=7), pipeline.grain.IterDataset)


def test_train_deterministic_and_seeded():
    a, b = _take(train_iterator(TASK, DIFF, 4, 0), 3), _take(train_iterator(TASK, DIFF, 4, 0), 3)
    c = _take(train_iterator(TASK, DIFF, 4, 1), 3)
    assert all(_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not _equal(a[0], c[0])


def test_resume_from_state():
    it = train_iterator(TASK, DIFF, 4, 0)
    _take(it, 3)
    state = it.get_state()
    after = _take(it, 2)
    fresh = train_iterator(TASK, DIFF, 4, 0)
    fresh.set_state(state)
    assert all(_equal(x, y) for x, y in zip(after, _take(fresh, 2), strict=True))


def test_shards_are_disjoint_slices_of_the_stream():
    seq_len = TASK.seq_len(DIFF[1])
    for k in range(2):
        batches = _take(train_iterator(TASK, DIFF, 3, 0, shard_index=k, shard_count=2), 2)
        rows = [{key: b[key][i] for key in b} for b in batches for i in range(3)]
        for j, row in enumerate(rows):  # shard k reads global examples k, k+2, k+4, ...
            assert _equal(row, example_at(TASK, 0, "train", k + 2 * j, DIFF, seq_len))


def test_orbax_checkpoint_roundtrip(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    it = train_iterator(TASK, DIFF, 2, 0)
    _take(it, 3)
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(3, args=ocp.args.Composite(data=pipeline.CheckpointSave(it)))
        mngr.wait_until_finished()
        after = _take(it, 2)
        fresh = train_iterator(TASK, DIFF, 2, 0)
        restored = mngr.restore(3, args=ocp.args.Composite(data=pipeline.CheckpointRestore(fresh)))
    assert restored.data is fresh
    assert all(_equal(x, y) for x, y in zip(after, _take(fresh, 2), strict=True))


def test_eval_batches_pad_and_repeat():
    batches = eval_batches(TASK, "ood", (2, 6), num_examples=10, batch_size=4, seed=0)
    assert len(batches) == 3 and all(b["inputs"].shape == (4, TASK.seq_len(6)) for b in batches)
    rows = np.concatenate([b["mask"] for b in batches]).sum(axis=1)
    assert (rows[:10] == 1).all() and (rows[10:] == 0).all()  # 2 padding rows count for nothing
    last = batches[-1]
    assert (last["inputs"][2:] == 0).all() and (last["targets"][2:] == 0).all()
    again = eval_batches(TASK, "ood", (2, 6), num_examples=10, batch_size=4, seed=0)
    assert all(_equal(x, y) for x, y in zip(batches, again, strict=True))
    other = eval_batches(TASK, "iid", (2, 6), num_examples=10, batch_size=4, seed=0)
    assert not _equal(batches[0], other[0])
    exact = eval_batches(TASK, "ood", (2, 6), num_examples=8, batch_size=4, seed=0)
    assert len(exact) == 2 and all(b["mask"].sum(axis=1).all() for b in exact)


def test_eval_split_named_train_is_not_the_train_stream():
    ev = eval_batches(TASK, "train", DIFF, num_examples=4, batch_size=4, seed=0)[0]
    assert not _equal(ev, next(train_iterator(TASK, DIFF, 4, 0)))


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"shard_index": 2, "shard_count": 2}, "shard_index"),
        ({"shard_count": 0}, "shard_count"),
        ({"seed": -1}, "seed"),
        ({"difficulty": (1, 8)}, "num_nodes"),
        ({"difficulty": (3,)}, "difficulty"),
    ],
)
def test_bad_pipeline_args(kwargs, needle):
    args = {"difficulty": DIFF, "batch_size": 4, "seed": 0} | kwargs
    with pytest.raises(DataError, match=needle):
        train_dataset(TASK, **args)


def test_bad_eval_args():
    with pytest.raises(DataError, match="num_examples"):
        eval_batches(TASK, "ood", DIFF, num_examples=0, batch_size=4, seed=0)
    with pytest.raises(DataError, match="split"):
        eval_batches(TASK, "", DIFF, num_examples=4, batch_size=4, seed=0)
