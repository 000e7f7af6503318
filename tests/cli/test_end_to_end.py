"""A run made by `train` itself, read back by the analysis commands (slow: compiles a train step)."""

import json

import pytest

from loopformer.cli import main
from loopformer.train.trainer import train
from tests.conftest import tiny_config


@pytest.mark.slow
def test_eval_of_a_trained_run_matches_the_trainers_eval(tmp_path, capsys):
    result = train(tiny_config(tmp_path, "trained"))
    capsys.readouterr()
    # data.eval_examples=16: the trainer's eval set is the first 16 examples of each split.
    assert main(["eval", "--run", str(result.run_dir), "--examples", "16", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    for row in rows:
        expected = result.eval[row["split"]]
        assert row["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        assert row["accuracy"] == expected["accuracy"] and row["examples"] == 16
    assert main(["sweep", "--run", str(result.run_dir), "--loops", "X=1:3", "--examples", "16"]) == 0
    assert "sweep over X loops (Y=3 fixed)" in capsys.readouterr().out
