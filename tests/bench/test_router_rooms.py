"""bench/router_rooms.py: each room's kind comes from the maze's own passages, and the tally counts wrong answers and
stop rounds per kind (checked against a count by hand over generated mazes)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np

from loopformer.data.tasks import make_task

spec = importlib.util.spec_from_file_location("router_rooms_bench", Path(__file__).parents[2] / "bench" / "router_rooms.py")
rooms = importlib.util.module_from_spec(spec)
sys.modules["router_rooms_bench"] = rooms
spec.loader.exec_module(rooms)


def test_room_kinds_and_tally_follow_the_mazes_passages():
    task = make_task("maze", rows=3, entrance=True)
    rng = np.random.default_rng(0)
    batch = [task.example(rng, 6, 4 * 8) for _ in range(5)]
    inputs = np.stack([b["inputs"] for b in batch])
    targets = np.stack([b["targets"] for b in batch])
    kinds = [rooms.room_kinds(task, x) for x in inputs]
    for x, y, k in zip(inputs, targets, kinds, strict=True):
        assert sorted(k) == [i for i in range(4 * 6) if i % 4 != 3]  # every room, no SEP
        for pos, kind in k.items():  # unreachable exactly where the answer is NO
            assert (kind == "unreachable") == (y[pos] == task.NO)
        dist = task.distances(x)
        far = max(dist.values())
        near = [pos for pos, kind in k.items() if kind == "near"]
        assert near and all(dist[(pos % 4, pos // 4)] <= far / 2 for pos in near)
    preds = targets.copy()
    stops = np.arange(inputs.size, dtype=float).reshape(inputs.shape) % 7
    first = next(pos for pos, kind in kinds[0].items() if kind == "unreachable")
    preds[0, first] = task.YES  # one wrong room, in the first maze
    got = rooms.tally(task, inputs, targets, preds, stops)
    assert (got["mazes"], got["right"]) == (5, 4)
    for kind in rooms.KINDS:
        mine = [(b, pos) for b, k in enumerate(kinds) for pos, kk in k.items() if kk == kind]
        assert got[kind]["rooms"] == len(mine)
        assert got[kind]["wrong"] == (kind == "unreachable")
        assert got[kind]["stops"] == sum(stops[b, pos] for b, pos in mine)
