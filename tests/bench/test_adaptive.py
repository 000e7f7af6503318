"""The adaptive benchmark's bookkeeping: choosing on val and scoring on test, the bar, and Spearman."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location("adaptive_bench", Path(__file__).parents[2] / "bench" / "adaptive.py")
adaptive = importlib.util.module_from_spec(spec)
sys.modules["adaptive_bench"] = adaptive
spec.loader.exec_module(adaptive)


def row(policy, split, acc, flops, seconds=1.0, model="looped", cap=None, rho=0.8, seed=0, difficulty="2x"):
    cap = cap if cap is not None else (int(policy.split(":")[1]) if policy.startswith("fixed:") else 96)
    return {"seed": seed, "difficulty": difficulty, "split": split, "model": model, "policy": policy,
            "family": adaptive.family(policy), "accuracy": acc, "mean_loops": flops, "flops_per_token": flops,
            "seconds_per_token": seconds, "cap": cap, "depth_spearman": rho}


def rows_2x():
    return [
        # fixed counts: 24 and 48 tie on val (the fewer loops wins), 48 is better on test
        row("fixed:24", "val", 0.95, 24.0), row("fixed:24", "test", 0.90, 24.0),
        row("fixed:48", "val", 0.95, 48.0), row("fixed:48", "test", 0.99, 48.0),
        row("fixed:12", "val", 0.50, 12.0), row("fixed:12", "test", 0.55, 12.0),
        # an exit: 0.01 is within a point on val and cheaper than 0.001; 0.1 is cheapest but 10 points short
        row("latent_diff:0.1", "val", 0.85, 5.0), row("latent_diff:0.1", "test", 0.99, 5.0),
        row("latent_diff:0.01", "val", 0.945, 10.0, seconds=0.5), row("latent_diff:0.01", "test", 0.89, 12.0, seconds=0.6),
        row("latent_diff:0.001", "val", 0.95, 20.0), row("latent_diff:0.001", "test", 0.90, 20.0),
        # the router never comes within a point on val: its most accurate setting is reported
        row("router (cap 12)", "val", 0.40, 6.0, model="router"),
        row("router (cap 12)", "test", 0.40, 6.0, model="router"),
        row("router (cap 96)", "val", 0.60, 30.0, model="router"),
        row("router (cap 96)", "test", 0.61, 30.0, model="router"),
    ]


def test_selection_chooses_on_val_and_reports_test():
    (entry,) = adaptive.select(rows_2x())
    assert entry["best_fixed"]["policy"] == "fixed:24"  # val tie: the fewest loops, whatever test says
    assert entry["best_fixed"]["test_accuracy"] == 0.90
    ld = entry["families"]["latent_diff"]
    assert ld["policy"] == "latent_diff:0.01"  # not 0.1, the best on test
    assert ld["test_accuracy"] == 0.89 and ld["accuracy_gap"] == pytest.approx(-0.01)
    assert ld["flops_ratio"] == pytest.approx(12.0 / 24.0) and ld["time_ratio"] == pytest.approx(0.6)
    assert entry["families"]["router"]["policy"] == "router (cap 96)"
    assert set(entry["families"]) == {"latent_diff", "router"}


def test_the_bar_needs_every_condition_on_every_seed():
    (entry,) = adaptive.select(rows_2x())
    assert adaptive.passes(entry["families"]["latent_diff"])  # -1 point, 0.5x FLOPs, 0.6x time, rho 0.8
    assert not adaptive.passes(entry["families"]["router"])
    assert adaptive.bar([entry], seeds=1) == {"holds": True, "passing": {0: ["latent_diff"]}}
    assert not adaptive.bar([entry], seeds=2)["holds"]  # a seed without a row does not pass
    slow = dict(entry["families"]["latent_diff"], time_ratio=0.71)
    low_rho = dict(entry["families"]["latent_diff"], test_spearman=0.59)
    worse = dict(entry["families"]["latent_diff"], accuracy_gap=-0.011)
    assert not any(adaptive.passes(f) for f in (slow, low_rho, worse))


def test_spearman_pools_difficulties_per_policy_and_split():
    rs = [dict(row("latent_diff:0.01", "test", 1.0, 1.0, difficulty=d), instance_loops=np.asarray(loops, float))
          for d, loops in (("train", [1, 2, 3]), ("2x", [4, 5, 9]))]
    rs += [dict(row("fixed:12", "test", 1.0, 12.0, difficulty=d), instance_loops=np.full(3, 12.0))
           for d in ("train", "2x")]
    depths = {(0, "train", "test"): np.asarray([1, 2, 3]), (0, "2x", "test"): np.asarray([6, 4, 5])}
    adaptive.spearman(rs, depths)
    # loops 1 2 3 4 5 9 against depths 1 2 3 6 4 5: rank correlation 1 - 6 * sum(d^2) / (n (n^2 - 1))
    want = 1 - 6 * (0 + 0 + 0 + 4 + 1 + 1) / (6 * 35)
    assert rs[0]["depth_spearman"] == pytest.approx(want) and rs[1]["depth_spearman"] == pytest.approx(want)
    assert rs[2]["depth_spearman"] is None  # a fixed count does not vary
    assert all("instance_loops" not in r for r in rs)


def test_a_run_into_an_out_holding_rows_it_does_not_score_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """#27 pass 26: --models looped (the rescoring --models is for) into the --out of a full run replaced its
    adaptive.json, and with it the halting and router rows, with no word."""
    import json

    rows = [{"seed": s, "model": m, "policy": "p"} for s in (0, 1) for m in ("looped", "halting", "router")]
    (tmp_path / "adaptive.json").write_text(json.dumps({"tasks": {"prefix_parity": {"rows": rows}}}))
    monkeypatch.setattr(adaptive, "run_task", lambda *a, **k: pytest.fail("trained before the refusal"))
    argv = ["--tasks", "prefix_parity", "--models", "looped,router", "--seeds", "1", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["adaptive.py", *argv])
    with pytest.raises(SystemExit) as info:
        adaptive.main()
    assert info.value.code == 2 and (f"error: --out {tmp_path} holds an adaptive.json with rows of halting (seeds 0, 1) "
                                     f"of prefix_parity; looped (seed 1) of prefix_parity; router (seed 1) of "
                                     f"prefix_parity, which this run (--models looped,router, seeds 0..0) does not "
                                     f"score") in capsys.readouterr().err
    record = tmp_path / "adaptive.json"
    # a run that scores every row again, of other tasks only, or beside a damaged record replaces it, as before
    assert adaptive.rows_replaced(record, ["prefix_parity"], adaptive.MODELS, 2) is None
    assert adaptive.rows_replaced(record, ["maze3"], ("looped",), 1) is None
    record.write_text("{")
    assert adaptive.rows_replaced(record, ["prefix_parity"], ("looped",), 1) is None
