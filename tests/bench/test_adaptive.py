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


def refused(monkeypatch, capsys, *argv: str) -> str:
    """`adaptive.py ARGV`'s error output, after checking that it exits 2 with no traceback."""
    monkeypatch.setattr(sys, "argv", ["adaptive.py", *argv])
    with pytest.raises(SystemExit) as info:
        adaptive.main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err, (argv, err)
    return err


def test_a_run_into_an_out_holding_rows_it_does_not_score_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """#27 pass 26: --models looped (the rescoring --models is for) into the --out of a full run replaced its
    adaptive.json, and with it the halting and router rows, with no word."""
    import json

    rows = [{"seed": s, "model": m, "policy": "p"} for s in (0, 1) for m in ("looped", "halting", "router")]
    (tmp_path / "adaptive.json").write_text(json.dumps({"tasks": {"prefix_parity": {"rows": rows}}}))
    monkeypatch.setattr(adaptive, "run_task", lambda *a, **k: pytest.fail("trained before the refusal"))
    argv = ["--tasks", "prefix_parity", "--models", "looped,router", "--seeds", "1", "--out", str(tmp_path)]
    assert (f"error: --out {tmp_path} holds an adaptive.json with rows of halting (seeds 0, 1) of prefix_parity; "
            f"looped (seed 1) of prefix_parity; router (seed 1) of prefix_parity, which this run (--models "
            f"looped,router, seeds 0..0) does not score") in refused(monkeypatch, capsys, *argv)
    record = tmp_path / "adaptive.json"
    # a run that scores every row again, of other tasks only, or beside a damaged record replaces it, as before
    assert adaptive.rows_replaced(record, ["prefix_parity"], adaptive.MODELS, 2) is None
    assert adaptive.rows_replaced(record, ["maze3"], ("looped",), 1) is None
    record.write_text("{")
    assert adaptive.rows_replaced(record, ["prefix_parity"], ("looped",), 1) is None


def record(seeds, compact="on", cap=96, policies=None, depth_mean=10.0, depth_max=20, env="A"):
    """An adaptive.json document over ``seeds``, as `run_task` and `main` write it (2x rows only)."""
    rows = [dict(r, seed=s) for s in seeds for r in rows_2x()
            if policies is None or r["policy"] in policies]
    result = {"rows": rows, "selected": adaptive.select(rows), "cap": cap, "train_loops": 12, "variant_loops": [],
              "models": ["looped", "router"], "steps": 1500, "seeds": len(seeds), "first_seed": min(seeds),
              "wall_s": 10.0, "depth": {"2x/test": {"mean": depth_mean, "max": depth_max}}}
    result["bar"] = adaptive.bar(result["selected"], len(seeds))
    return {"tasks": {"maze3": result}, "compact": compact, "wall_s": 10.0, "environment": {"jax": env}}


def test_merge_joins_disjoint_seeds_and_judges_the_bar_over_all_of_them():
    """A run split over processes (--first-seed) joins into the record one process would have written."""
    a, b = record([0, 1], depth_mean=10.0, depth_max=20), record([2], depth_mean=13.0, depth_max=25, env="B")
    doc = adaptive.merge({"A": a, "B": b})
    t = doc["tasks"]["maze3"]
    assert [r["seed"] for r in t["rows"]] == [0] * 16 + [1] * 16 + [2] * 16
    assert t["seeds"] == 3 and t["first_seed"] == 0 and t["wall_s"] == 20.0 and doc["wall_s"] == 20.0
    assert t["bar"] == {"holds": True, "passing": {0: ["latent_diff"], 1: ["latent_diff"], 2: ["latent_diff"]}}
    assert t["depth"]["2x/test"] == {"mean": pytest.approx((2 * 10.0 + 13.0) / 3), "max": 25}
    assert doc["environment"] == {"A": {"jax": "A"}, "B": {"jax": "B"}} and doc["merged_from"] == ["A", "B"]
    assert doc["compact"] == "on"
    # one seed that fails takes the bar with it
    c = record([2])
    for r in c["tasks"]["maze3"]["rows"]:
        if r["policy"] == "latent_diff:0.01" and r["split"] == "test":
            r["seconds_per_token"] = 0.8  # 0.8x the best fixed count's time: over 0.7x
    assert adaptive.merge({"A": a, "C": c})["tasks"]["maze3"]["bar"] == {
        "holds": False, "passing": {0: ["latent_diff"], 1: ["latent_diff"], 2: []}}


