"""The exit oracle's stops (bench/exit_oracle.py): the first count from which a token stays right."""

import importlib.util
import sys
from pathlib import Path

import numpy as np

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
