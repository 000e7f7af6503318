"""bench/seeds.py's text criterion (issue #24): gain from 1 loop to the best count, excess at 4x the mean."""

import importlib.util
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("seeds", Path(__file__).parents[2] / "bench" / "seeds.py")
seeds = importlib.util.module_from_spec(spec)
sys.modules["seeds"] = seeds
spec.loader.exec_module(seeds)


def _rows(seed, curve, split="val"):
    return [{"seed": seed, "split": split, "loops": n, "bits_per_byte": v} for n, v in curve.items()]


def test_text_criterion_per_seed():
    rows = (_rows(0, {1: 2.30, 4: 2.20, 16: 2.205, 24: 2.25})   # gain 0.10, 4x5=20 -> 16 and 24 tie: 16
            + _rows(1, {1: 2.24, 4: 2.20, 16: 2.23, 24: 2.3})    # gain 0.04: fails the first part
            + _rows(2, {1: 2.40, 4: 2.20, 20: 2.215})            # excess 0.015: fails the second
            + _rows(0, {1: 9.0}, split="train"))                 # other splits are not read
    crit = seeds.text_criterion(rows, 5.0)
    got = [(c["seed"], c["best_loops"], c["loops_4x"], round(c["gain"], 4), round(c["excess_4x"], 4), c["holds"])
           for c in crit["seeds"]]
    assert got == [(0, 4, 16, 0.1, 0.005, True), (1, 4, 16, 0.04, 0.03, False), (2, 4, 20, 0.2, 0.015, False)]
    text = seeds.markdown({"rows": rows, "metric": "bits_per_byte", "seeds": 3, "config": "c.yaml",
                           "text_criterion": crit})
    assert "- seed 0: 1 loop 2.3000, best 2.2000 at 4 loops (gain 0.1000), 16 loops 2.2050 (+0.0050): holds" in text
    assert text.count("does not hold") == 2


@pytest.mark.parametrize("mean,expected", [(2.5, 8), (6.0, 24), (2.75, 12)])
def test_four_times_the_mean_is_the_nearest_swept_count(mean, expected):
    crit = seeds.text_criterion(_rows(0, {1: 3.0, 8: 2.9, 12: 2.8, 24: 2.7}), mean)
    assert crit["seeds"][0]["loops_4x"] == expected  # 10 is as near 8 as 12 is: the smaller wins


def test_a_setting_every_seed_sets_is_refused(monkeypatch, capsys):
    """#27 pass 12: `seed=5` or `run.dir=X` among the overrides was accepted and replaced by each seed's own."""
    monkeypatch.setattr(seeds, "run_seeds", lambda *a: pytest.fail("trained"))
    for override, flag in (("seed=5", "--seeds"), ("run.dir=/tmp/x", "--out")):
        monkeypatch.setattr(sys, "argv", ["seeds.py", "--config", "configs/quickstart.yaml", override])
        with pytest.raises(SystemExit) as info:
            seeds.main()
        err = capsys.readouterr().err
        assert info.value.code == 2 and f"{override}: every seed's run sets" in err and f"use {flag} instead" in err


def test_a_bad_config_is_one_line(tmp_path):
    """#27 pass 12: a missing --config, a bad override or an --out that is a file was a traceback."""
    import subprocess

    script = Path(__file__).parents[2] / "bench" / "seeds.py"
    done = subprocess.run([sys.executable, str(script), "--config", str(tmp_path / "none.yaml")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: config file {tmp_path / 'none.yaml'} does not exist; pass --config with a path to a YAML file, e.g. "
        f"configs/quickstart.yaml"]