@pytest.mark.parametrize("b, message", [
    (record([1]), "maze3: seed 1 is in both A and B; join records of disjoint seeds"),
    (record([2], compact="auto"), "B was scored with --compact auto, A with --compact on"),
    (record([2], cap=48), "maze3: B has cap 48, A has 96; join records of the same settings"),
    (record([2], policies={"fixed:12", "fixed:24", "fixed:48", "latent_diff:0.01"}),
     "maze3: A (seed 0) scores looped latent_diff:0.001 on 2x (test) and B (seed 2) does not"),
    ({"tasks": {"prefix_parity": record([2])["tasks"]["maze3"]}, "compact": "on"},
     "B scores --tasks prefix_parity, A --tasks maze3; join records of the same tasks"),
])
def test_merge_refuses_records_that_do_not_join(b, message):
    with pytest.raises(ValueError) as info:
        adaptive.merge({"A": record([0, 1]), "B": b})
    assert message in str(info.value)


def test_merge_mode_writes_the_joined_record_and_refuses_bad_input_in_one_line(tmp_path, monkeypatch, capsys):
    import json

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(record([0, 1])))
    b.write_text(json.dumps(record([2])))
    out = tmp_path / "joined"
    monkeypatch.setattr(adaptive, "run_task", lambda *a, **k: pytest.fail("--merge scores nothing"))
    monkeypatch.setattr(adaptive, "trained", lambda *a, **k: pytest.fail("--merge trains nothing"))
    monkeypatch.setattr(sys, "argv", ["adaptive.py", "--merge", str(a), str(b), "--out", str(out)])
    assert adaptive.main() == 0
    doc = json.loads((out / "adaptive.json").read_text())
    assert doc["tasks"]["maze3"]["seeds"] == 3 and doc["tasks"]["maze3"]["bar"]["holds"] is True
    assert "the bar holds at 2x on every seed (seed 0: latent_diff; seed 1: latent_diff; seed 2: latent_diff)" in (
        out / "adaptive.md").read_text()
    assert (out / "adaptive_maze3.png").stat().st_size > 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tasks": {"maze3": {"rows": [dict(rows_2x()[0], accuracy=float("nan"))]}}}))
    no_compact = tmp_path / "no_compact.json"
    no_compact.write_text(json.dumps({k: v for k, v in record([2]).items() if k != "compact"}))
    text = tmp_path / "text.json"
    text.write_text(json.dumps({"tasks": {"text": {"rows": [{"policy": "fixed:1"}]}}}))
    for argv, why in ((["--merge", str(a), str(tmp_path / "nope.json")], "nope.json does not exist"),
                      (["--merge", str(a), str(bad)], "bad.json is not a result of this script (ValueError: it holds "
                                                      "NaN"),
                      (["--merge", str(a), str(text)], "it holds --tasks text (one model of one seed)"),
                      (["--merge", str(a), str(no_compact)], "no_compact.json is not a result of this script "
                                                             "(ValueError: it has compact None, where a run of this "
                                                             "script writes one of auto, on, off)"),
                      (["--merge", str(a), str(a)], f"--merge names {a} twice"),
                      (["--merge", str(a)], "--merge: give two records or more to join"),
                      (["--merge", str(a), str(a.parent / "joined" / "adaptive.json"), "--out", str(out)],
                       "is --out's own record"),
                      (["--merge", str(a), str(b), "--seeds", "3", "--compact", "on"],
                       "--merge reads none of --seeds and --compact (the records say what they scored); drop them"),
                      # given at their defaults they were accepted and ignored (#27 pass 29)
                      (["--merge", str(a), str(b), "--tasks", "prefix_parity,maze3", "--compact", "auto"],
                       "--merge reads none of --tasks and --compact"),
                      (["--merge", str(a), str(b), "--variant-loops", "recipe"], "--merge reads none of --variant-loops")):
        err = refused(monkeypatch, capsys, *argv)
        assert why in err, (argv, err)


