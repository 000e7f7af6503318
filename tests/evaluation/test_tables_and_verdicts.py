"""Pure helpers of the analysis: grid points, ablation settings, convergence verdicts, tables."""

from loopformer.evaluation.ablate import ablation_sets
from loopformer.evaluation.sweep import grid_points, verdict


def test_grid_points_and_ablation_sets():
    assert grid_points({"X": [1, 2], "Y": [3]}) == [{"X": 1, "Y": 3}, {"X": 2, "Y": 3}]
    assert grid_points({}) == [{}]
    assert ablation_sets(["X"]) == [("baseline", []), ("-X", ["X"])]
    # With two circuits "only X" is "-Y": each distinct set is evaluated once.
    assert ablation_sets(["X", "Y"]) == [("baseline", []), ("-X", ["X"]), ("-Y", ["Y"]), ("none", ["X", "Y"])]
    three = ablation_sets(["X", "Y", "Z"])
    assert [label for label, _ in three] == ["baseline", "-X", "-Y", "-Z", "only X", "only Y", "only Z", "none"]
    assert dict(three)["only Y"] == ["X", "Z"]


def test_verdict():
    n = 20
    assert verdict([0.5] * 3 + [1e-4] * (n - 3), [1.0] * n, 3) == "fixed-point"
    assert verdict([0.5 / i**2 for i in range(1, n + 1)], [1.0] * n, 3) == "settling"
    # Constant steps on a linearly growing state: rel_change ~ 1/i, but the state drifts.
    assert verdict([1.0 / i for i in range(1, n + 1)], [float(i) for i in range(1, n + 1)], 3) == "drifting"
    assert verdict([0.3] * n, [5.0] * n, 3) == "moving"
    assert verdict([0.3] * 3, [5.0] * 3, 3) == "-"


def test_format_table_multiline_cells():
    from loopformer.evaluation.tables import format_table

    text = format_table(["loops", "answer", ""], [["X=1", "#-#\n. .", "✓"], ["X=24", "ab", "✗"]])
    assert text.splitlines() == ["loops  answer", "-----  ------  -", "X=1    #-#     ✓", "       . .",
                                 "X=24   ab      ✗"]


def test_a_mixture_of_text_and_a_task_shows_each_splits_own_metric_in_either_order():
    """Issue #27: with a text entry first the final table raised KeyError 'bits_per_byte'; with a task first
    the text splits read "accuracy 0.0 %". Each split now shows its own number."""
    from loopformer.config import load_config
    from loopformer.train.trainer import format_sweep_table

    cfg = load_config(None, ["data.task=mixture", "data.mixture=[{task: prefix_parity, name: parity, train_difficulty: "
                             "[1, 4], eval_splits: {train: [1, 4]}}, {task: text, name: kjv, paths: "
                             "['asset:kjv_genesis_exodus.txt']}]"])
    text = [{"loops": n, "split": "kjv/val", "accuracy": 0.0, "bits_per_byte": 2.5 - 0.1 * n} for n in (1, 2)]
    task = [{"loops": n, "split": "parity/train", "accuracy": 0.25 * n} for n in (1, 2)]
    for rows in (text + task, task + text):
        table = format_sweep_table(rows, cfg)
        assert table.startswith("accuracy (bits per byte on text splits) vs loop count")
        lines = table.splitlines()
        one = next(line for line in lines if line.split()[:1] == ["1"])
        assert "2.4000" in one and "25.0%" in one and "0.0%" not in one


def test_the_final_sweeps_title_names_each_circuits_training_mean():
    """#27 pass 40: the means of the circuits swept were sorted as text without their names (A, B, C of means 5, 2
    and 1 read "training mean 1.0, 2.0, 5.0", A's as 1.0); where they differ each is named, where they agree one."""
    from loopformer.config import load_config
    from loopformer.train.trainer import format_sweep_table

    circuit = "{name: %s, depth: 1, width: 16, heads: 2, loops: '%s', max_loops: 16, eval_loops: 2, backprop: 1}"
    rows = [{"loops": 2, "split": "train", "accuracy": 0.5}]
    for loops, title in ((("fixed(5)", "fixed(2)", "fixed(1)"), "training mean A 5.0, B 2.0, C 1.0;"),
                         (("fixed(2)", "uniform(1, 3)", "fixed(2)"), "training mean 2.0;")):
        stage = ", ".join(circuit % (n, dist) for n, dist in zip("ABC", loops, strict=True))
        cfg = load_config(None, ["model.d_model=48", "model.heads=2", f"model.stages=[{{circuits: [{stage}]}}]",
                                 "data.task=prefix_parity"])
        assert title in format_sweep_table(rows, cfg).splitlines()[0]


