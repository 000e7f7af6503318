"""A run made by `train` itself (the session's `trained_run`), read back by the analysis commands."""

import json

import pytest

from loopformer.cli import main
from tests.conftest import copy_run


def test_eval_of_a_trained_run_matches_the_trainers_eval(trained_run, tmp_path, capsys):
    result = trained_run
    run = copy_run(result, tmp_path)  # the commands write their tables and plots into the run
    # data.eval_examples=16: the trainer's eval set is the first 16 examples of each split.
    assert main(["eval", "--run", str(run), "--examples", "16", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    for row in rows:
        expected = result.eval[row["split"]]
        assert row["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        assert row["accuracy"] == expected["accuracy"] and row["examples"] == 16
    assert main(["sweep", "--run", str(run), "--loops", "X=1:3", "--examples", "16"]) == 0
    assert "sweep over X loops (Y=3 fixed)" in capsys.readouterr().out