def test_first_seed_scores_seeds_from_it_and_guards_only_those(tmp_path, monkeypatch):
    """--first-seed 2 --seeds 1 scores seed 2 alone; an --out whose record holds seed 2 only is replaced, one holding
    seed 0 is refused (its rows would be lost)."""
    import json

    calls = []
    monkeypatch.setattr(adaptive, "run_task", lambda *a, **k: calls.append((a, k)) or record([2])["tasks"]["maze3"])
    monkeypatch.setattr(adaptive, "pareto", lambda *a, **k: b"")
    argv = ["--tasks", "maze3", "--models", "looped", "--seeds", "1", "--first-seed", "2", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["adaptive.py", *argv])
    assert adaptive.main() == 0
    (args, _), = calls
    assert args[3] == 1 and args[-2:] == (2, "recipe")  # seeds, first_seed, variant loops
    held = tmp_path / "adaptive.json"
    assert adaptive.rows_replaced(held, ["maze3"], ("looped", "router"), range(2, 3)) is None
    held.write_text(json.dumps(record([0])))
    assert adaptive.rows_replaced(held, ["maze3"], ("looped", "router"), range(2, 3)) == "looped (seed 0) of maze3; " \
        "router (seed 0) of maze3"


def test_merge_into_an_out_holding_seeds_it_does_not_join_is_refused(tmp_path, monkeypatch, capsys):
    """#27 pass 29: --merge replaced --out's adaptive.json with no word, as a scoring run into that --out is refused
    for (the full record of seeds 0-4 was lost under the join of seeds 0-2); the same join again is written."""
    import json

    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "out"
    a.write_text(json.dumps(record([0, 1])))
    b.write_text(json.dumps(record([2])))
    out.mkdir()
    (out / "adaptive.json").write_text(full := json.dumps(record([0, 1, 2, 3, 4])))
    err = refused(monkeypatch, capsys, "--merge", str(a), str(b), "--out", str(out))
    assert (f"--out {out} holds an adaptive.json with rows of looped (seeds 3, 4) of maze3; router (seeds 3, 4) of "
            f"maze3, which the joined record does not hold") in err
    assert (out / "adaptive.json").read_text() == full and sorted(p.name for p in out.iterdir()) == ["adaptive.json"]
    (out / "adaptive.json").write_text(json.dumps(record([0, 1, 2])))  # an earlier join of the same records
    assert adaptive.main() == 0 and json.loads((out / "adaptive.json").read_text())["tasks"]["maze3"]["seeds"] == 3


def test_merge_into_an_out_holding_another_tasks_record_is_refused(tmp_path, monkeypatch, capsys):
    """#27 pass 30: --merge of maze3's records into an --out whose adaptive.json is prefix_parity's replaced it."""
    import json

    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "out"
    a.write_text(json.dumps(record([0, 1])))
    b.write_text(json.dumps(record([2])))
    out.mkdir()
    other = record([0, 1, 2])
    other["tasks"] = {"prefix_parity": other["tasks"]["maze3"]}
    (out / "adaptive.json").write_text(earlier := json.dumps(other))
    err = refused(monkeypatch, capsys, "--merge", str(a), str(b), "--out", str(out))
    assert "holds an adaptive.json with the results of prefix_parity, which this run (maze3) does not score" in err
    assert (out / "adaptive.json").read_text() == earlier and sorted(p.name for p in out.iterdir()) == ["adaptive.json"]


def test_merge_joins_records_of_the_same_tasks_in_another_order():
    """#27 pass 29: --tasks maze3,prefix_parity and --tasks prefix_parity,maze3 are one benchmark; their records were
    refused as "not the same tasks"."""
    a, b = record([0, 1]), record([2])
    a["tasks"]["prefix_parity"] = a["tasks"]["maze3"]
    b["tasks"] = {"prefix_parity": b["tasks"]["maze3"], "maze3": b["tasks"]["maze3"]}
    doc = adaptive.merge({"A": a, "B": b})
    assert list(doc["tasks"]) == ["maze3", "prefix_parity"]
    assert all(t["seeds"] == 3 for t in doc["tasks"].values())


def test_a_record_with_a_row_scored_twice_is_refused(tmp_path):
    """A hand-edited or concatenated record whose seed holds one row twice joined, and the selection read both
    (#27 pass 29); a run scores each (seed, model, policy, difficulty, held-out set) once."""
    import json

    doc = record([0])
    rows = doc["tasks"]["maze3"]["rows"]
    rows.append(dict(rows[3]))
    path = tmp_path / "twice.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError) as info:
        adaptive.read_record(path)
    r = rows[3]
    assert str(info.value) == (f"maze3: rows 3 and {len(rows) - 1} are both seed 0, {r['model']}, {r['policy']}, "
                               f"{r['difficulty']}, {r['split']}, where a run of this script scores each once")
    rows.pop()  # the same rows under another seed are not a repeat
    path.write_text(json.dumps(doc))
    assert adaptive.read_record(path)["tasks"]["maze3"]["rows"] == rows


