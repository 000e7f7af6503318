"""bench/addition_places.py: each answer place's accuracy, checked on a hand-made batch."""

import importlib.util
from pathlib import Path

import numpy as np

spec = importlib.util.spec_from_file_location("addition_places", Path(__file__).parents[2] / "bench" / "addition_places.py")
places = importlib.util.module_from_spec(spec)
spec.loader.exec_module(places)


def test_place_accuracy_reads_each_answer_position_in_order_and_skips_padding_rows():
    # three rows, answers at positions 2..4 (row 0, 1) and 3..5 (row 2); row 3 is a padding row of the batch
    mask = np.array([[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1], [0] * 6], np.float32)
    targets = np.array([[0, 0, 5, 6, 7, 0], [0, 0, 5, 6, 7, 0], [0, 0, 0, 8, 9, 4], [0] * 6])
    pred = targets.copy()
    pred[0, 2] = 1  # row 0 wrong at its first answer place
    pred[2, 5] = 1  # row 2 wrong at its third
    pred[:, 0] = 3  # wrong where nothing is scored
    exact, acc = places.place_accuracy(pred, {"mask": mask, "targets": targets})
    assert exact == 1 / 3
    np.testing.assert_allclose(acc, [2 / 3, 1.0, 2 / 3])


def test_the_table_holds_every_answer_place_where_the_difficulty_is_not_the_digit_count(tmp_path, monkeypatch, capsys):
    """#27 pass 21: addition_runs_coupled's difficulty d is a run's length, its answers 2d + 7 places: the table had
    d + 1 columns and failed with a ValueError traceback after every model was scored."""
    rows = [{"seed": 0, "model": m, "digits": 2, "loops": 1, "exact": 0.5, "places": [1.0] * 11}
            for m in ("looped", "equal_params")]
    monkeypatch.setattr(places, "run", lambda *a: rows)
    assert places.main(["--setting", "addition_runs_coupled", "--runs", str(tmp_path), "--digits", "2"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert [h for h in header if h.startswith("p")] == [f"p{i}" for i in range(1, 12)]
