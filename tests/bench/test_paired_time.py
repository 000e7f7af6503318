"""bench/paired_time.py: each selection timed against its best fixed count in alternation, the record's numbers
checked, and the paired bar beside the recorded one."""

import importlib.util
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("paired_time_bench", Path(__file__).parents[2] / "bench" / "paired_time.py")
paired_time = importlib.util.module_from_spec(spec)
sys.modules["paired_time_bench"] = paired_time
spec.loader.exec_module(paired_time)
A = paired_time.A


def test_rounds_alternate_their_order_and_the_ratio_is_of_the_fastest_rounds():
    calls = []
    passes = {n: (lambda n=n: calls.append(n) or {"n": n}) for n in ("fixed", "router", "kl")}
    out = A.rounds_of(passes, 3)
    assert calls == ["fixed", "router", "kl", "kl", "router", "fixed", "fixed", "router", "kl"]
    assert out["kl"] == [{"n": "kl"}] * 3
    assert paired_time.paired_ratio([3.0, 2.0, 2.5], [4.0, 5.0, 4.5]) == pytest.approx(0.5)


def test_the_policies_are_adaptive_py_s_own():
    cfg = A.seed_configs("maze3", Path("/nonexistent"), 256, 0, 10, ("looped", "router"), "config")
    assert A.policy_spec("maze3", "router", cfg["router"], "router (cap 24)")[1] == {"X": 24}
    fine = A.policy_spec("maze3", "looped", cfg["looped"], "context_diff/fine:0.01")
    assert fine[1] == {"X": 96} and fine[4] == A.FINE_SHARES
    assert A.policy_spec("maze3", "looped", cfg["looped"], "fixed:36")[1:] == ({"X": 36}, None, None)
    with pytest.raises(ValueError, match="'fixed:1000' \\(looped\\) is not one adaptive.py scores"):
        A.policy_spec("maze3", "looped", cfg["looped"], "fixed:1000")
    # a record of both routers (--models ...,router_config): the second one's runs and policies
    cfgs = A.seed_configs("maze3", Path("/nonexistent"), 256, 0, 10, ("looped", "router", "router_config"))
    assert cfgs["router_config"].run.name == "maze3-router-seed0"
    assert A.policy_spec("maze3", "router_config", cfgs["router_config"], "router, config loops (cap 48)")[1] == {
        "X": 48}


def record_rows():
    def row(policy, split, acc, flops, seconds, model="looped"):
        return {"seed": 0, "difficulty": "2x", "split": split, "model": model, "policy": policy,
                "family": A.family(policy), "accuracy": acc, "mean_loops": flops, "flops_per_token": flops,
                "seconds_per_token": seconds, "cap": 96, "depth_spearman": 0.8}
    return [row("fixed:36", "val", 0.99, 36.0, 1.0), row("fixed:36", "test", 0.97, 36.0, 1.0),
            row("router (cap 24)", "val", 0.99, 19.0, 0.71, "router"),
            row("router (cap 24)", "test", 0.98, 19.0, 0.71, "router")]


def fake_runs(monkeypatch, seconds: dict, accuracy: dict | None = None):
    """adaptive.py's runs and passes, faked: each policy's pass gives its record's accuracy (or ``accuracy``'s) and
    FLOPs, and its next time from ``seconds`` (policy cap -> times)."""
    flops = {36: 36.0, 24: 19.0}
    acc = {36: 0.97, 24: 0.98} | (accuracy or {})
    left = {k: list(v) for k, v in seconds.items()}

    def measure(ev, params, batches, cfg, vocab, loops, exits, rules, compact, shares, timings):
        assert timings == 1 and batches == ["2x/test"]
        n = loops["X"]
        return {"accuracy": acc[n], "flops_per_token": flops[n], "seconds_per_token": left[n].pop(0)}

    monkeypatch.setattr(A, "measure", measure)
    monkeypatch.setattr(A, "build_data", lambda cfg: type("Data", (), {"task": "maze3"})())
    monkeypatch.setattr(paired_time, "restore_params", lambda cfg, data: (type("M", (), {"vocab_size": 9})(), {}, 10))
    monkeypatch.setattr(A, "evaluator_for", lambda model: None)
    monkeypatch.setattr(paired_time, "eval_batches", lambda task, split, rng, n, batch, seed: [split])
    monkeypatch.setattr(paired_time.RunDir, "trained_to", lambda self: 10)