def test_variant_loops_train_the_router_and_gate_with_the_recipe_or_their_configs_loops(tmp_path):
    """--variant-loops recipe gives maze3's router the looped model's per-difficulty counts (run *_per_difficulty);
    config leaves its config's uniform(8, 16); the records of the two differ in variant_loops, so they do not join."""
    recipe = adaptive.variant_config("maze3", "router", 1, tmp_path, 32, 10)
    config = adaptive.variant_config("maze3", "router", 1, tmp_path, 32, 10, "config")
    x = {c.run.name: c.model.stages[0].circuits[0] for c in (recipe, config)}
    assert x["maze3-router_per_difficulty-seed1"].loops == "per_difficulty(2, 4)"
    assert x["maze3-router_per_difficulty-seed1"].max_loops == 20
    assert x["maze3-router-seed1"].loops == "uniform(8, 16)" and x["maze3-router-seed1"].max_loops == 16
    for cfg in (recipe, config):  # the rest is the same: steps, seed, the router's truncated backprop
        assert (cfg.seed, cfg.train.steps, cfg.model.stages[0].router.backprop) == (1, 10, adaptive.ROUTER_BACKPROP)
    assert adaptive.recipe_loops("maze3", "config") == [] and adaptive.recipe_loops("maze3") != []
    # the runs checked before any work (trained past the steps) are the ones these loops train
    names = {c.run.name for c in adaptive.planned(["maze3"], tmp_path, 32, range(1, 2), 10, ("looped", "router"),
                                                  "config")}
    assert names == {"maze3-looped-seed1", "maze3-router-seed1"}
    # full: the counts and the looped model's loss at each of the last 4 iterations (the router's last 4 rounds)
    full = adaptive.variant_config("maze3", "router", 1, tmp_path, 32, 10, "full")
    assert full.run.name == "maze3-router_full-seed1" and full.iteration_window() == ("X", 4)
    assert full.model.stages[0].circuits[0].loops == "per_difficulty(2, 4)"
    assert recipe.iteration_window() is None and config.iteration_window() is None
    assert adaptive.loops_of("maze3", adaptive.recipe_loops("maze3", "full")) == "--variant-loops full"
    # own: full, read at each token's own last 4 rounds
    own = adaptive.variant_config("maze3", "router", 1, tmp_path, 32, 10, "own")
    assert own.run.name == "maze3-router_own-seed1" and own.iteration_window() == ("X", 4)
    assert (own.model.stages[0].router.window, full.model.stages[0].router.window) == ("own", "bank")
    assert own.model.stages[0].circuits[0].loops == "per_difficulty(2, 4)"
    assert adaptive.loops_of("maze3", adaptive.recipe_loops("maze3", "own")) == "--variant-loops own"
    # sense: the recipe's counts, the router reading how much the states move
    sense = adaptive.variant_config("maze3", "router", 1, tmp_path, 32, 10, "sense")
    assert sense.run.name == "maze3-router_sense-seed1" and sense.iteration_window() is None
    assert sense.model.stages[0].router.inputs == ["change", "context"] and not own.model.stages[0].router.inputs
    assert sense.model.stages[0].circuits[0].loops == "per_difficulty(2, 4)"
    assert adaptive.loops_of("maze3", adaptive.recipe_loops("maze3", "sense")) == "--variant-loops sense"
    with pytest.raises(ValueError, match="variant loops 'uniform': choose from recipe, config"):
        adaptive.recipe_loops("maze3", "uniform")
    a, b = record([0]), record([1])
    b["tasks"]["maze3"]["variant_loops"] = adaptive.recipe_loops("maze3")
    with pytest.raises(ValueError, match="variant_loops"):
        adaptive.merge({"A": a, "B": b})


