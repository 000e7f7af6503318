import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from loopformer.data.tasks import make_task
from loopformer.errors import AnalysisError

spec = importlib.util.spec_from_file_location("maze_shortcut", Path(__file__).parents[2] / "bench" / "maze_shortcut.py")
maze_shortcut = importlib.util.module_from_spec(spec)
spec.loader.exec_module(maze_shortcut)


def test_erase_start_leaves_the_maze_without_a_start():
    """Only the start room changes (by -4: its passages stay), and the maze then has no start."""
    task = make_task("maze", entrance=True)
    rng = np.random.default_rng(0)
    x = np.stack([task.example(rng, 6, task.seq_len(6))["inputs"] for _ in range(4)])
    y = maze_shortcut.erase_start(x, task.ROOM)
    assert ((x != y).sum(axis=1) == 1).all() and ((x - y)[x != y] == 4).all()
    right, down, _ = task.parse(x[0])
    toks = np.asarray(y[0][: 3 * 6]).reshape(6, 3)[:, :2].T - task.ROOM
    assert ((toks & 1).astype(bool) == right).all() and ((toks & 2).astype(bool) == down).all()
    with pytest.raises(ValueError, match="start"):
        task.parse(y[0])


def test_a_setting_that_is_not_a_maze_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["maze_shortcut.py", "--tasks", "prefix_parity"])
    with pytest.raises(SystemExit) as e:
        maze_shortcut.main()
    assert e.value.code == 2 and "maze_entrance" in capsys.readouterr().err


def test_a_missing_run_says_how_to_train_it(tmp_path):
    with pytest.raises(AnalysisError, match="think_longer.py --tasks maze_exit"):  # one `error:` line, status 2
        maze_shortcut.check("maze_exit", tmp_path, 16)


def test_a_run_killed_before_its_first_checkpoint_is_untrained(tmp_path):
    """An empty checkpoints/ (a training killed before its first save) is no trained run: it read as one, and the
    checkpoint library's error came after the first setting was scored."""
    cfg = maze_shortcut.think_longer.config("maze_exit", "looped", 1500, tmp_path, 16)
    (cfg.run_dir / "checkpoints").mkdir(parents=True)
    with pytest.raises(AnalysisError, match="no trained run at .*think_longer.py --tasks maze_exit"):
        maze_shortcut.check("maze_exit", tmp_path, 16)