def test_a_record_is_retimed_in_alternation_and_judged_by_both_ratios(monkeypatch):
    rows = record_rows()
    result = {"rows": rows, "selected": A.select(rows), "steps": 10, "models": ["looped", "router"],
              "variant_loops": []}
    # the recorded ratio 0.71 fails the bar; in alternation the router's fastest round is 0.6 of fixed:36's
    fake_runs(monkeypatch, {36: [1.0, 1.1, 1.2], 24: [0.7, 0.6, 0.9]})
    out = paired_time.retime_task("maze3", result, Path("/nonexistent"), True, 256, 3)
    (r,) = out["rows"]
    assert (r["family"], r["fixed"], r["seconds"], r["fixed_seconds"]) == ("router", "fixed:36", [0.7, 0.6, 0.9],
                                                                           [1.0, 1.1, 1.2])
    assert r["time_ratio"] == pytest.approx(0.6) and r["recorded_time_ratio"] == pytest.approx(0.71)
    assert (r["passes_paired"], r["passes_recorded"]) == (True, False)
    assert out["bar"] == {"holds": True, "passing": {0: ["router"]}}
    assert out["recorded_bar"] == {"holds": False, "passing": {0: []}}


def test_runs_that_do_not_give_the_record_s_numbers_are_refused(monkeypatch):
    rows = record_rows()
    result = {"rows": rows, "selected": A.select(rows), "steps": 10, "models": ["looped", "router"],
              "variant_loops": []}
    fake_runs(monkeypatch, {36: [1.0], 24: [0.7]}, accuracy={24: 0.5})
    with pytest.raises(ValueError, match=r"^maze3 seed 0 router \(cap 24\): accuracy 0.5 where the record has 0.98; "
                                         r"the runs beside the record are not the ones it scored, or --examples is "
                                         r"not the count it scored \(adaptive.py's --examples, default 256\)$"):
        paired_time.retime_task("maze3", result, Path("/nonexistent"), True, 256, 1)
    fake_runs(monkeypatch, {36: [1.0], 24: [0.7]})
    monkeypatch.setattr(paired_time.RunDir, "trained_to", lambda self: None)
    with pytest.raises(ValueError, match=r"^maze3 seed 0: the run /nonexistent/maze3-looped is missing, where the "
                                         r"record scored step 10; give the --out the record was written in$"):
        paired_time.retime_task("maze3", result, Path("/nonexistent"), True, 256, 1)


def test_a_folder_without_a_record_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["paired_time.py", "--records", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as info:
        paired_time.main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].endswith(f"--records {tmp_path}: its adaptive.json does not exist; give an "
                                         f"adaptive.py --out")