def test_router_config_trains_a_second_router_whose_loops_are_a_setting_chosen_on_val(tmp_path):
    """--models ...,router_config trains the router with its config's loops beside the one of --variant-loops; both
    are the family "router", so which one (and its cap) is chosen on val like any setting, and reported on test."""
    cfgs = adaptive.seed_configs("maze3", tmp_path, 32, 2, 10, ("looped", "router", "router_config"))
    assert {k: c.run.name for k, c in cfgs.items()} == {
        "looped": "maze3-looped-seed2", "router": "maze3-router_per_difficulty-seed2",
        "router_config": "maze3-router-seed2"}
    assert cfgs["router_config"].model.stages[0].circuits[0].loops == "uniform(8, 16)"
    assert cfgs["router_config"].model.stages[0].router.backprop == adaptive.ROUTER_BACKPROP
    names = [p[0] for p in adaptive.policies("maze3", "router_config", cfgs["router_config"])]
    assert names == ["router, config loops (cap 12)", "router, config loops (cap 24)",
                     "router, config loops (cap 48)", "router, config loops (cap 96)"]
    assert {adaptive.family(n) for n in names} == {"router"}
    assert adaptive.routed("router_config") and not adaptive.routed("halting")
    rows = rows_2x() + [  # the config router comes within a point on val at fewer FLOPs than the recipe's
        row("router, config loops (cap 24)", "val", 0.945, 9.0, model="router_config"),
        row("router, config loops (cap 24)", "test", 0.93, 11.0, model="router_config"),
        row("router, config loops (cap 96)", "val", 0.95, 20.0, model="router_config"),
        row("router, config loops (cap 96)", "test", 0.99, 20.0, model="router_config")]
    (entry,) = adaptive.select(rows)
    assert entry["families"]["router"]["policy"] == "router, config loops (cap 24)"  # not cap 96, the best on test
    assert entry["families"]["router"]["test_accuracy"] == 0.93


def test_a_record_of_variant_loops_no_flag_writes_is_named_as_it_is(tmp_path):
    """#27 pass 32: a record whose variant_loops neither --variant-loops value writes (null, a string, other
    overrides: edited, or of another version) was named "--variant-loops config", and a config run into its --out
    was refused for holding rows of --variant-loops config, the value it was run with: the line names the value."""
    import json

    held = tmp_path / "adaptive.json"
    for value, shown in ((None, "null"), ("abc", '"abc"'), ([1, 2], "[1, 2]"), (["data.x=1"], '["data.x=1"]')):
        doc = record([0])
        doc["tasks"]["maze3"]["variant_loops"] = value
        held.write_text(json.dumps(doc))
        for mine in ([], adaptive.recipe_loops("maze3")):
            assert adaptive.variants_replaced(held, {"maze3": mine}) == \
                f"router (variant_loops {shown}, which no --variant-loops value writes) of maze3"
    assert adaptive.loops_of("maze3", []) == "--variant-loops config"
    assert adaptive.loops_of("maze3", adaptive.recipe_loops("maze3")) == "--variant-loops recipe"


def test_a_run_of_other_variant_loops_into_an_out_holding_their_rows_is_refused(tmp_path, monkeypatch, capsys):
    """#27 pass 31: --variant-loops config into the --out of a recipe run (both default to bench_runs/adaptive)
    replaced its record, and with it the rows of the halting and router models trained with the recipe's counts,
    with no word: the rows carry the same model names, so they read as the rows the run scores again."""
    import json

    recipe = record([0, 1, 2])
    recipe["tasks"]["maze3"]["variant_loops"] = adaptive.recipe_loops("maze3")
    held = tmp_path / "adaptive.json"
    held.write_text(earlier := json.dumps(recipe))
    monkeypatch.setattr(adaptive, "run_task", lambda *a, **k: pytest.fail("trained before the refusal"))
    argv = ["--tasks", "maze3", "--models", "looped,router", "--variant-loops", "config", "--out", str(tmp_path)]
    err = refused(monkeypatch, capsys, *argv)
    assert (f"--out {tmp_path} holds an adaptive.json with rows of router (--variant-loops recipe) of maze3, models "
            f"other than the ones this run (--variant-loops config) scores under those names") in err
    assert held.read_text() == earlier
    # the same loops (recipe, by default) rescore them; a record without the field (before it) trained with config's
    assert adaptive.variants_replaced(held, {"maze3": adaptive.recipe_loops("maze3")}) is None
    del recipe["tasks"]["maze3"]["variant_loops"]
    held.write_text(json.dumps(recipe))
    assert adaptive.variants_replaced(held, {"maze3": []}) is None
    assert adaptive.variants_replaced(held, {"maze3": adaptive.recipe_loops("maze3")}) == \
        "router (--variant-loops config) of maze3"
    # a looped-only record, another task, or a damaged record has no variant rows to lose
    held.write_text(json.dumps(record([0], policies={"fixed:24"})))
    assert adaptive.variants_replaced(held, {"maze3": adaptive.recipe_loops("maze3")}) is None
    assert adaptive.variants_replaced(held, {"prefix_parity": []}) is None
    held.write_text("{")
    assert adaptive.variants_replaced(held, {"maze3": []}) is None
    # --merge of config records into the --out of a recipe record: refused the same way
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(record([0, 1])))
    b.write_text(json.dumps(record([2])))
    held.write_text(earlier)
    assert "rows of router (--variant-loops recipe) of maze3, models other than the joined record's" in refused(
        monkeypatch, capsys, "--merge", str(a), str(b), "--out", str(tmp_path))
    assert held.read_text() == earlier


