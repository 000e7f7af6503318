"""bench/routing.py's setting and bookkeeping: the two models differ only in their routes, and the bar."""

import importlib.util
import re
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location("routing_bench", Path(__file__).parents[2] / "bench" / "routing.py")
routing = importlib.util.module_from_spec(spec)
sys.modules["routing_bench"] = routing
spec.loader.exec_module(routing)


def test_the_two_models_differ_only_in_their_routes(tmp_path):
    routed, unrouted, shared = (routing.config(m, 100, tmp_path).to_dict() for m in routing.MODELS)
    assert [(e["route"], e["route_shared"]) for e in routed["data"]["mixture"]] == [(["X"], False), (["Y"], False)]
    assert [(e["route"], e["route_shared"]) for e in shared["data"]["mixture"]] == [(["X"], True), (["Y"], True)]
    assert [e["route"] for e in unrouted["data"]["mixture"]] == [None, None]
    for cfg in (routed, unrouted):
        for e in cfg["data"]["mixture"]:
            e.pop("route")
        cfg["run"].pop("name")
    assert routed == unrouted
    assert routed["model"]["stages"][0]["circuits"][0] | {"name": "Y"} == routed["model"]["stages"][0]["circuits"][1]


def result(matrix):
    """{removed: (parity, maze)} accuracies -> a model's result."""
    return {"ablation": [{"removed": r, "split": s, "accuracy": a} for r, accs in matrix.items()
                         for s, a in zip(("prefix_parity/train", "maze/train"), accs, strict=True)],
            "activity": [{"split": "maze/train", "circuit": "X", "on_rate": 0.5, "mean_write_norm": 1.0,
                          "mean_ablation_delta_loss": 0.01}], "train_wall_s": 10.0}


def test_the_bar():
    routed = result({None: (0.99, 0.95), "X": (0.40, 0.93), "Y": (0.98, 0.30)})
    unrouted = result({None: (1.0, 0.97), "X": (0.5, 0.5), "Y": (0.5, 0.5)})
    v = routing.verdict({"routed": routed, "unrouted": unrouted})
    assert v["remove_X"]["drop"] == 59.0 and round(v["remove_X"]["move"], 6) == 2.0
    assert round(v["remove_Y"]["drop"], 6) == 65.0 and round(v["remove_Y"]["move"], 6) == 1.0
    assert [round(g, 6) for g in v["gap_to_unrouted"].values()] == [-1.0, -2.0] and v["holds"]
    # maze moves 6 points when X is removed: the bar does not hold
    moved = result({None: (0.99, 0.95), "X": (0.40, 0.89), "Y": (0.98, 0.30)})
    assert not routing.verdict({"routed": moved, "unrouted": unrouted})["holds"]
    assert not routing.verdict({"routed": routed})["holds"]  # no unrouted model: not judged as holding
    text = routing.markdown({"models": {"routed": routed, "unrouted": unrouted}, "steps": 5, "verdict": v})
    assert "| nothing | 99.0 | 95.0 |" in re.sub(r" +", " ", text)
    assert "removing X: prefix_parity -59.0 points, maze moves 2.0" in text and "the bar holds" in text