def test_ablation_of_a_text_split_shows_bits_per_byte():
    """#27 pass 17: `ablate` on a text run showed "accuracy 0.0%" and "Δacc +0.0" (a window's exact match) for
    every setting, whatever the circuit did; text splits now show bits per byte and its change, task splits accuracy."""
    from types import SimpleNamespace

    from loopformer.evaluation.tables import ablation_table

    info = SimpleNamespace(defaults={"X": 5}, splits={"train": [1, 4]}, cfg=SimpleNamespace(model=None),
                           circuits=[])
    row = lambda split, label, loss, acc, **text: {"split": split, "label": label, "kept": ["X"] if label == "baseline"
                                                  else [], "loss": loss, "accuracy": acc, "mode": "zero", **text}
    text = [row("val", "baseline", 5.0, 0.0, bits_per_byte=7.5, delta_bits_per_byte=0.0),
            row("val", "-X", 5.2, 0.0, bits_per_byte=7.75, delta_bits_per_byte=0.25)]
    task = [row("train", "baseline", 1.0, 0.5), row("train", "-X", 1.5, 0.25)]
    for r in text + task:
        r.update(delta_loss=0.0, delta_accuracy=r["accuracy"] - (0.5 if r["split"] == "train" else 0.0))
    table = ablation_table(text, info)
    assert "bits/byte" in table and "Δbits/byte" in table and "accuracy" not in table and "+0.2500" in table
    mixed = ablation_table(text + task, info).splitlines()
    assert "accuracy / bits/byte" in mixed[1]
    assert "7.7500" in mixed[4] and "+0.2500" in mixed[4] and "25.0%" in mixed[6] and "-25.0" in mixed[6]


def test_headers_name_an_act_circuits_count_a_cap():
    """#27 pass 27: on an ACT circuit `activity`, `ablate`, `sweep` and the final sweep said "at loops X=8" (the
    count every token ran, read as written) where ACT's head halts each token earlier (3.5 on average): they now say
    the count is a cap; a circuit without ACT's halting keeps the plain header."""
    from types import SimpleNamespace

    from loopformer.config import load_config
    from loopformer.evaluation.tables import ablation_table, activity_table, sweep_table
    from loopformer.train.trainer import format_sweep_table

    circuit = ("model.stages=[{circuits: [{name: X, depth: 1, width: 16, heads: 2, loops: 'uniform(2, 8)', "
               "max_loops: 8, eval_loops: 8, backprop: 4%s}]}]")
    note = "ACT halts X's tokens by its head: the counts are caps"
    for halting, noted in ((", halting: {kind: act}", True), ("", False)):
        cfg = load_config(None, ["model.d_model=16", "model.heads=2", circuit % halting, "data.task=prefix_parity"])
        info = SimpleNamespace(cfg=cfg, circuits=["X"], defaults={"X": 8}, splits={"train": (1, 4)},
                               full_loops=lambda loops=None: {"X": 8}, training_label=lambda c: "uniform(2, 8)")
        row = {"split": "train", "loss": 1.0, "accuracy": 0.5, "token_accuracy": 0.5}
        ablation = ablation_table([{**row, "label": "baseline", "kept": ["X"], "mode": "zero", "delta_loss": 0.0,
                                    "delta_accuracy": 0.0}], info)
        activity = activity_table([{**row, "circuit": "X", "on_rate": 1.0, "mean_write_norm": 1.0,
                                    "mean_ablation_delta_loss": 0.1}], {"train": 0.1}, info, "zero")
        sweep = sweep_table([{**row, "loops": {"X": n}} for n in (2, 8)], {"X": [2, 8]}, info)
        final = format_sweep_table([{**row, "loops": n} for n in (2, 8)], cfg)
        for text in (ablation, activity, sweep, final):
            assert (note in text.splitlines()[0]) is noted, text


def test_eval_shows_the_rounds_a_router_or_a_rule_ran_beside_its_caps():
    """A routed stage's tokens stop before its count, as exits' do: the eval table showed only the cap (X=12) for a
    router that ran 4.5 rounds per token. Rows whose tokens ran fewer iterations than their count (or counts per
    difficulty, auto) get the mean loops and computed columns; fixed counts do not."""
    from types import SimpleNamespace

    from loopformer.evaluation.tables import eval_table, stops_early

    info = SimpleNamespace(splits={"train": [1, 8]}, is_text=False)
    row = {"split": "train", "loops": {"X": 12}, "ablated": [], "loss": 0.1, "accuracy": 0.5, "token_accuracy": 0.9,
           "examples": 8, "mean_loops": {"X": 12.0}, "computed_loops": {"X": 12.0}}
    routed = row | {"mean_loops": {"X": 4.5}, "computed_loops": {"X": 7.25}}
    assert not stops_early(row) and stops_early(routed) and stops_early(row | {"loops": {"X": "auto"}})
    assert "mean loops" not in eval_table([row], info)
    table = eval_table([routed], info)
    assert table.splitlines()[0].split()[:3] == ["split", "loops", "(caps)"]
    assert "X=4.50" in table and "X=7.25" in table