def paired_entry(ratio, policy="latent_diff:0.01", fixed="fixed:24"):
    return {"policy": policy, "fixed": fixed, "seconds": [ratio], "fixed_seconds": [1.0], "time_ratio": ratio}


def test_the_bar_reads_the_time_ratio_timed_in_alternation():
    """Declared 2026-12-07 12:15 UTC: at 2x a selection's time ratio is the one timed in alternation with its best
    fixed count (`paired_times`); the rows' own is kept as recorded_time_ratio. A paired entry of another policy or
    fixed count (a record edited, or of another selection) is not read."""
    rows = rows_2x()
    (entry,) = adaptive.select(rows, {"0": {"latent_diff": paired_entry(0.75)}})
    ld = entry["families"]["latent_diff"]
    assert ld["time_ratio"] == 0.75 and ld["recorded_time_ratio"] == pytest.approx(0.6)
    assert not adaptive.passes(ld) and "recorded_time_ratio" not in entry["families"]["router"]
    for stale in (paired_entry(0.75, policy="latent_diff:0.1"), paired_entry(0.75, fixed="fixed:48")):
        (entry,) = adaptive.select(rows, {"0": {"latent_diff": stale}})
        assert entry["families"]["latent_diff"]["time_ratio"] == pytest.approx(0.6)
    four = [dict(r, difficulty="4x") for r in rows]  # only the bar's difficulty is paired
    (entry,) = adaptive.select(four, {"0": {"latent_diff": paired_entry(0.75)}})
    assert entry["families"]["latent_diff"]["time_ratio"] == pytest.approx(0.6)


def test_paired_times_time_each_selection_against_the_best_fixed_count_in_alternation(monkeypatch):
    # as `run_task` has them after a seed is scored: Spearman is computed over every seed afterwards (a KeyError)
    rows = [{k: v for k, v in r.items() if k != "depth_spearman"} for r in rows_2x()]
    calls, times = [], {24: [1.0, 0.9, 1.2], 10: [0.5, 0.7, 0.45], 96: [0.8, 0.8, 0.8]}

    def measure(ev, params, batches, cfg, vocab, loops, exits, rules, compact, shares, timings):
        assert (ev, timings, batches) == (f"ev {params}", 1, ["2x/test"])
        n = loops["X"] if exits is None else 10  # latent_diff:0.01's cap is 96: tell it by its rule
        calls.append(n)
        return {"seconds_per_token": times[n].pop(0)}

    monkeypatch.setattr(adaptive, "measure", measure)
    monkeypatch.setattr(adaptive, "evaluator_for", lambda model: f"ev {model}")
    monkeypatch.setattr(adaptive, "policies", lambda name, model, cfg: [
        ("fixed:24", {"X": 24}, None, None), ("latent_diff:0.01", {"X": 96}, {"X": "rule"}, None),
        ("router (cap 96)", {"X": 96}, None, None)])
    # a model's params are its name, which its (fake) evaluator is named by: each policy runs on its own model
    runs = {m: (None, type("M", (), {"vocab_size": 9, "__str__": lambda self, m=m: m})(), m) for m in ("looped", "router")}
    out = adaptive.paired_times("maze3", rows, runs, ["2x/test"], True, rounds=3)
    assert calls == [24, 10, 96, 96, 10, 24, 24, 10, 96]
    assert out["latent_diff"] == {"policy": "latent_diff:0.01", "fixed": "fixed:24", "seconds": [0.5, 0.7, 0.45],
                                  "fixed_seconds": [1.0, 0.9, 1.2], "time_ratio": pytest.approx(0.5)}
    assert out["router"]["time_ratio"] == pytest.approx(0.8 / 0.9) and set(out) == {"latent_diff", "router"}


