"""``loopformer activity`` on single-task, text and mixture runs, and the mixture's NAME/SPLIT splits in
every analysis command."""

import json

from loopformer.cli import main
from tests.conftest import EXAMPLES

ACTIVITY_KEYS = {"split": str, "circuit": str, "on_rate": float, "mean_write_norm": float,
                 "mean_ablation_delta_loss": float}


def run_json(capsys, *argv):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def check(doc, splits, circuits):
    assert [(r["split"], r["circuit"]) for r in doc["rows"]] == [(s, c) for s in splits for c in circuits]
    for row in doc["rows"]:
        assert set(row) == set(ACTIVITY_KEYS)
        assert all(isinstance(row[k], kind) for k, kind in ACTIVITY_KEYS.items())
        assert 0.0 <= row["on_rate"] <= 1.0 and row["mean_write_norm"] >= 0.0
    assert set(doc["on_threshold"]) == set(splits)


def test_activity_on_a_single_task_run(run_dir, capsys):
    doc = run_json(capsys, "activity", "--run", str(run_dir), "--examples", str(EXAMPLES))
    check(doc, ["train", "hard"], ["X", "Y"])
    assert (run_dir / "activity.png").read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / "activity.csv").read_text().splitlines()[0] == \
        "split,circuit,on_rate,mean_write_norm,mean_ablation_delta_loss"
    assert main(["activity", "--run", str(run_dir), "--examples", str(EXAMPLES), "--split", "hard", "--mode", "mean"]) == 0
    table = capsys.readouterr().out
    assert "hard [4]" in table and "on-rate" in table and "mean Δloss" in table


def test_the_table_names_the_loops_given(run_dir, capsys):
    """#27 pass 20: `activity --loops X=3` measured at X=3 (its JSON said so) under a table headed "circuit activity
    at loops X=2 Y=3", the run's eval_loops."""
    assert main(["activity", "--run", str(run_dir), "--examples", "4", "--split", "hard", "--loops", "X=3"]) == 0
    assert "circuit activity at loops X=3 Y=3:" in capsys.readouterr().out


def test_activity_on_a_text_run(text_run_dir, capsys):
    doc = run_json(capsys, "activity", "--run", str(text_run_dir), "--examples", "4", "--split", "val")
    check(doc, ["val"], ["X"])
    assert doc["examples_per_split"] == {"val": 4}


def test_headers_count_the_windows_a_text_split_holds(text_run_dir, capsys):
    """#27 pass 13: a text split holds fewer windows than --examples may ask for; the header said the number asked
    (`activity`, `ablate` and `sweep` show no other count)."""
    held = run_json(capsys, "eval", "--run", str(text_run_dir), "--split", "val", "--examples", "100000")["rows"][0]
    assert held["examples"] < 100000
    for command in (["activity"], ["ablate"], ["sweep", "--loops", "X=1,2"], ["eval"]):
        assert main([*command, "--run", str(text_run_dir), "--split", "val", "--examples", "100000"]) == 0
        header = capsys.readouterr().out.splitlines()[0]
        assert f" · {held['examples']} windows per split · " in header, (command, header)


def test_a_mixture_run_in_every_analysis_command(mixture_run_dir, capsys):
    run = str(mixture_run_dir)
    n = ["--examples", str(EXAMPLES)]
    doc = run_json(capsys, "activity", "--run", run, *n)
    check(doc, ["prefix_parity/train", "prefix_parity/2x", "maze/train"], ["X", "Y"])
    doc = run_json(capsys, "eval", "--run", run, *n, "--split", "maze/train", "--ablate", "X")
    assert [(r["split"], r["ablated"], r["examples"]) for r in doc["rows"]] == [("maze/train", ["X"], EXAMPLES)]
    doc = run_json(capsys, "ablate", "--run", run, *n, "--split", "prefix_parity/2x")
    assert {r["split"] for r in doc["rows"]} == {"prefix_parity/2x"}
    doc = run_json(capsys, "sweep", "--run", run, *n, "--split", "maze/train", "--loops", "X=1,2")
    assert [r["loops"]["X"] for r in doc["rows"]] == [1, 2]
    doc = run_json(capsys, "generate", "--run", run, "--example-split", "prefix_parity/2x", "--count", "2")
    (first, _) = doc["examples"]
    assert len(first["answer"]["tokens"]) == 8 and all(t in (3, 4) for t in first["answer"]["tokens"])  # its own ids
    assert all(t in (3, 4) for t in first["predictions"][0]["tokens"])  # argmax over the entry's ids only
    # #27 pass 13: parity labels every input position, so its answers are one forward pass (was "autoregressive greedy")
    assert doc["decoding"] == "one pass, argmax per position"
    assert main(["eval", "--run", run, *n, "--split", "maze/2x"]) == 2
    err = capsys.readouterr().err
    assert "no eval split 'maze/2x'; its splits are prefix_parity/train, prefix_parity/2x, maze/train (data.mixture" in err
    assert main(["eval", "--run", run, *n]) == 0
    assert "task mixture(prefix_parity, maze)" in capsys.readouterr().out