def test_a_record_whose_runs_are_missing_is_refused_before_any_timing(monkeypatch, capsys, tmp_path):
    """Every record's runs are checked first: a later record without its runs was refused after the earlier ones
    had been timed (minutes each)."""
    import json

    rows = record_rows()
    result = {"rows": rows, "selected": A.select(rows), "steps": 10, "models": ["looped", "router"],
              "variant_loops": [], "cap": 96, "train_loops": 12}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adaptive.json").write_text(json.dumps({"tasks": {"maze3": result}, "compact": "on"}))
    monkeypatch.setattr(paired_time.RunDir, "trained_to", lambda self: 10 if "/a/" in str(self.path) else None)
    monkeypatch.setattr(paired_time, "retime_task", lambda *a, **k: pytest.fail("timed before the refusal"))
    monkeypatch.setattr(sys, "argv", ["paired_time.py", "--records", str(tmp_path / "a"), str(tmp_path / "b"),
                                      "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as info:
        paired_time.main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].endswith(f"--records {tmp_path / 'b'}: maze3 seed 0: the run {tmp_path / 'b'}/"
                                         f"maze3-looped is missing, where the record scored step 10; give the --out "
                                         f"the record was written in")


def test_the_table_shows_both_ratios_and_both_verdicts(monkeypatch):
    rows = record_rows()
    result = {"rows": rows, "selected": A.select(rows), "steps": 10, "models": ["looped", "router"],
              "variant_loops": []}
    fake_runs(monkeypatch, {36: [1.0, 1.1], 24: [0.7, 0.6]})
    doc = {"rec": {"tasks": {"maze3": paired_time.retime_task("maze3", result, Path("/nonexistent"), True, 256, 2)}}}
    text = paired_time.markdown(doc)
    row = next(line for line in text.splitlines() if "router (cap 24)" in line)
    assert [c.strip() for c in row.strip("|").split("|")] == ["rec", "maze3", "0", "router: router (cap 24)", "fixed:36",
                                                            "600000.0 (1000000.0)", "0.600 (0.710)", "0.53", "0.80",
                                                            "yes (no)"]
    assert text.endswith("- rec maze3: paired seed 0: router (recorded seed 0: none)")


@pytest.mark.parametrize(("edit", "says"), [
    (lambda t: t.pop("selected"), "maze3: its selected entries are not the ones its rows give"),
    (lambda t: t.update(selected="x"), "maze3: its selected entries are not the ones its rows give"),
    (lambda t: t.pop("steps"), "maze3: it has steps None, where a run of adaptive.py writes a whole number >= 1"),
    (lambda t: t.pop("models"), "maze3: it has models None, where a run of adaptive.py writes a list of looped, "
                                "halting, router, router_config that includes looped (a record written before "
                                "adaptive.py kept them)"),
    (lambda t: t.update(rows=[r for r in t["rows"] if r["split"] == "val"]), "maze3: its rows give no selection"),
    ("task", "it holds task 'nosuch', not one of adaptive.py's"),
])
def test_a_damaged_or_foreign_record_is_one_line(monkeypatch, capsys, tmp_path, edit, says):
    """A record without its selection, steps or models, or of a task adaptive.py does not score, was a KeyError or
    TypeError traceback (read_record checks the rows alone; #27 pass 34)."""
    import json

    rows = record_rows()
    result = {"rows": rows, "selected": A.select(rows), "steps": 10, "models": ["looped", "router"],
              "variant_loops": [], "cap": 96, "train_loops": 12}
    name = "maze3"
    if edit == "task":
        name = "nosuch"
    else:
        edit(result)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "adaptive.json").write_text(json.dumps({"tasks": {name: result}, "compact": "on"}))
    monkeypatch.setattr(sys, "argv", ["paired_time.py", "--records", str(tmp_path / "r"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as info:
        paired_time.main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert f"--records {tmp_path / 'r'}: its adaptive.json is not a result of adaptive.py (ValueError: {says}" in err


def test_a_record_with_adaptive_py_s_own_paired_timing_is_read():
    """A record of adaptive.py since its selections are timed in alternation: its selection reads its `paired`
    ratios, and the check compares it with the one its rows and those timings give (it was refused as edited)."""
    rows = record_rows()
    paired = {"0": {"router": {"policy": "router (cap 24)", "fixed": "fixed:36", "seconds": [0.5], "fixed_seconds": [1.0],
                               "time_ratio": 0.5}}}
    result = {"rows": rows, "selected": A.select(rows, paired), "steps": 10, "models": ["looped", "router"],
              "variant_loops": [], "paired": paired}
    assert result["selected"][0]["families"]["router"]["time_ratio"] == 0.5
    paired_time.check_record({"tasks": {"maze3": result}})
    with pytest.raises(ValueError, match="its selected entries are not the ones its rows give"):
        paired_time.check_record({"tasks": {"maze3": dict(result, paired={})}})