def test_merge_joins_the_paired_timings_and_refuses_records_timed_otherwise():
    a, b = record([0, 1]), record([2])
    for doc, seeds in ((a, (0, 1)), (b, (2,))):
        doc["tasks"]["maze3"]["paired"] = {str(s): {"latent_diff": paired_entry(0.75)} for s in seeds}
        doc["tasks"]["maze3"]["paired_rounds"] = 5
    t = adaptive.merge({"A": a, "B": b})["tasks"]["maze3"]
    assert set(t["paired"]) == {"0", "1", "2"} and t["paired_rounds"] == 5
    assert t["bar"] == {"holds": False, "passing": {0: [], 1: [], 2: []}}  # 0.75x the time: over 0.7x
    assert "(0.60)" in adaptive.markdown("maze3", t) and "timed in alternation" in adaptive.markdown("maze3", t)
    with pytest.raises(ValueError, match="maze3: B has paired_rounds None, A has 5; join records of the same "
                                         "settings"):
        adaptive.merge({"A": a, "B": record([2])})


@pytest.mark.parametrize("paired, rounds, why", [
    ("abc", 1, "TypeError: maze3: its paired timings are a str, where a run of this script writes a JSON object of "
               "seeds"),
    ([1, 2], 1, "its paired timings are a list"),
    ({"0": "abc"}, 1, "seed 0's paired timings are not a JSON object of families"),
    ({"0": {"latent_diff": "abc"}}, 1, "seed 0's paired timing of 'latent_diff' is not a JSON object"),
    ({"0": {"latent_diff": {"fixed": "fixed:24", "time_ratio": 0.5}}}, 1, "has policy None"),
    ({"0": {"latent_diff": dict(paired_entry(0.75), time_ratio="a")}}, 1, "has time_ratio 'a', where its seconds "
                                                                           "give 0.75"),
    ({"0": {"latent_diff": dict(paired_entry(0.75), time_ratio=-1)}}, 1, "has time_ratio -1"),  # passed the bar
    ({"0": {"latent_diff": dict(paired_entry(0.75), seconds=[0])}}, 1, "has seconds [0]"),
    ({"0": {"latent_diff": paired_entry(0.75)}}, 5, "has seconds [0.75], where a run of this script writes "
                                                    "paired_rounds (5) numbers > 0"),
    ({"0": {"bogus": paired_entry(0.75)}}, 1, "paired timing of 'bogus': not a family this script times"),
    ({"7": {"latent_diff": paired_entry(0.75)}}, 1, "paired timings of seed '7', which its rows do not score"),
    ({"0": {"latent_diff": paired_entry(0.75)}}, 0, "it has paired_rounds 0, where a run of this script writes a "
                                                    "whole number >= 1"),
    ({"0": {"latent_diff": paired_entry(0.75)}}, "5", "it has paired_rounds '5'"),
    ({"0": {"latent_diff": paired_entry(0.75)}}, None, "it has paired_rounds None"),
])
def test_a_paired_section_edited_by_hand_is_one_line(tmp_path, monkeypatch, capsys, paired, rounds, why):
    """A record's paired timings damaged by hand (a string or list for the section or a seed's entry: AttributeError
    tracebacks in --merge and paired_time.py; a time ratio of -1 or 0 passed the bar) or paired_rounds of another kind
    are one line naming the field (#27 pass 35)."""
    import json

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(record([2])))
    doc = record([0])
    doc["tasks"]["maze3"] |= {"paired": paired, "paired_rounds": rounds}
    b.write_text(json.dumps(doc))
    err = refused(monkeypatch, capsys, "--merge", str(a), str(b), "--out", str(tmp_path / "out"))
    assert f"{b} is not a result of this script" in err and why in err, err
    assert "Traceback" not in err and not (tmp_path / "out" / "adaptive.json").exists()
    doc["tasks"]["maze3"] |= {"paired": {"0": {"latent_diff": paired_entry(0.75)}}, "paired_rounds": 1}
    b.write_text(json.dumps(doc))
    assert adaptive.read_record(b)["tasks"]["maze3"]["paired_rounds"] == 1  # as a run of this script writes it
