"""The exit oracle's stops (bench/exit_oracle.py): the first count from which a token stays right."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location("exit_oracle_bench", Path(__file__).parents[2] / "bench" / "exit_oracle.py")
oracle = importlib.util.module_from_spec(spec)
sys.modules["exit_oracle_bench"] = oracle
spec.loader.exec_module(oracle)


def test_a_token_stops_at_the_first_count_from_which_it_stays_right_up_to_the_best():
    # one example, five tokens; rows are counts 1..5 (best = 4: count 5 is not read)
    right = np.array([[1, 0, 0, 1, 0],
                      [1, 1, 0, 0, 0],
                      [1, 1, 1, 1, 0],
                      [1, 1, 1, 1, 0],
                      [0, 0, 0, 0, 1]], bool)[:, None, :]
    mask = np.array([[1, 1, 1, 1, 0]])
    # token 0 right from 1; token 1 from 2; token 2 from 3; token 3 right at 1, wrong at 2, right from 3 on: 3;
    # token 4 has no answer: best
    np.testing.assert_array_equal(oracle.oracle_counts(right, mask, 4), [[1, 2, 3, 3, 4]])
    # a token wrong at the best count runs it
    np.testing.assert_array_equal(oracle.oracle_counts(right, np.ones((1, 5)), 2), [[1, 2, 2, 2, 2]])


def test_the_row_oracle_stops_every_token_of_a_row_at_its_latest_answer():
    first = np.array([[1, 2, 3, 3, 4],    # answers at 0..3 (the BOS-like token 4 has none): the row at 3
                      [5, 1, 1, 2, 2],    # token 0 has no answer: its 5 does not count, the row at 2
                      [4, 4, 1, 1, 1]])   # no answers: the tokens keep their counts
    mask = np.array([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(oracle.row_counts(first, mask), [[3] * 5, [2] * 5, [4, 4, 1, 1, 1]])


def test_a_run_into_an_out_holding_seeds_it_does_not_score_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """#27 pass 26: --seeds 1 into the --out of a 3-seed run replaced its exit_oracle.json with no word (the
    compact-shares record, exit_oracle_shares.json, is its own)."""
    rows = [{"seed": s, "difficulty": "2x"} for s in range(3)]
    (tmp_path / "exit_oracle.json").write_text(json.dumps({"tasks": {"prefix_parity": {"rows": rows}}}))
    monkeypatch.setattr(oracle, "run_task", lambda *a, **k: pytest.fail("trained before the refusal"))
    monkeypatch.setattr(sys, "argv", ["exit_oracle.py", "--tasks", "prefix_parity", "--seeds", "1", "--out",
                                      str(tmp_path)])
    with pytest.raises(SystemExit) as info:
        oracle.main()
    assert info.value.code == 2 and (f"error: --out {tmp_path} holds an exit_oracle.json with rows of looped (seeds 1, "
                                     f"2) of prefix_parity, which this run (seeds 0..0) does not score") in \
        capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["exit_oracle.py", "--tasks", "prefix_parity", "--seeds", "1", "--out",
                                      str(tmp_path), "--compact-shares", "1,2"])
    with pytest.raises(pytest.fail.Exception, match="trained before the refusal"):
        oracle.main()
