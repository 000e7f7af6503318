"""`loopformer rys` and `loopformer convert` on a 6-layer plain run (issue #18)."""

import json
import re
import time

import numpy as np
import pytest

from loopformer.cli import main
from loopformer.config import load_config
from loopformer.train.trainer import train
from tests.conftest import make_run, tiny_config

PLAIN = ["model.prelude=6", "model.coda=0", "model.stages=[]", "eval.sweep_circuits=[]"]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    return make_run(tiny_config(tmp_path_factory.mktemp("surgery"), "plain", *PLAIN))


def cli_json(capsys, *argv):
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_rys_scores_every_range_on_few_programs(plain_run, capsys):
    doc = cli_json(capsys, "rys", "--run", str(plain_run), "--repeats", "1,2", "--examples", "40")
    assert doc["stack"] == "prelude" and doc["layers"] == 6
    for split in ("train", "hard"):
        for r in (1, 2):
            got = {(x["start"], x["end"]) for x in doc["rows"] if x["split"] == split and x["repeats"] == r}
            assert len(got) == 21
    assert doc["compiles"] <= 1  # splits padded to one length: one program, whatever the schedule
    row = doc["rows"][0]
    assert set(row) == {"start", "end", "repeats", "split", "loss", "accuracy", "bits_per_byte", "examples"}
    assert doc["screen"] is None  # 40 examples: fewer than the screen, so every setting is scored on all
    assert row["bits_per_byte"] is None and 0 <= row["accuracy"] <= 1
    ev = cli_json(capsys, "eval", "--run", str(plain_run), "--examples", "40")
    for base in doc["baseline"]:
        ref = next(r for r in ev["rows"] if r["split"] == base["split"])
        assert base["loss"] == pytest.approx(ref["loss"], abs=1e-5)
    for f in ("rys.csv", "rys_train.png", "rys_hard.png"):
        assert (plain_run / f).is_file()


def test_rys_screens_on_a_subset_and_rescores_the_best_on_every_example(plain_run, capsys):
    """Issue #26.5: the scan runs on the first batches of each split; the best settings and the unmodified
    model are scored again on all examples, where they equal what a full scan gives them."""
    full = cli_json(capsys, "rys", "--run", str(plain_run), "--examples", "48", "--screen", "0")
    doc = cli_json(capsys, "rys", "--run", str(plain_run), "--examples", "48", "--screen", "16")
    screen = doc["screen"]
    assert all(n == 16 for n in screen["examples"].values())  # 16 of one batch (all 48 were: #27 pass 40's leftover)
    assert all(r["examples"] == screen["examples"][r["split"]] for r in doc["rows"])
    assert len(doc["rows"]) == len(full["rows"])  # every setting screened
    for r in screen["rescored"]:
        assert r["examples"] == 48
        ref = next(f for f in full["rows"] if (f["split"], f["start"], f["end"], f["repeats"])
                   == (r["split"], r["start"], r["end"], r["repeats"]))
        assert r["loss"] == pytest.approx(ref["loss"], abs=1e-5) and r["accuracy"] == ref["accuracy"]
    for split in ("train", "hard"):
        mine = [r for r in screen["rescored"] if r["split"] == split]
        screened = sorted((r for r in doc["rows"] if r["split"] == split), key=lambda r: (-r["accuracy"], r["loss"]))
        assert [(r["start"], r["end"]) for r in mine] == [(r["start"], r["end"]) for r in screened[:5]]
    assert main(["rys", "--run", str(plain_run), "--screen", "-1"]) == 2
    assert "--screen -1: give a number of examples >= 1, or 0" in capsys.readouterr().err


def test_activity_on_a_plain_model_is_one_line(plain_run, capsys):
    assert main(["activity", "--run", str(plain_run)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "has no circuits (model.stages: []): activity measures" in line
    assert main(["eval", "--run", str(plain_run), "--exit", "latent_diff:0.1"]) == 2  # #27.8: not ignored
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "error: --exit latent_diff:0.1: this run has no looped circuits, so nothing can exit; drop --exit"
    # #27 pass 26: --max-loops alone said to add --exit or --loops, both refused on a run without circuits
    for argv in (["eval"], ["sweep", "--loops", "X=1:2"], ["generate"]):
        assert main([*argv, "--run", str(plain_run), "--max-loops", "4"]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line == ("error: --max-loops 4 caps the circuits that exit, and this run has no looped circuits; drop "
                        "--max-loops")


def test_rys_errors(plain_run, capsys):
    assert main(["rys", "--run", str(plain_run), "--stack", "coda"]) == 2
    assert "no coda layers to duplicate" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "line"), [
    (["--name", ""], "error: --name: '' must be an identifier (letters, digits, _)"),
    (["--name", "a.b"], "error: --name: 'a.b' must be an identifier (letters, digits, _)"),  # pass 22
    (["--loops", "fixed(0)"], "error: --loops: fixed(n) needs an integer n >= 1, got 0"),
    (["--loops", "uniform(8, 16)", "--max-loops", "4"], "error: --max-loops=4 is below counts that loops=uniform(8, 16) "
     "draws (up to 16): they would be clamped to 4, silently changing the training distribution; raise max_loops to "
     ">= 16 or lower loops"),
    # #27 pass 17: checked at difficulty 1 alone, it advised max_loops >= 104 (refused again at the data's hi), or
    # passed and was refused after the weights were read, naming model.stages.0.circuits.X.loops
    (["--loops", "per_difficulty(100, 4)"], "error: --loops=per_difficulty(100, 4) gives 204 loops at difficulty 2 "
     "(the training range's hi), above max_loops=64; raise max_loops to >= 204"),
    (["--loops", "per_difficulty(40, 4)"], "error: --loops=per_difficulty(40, 4) gives 84 loops at difficulty 2 "
     "(the training range's hi), above max_loops=64; raise max_loops to >= 84"),
])
def test_convert_names_its_flags_not_the_config_fields_they_fill(plain_run, tmp_path, capsys, flags, line):
    """The circuit convert writes is a config, checked as one; its errors named model.stages.0.circuits..name."""
    assert main(["convert", "--run", str(plain_run), "--core", "1:2", "--out", str(tmp_path / "new"), *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [line]
    assert not (tmp_path / "new").exists()


def test_convert_is_the_plain_model_at_one_loop_and_the_duplication_at_two(plain_run, capsys):
    conv = cli_json(capsys, "convert", "--run", str(plain_run), "--core", "2:4", "--out", "plain_conv")
    out = plain_run.parent / "plain_conv"
    assert conv["run"] == str(out) and conv["layers"] == {"prelude": [0, 1], "core": [2, 3], "coda": [4, 5],
                                                           "dropped": []}
    plain = cli_json(capsys, "eval", "--run", str(plain_run), "--examples", "40")["rows"]
    one = cli_json(capsys, "eval", "--run", str(out), "--examples", "40", "--loops", "X=1")["rows"]
    two = cli_json(capsys, "eval", "--run", str(out), "--examples", "40", "--loops", "X=2")["rows"]
    scan = cli_json(capsys, "rys", "--run", str(plain_run), "--examples", "40")["rows"]
    for split in ("train", "hard"):
        at = lambda rows, split=split: next(r for r in rows if r["split"] == split)  # noqa: E731
        assert at(one)["loss"] == pytest.approx(at(plain)["loss"], abs=1e-5)
        dup = next(r for r in scan if r["split"] == split and (r["start"], r["end"], r["repeats"]) == (2, 4, 1))
        assert at(two)["loss"] == pytest.approx(dup["loss"], abs=1e-5)
    assert main(["convert", "--run", str(plain_run), "--core", "2:4", "--out", "plain_conv"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["convert", "--run", str(plain_run), "--core", "2:9", "--out", "x"]) == 2
    assert "not inside the model's 6 layers" in capsys.readouterr().err
    assert main(["convert", "--run", str(plain_run), "--core", "2:4", "--out", ""]) == 2  # not the current directory
    assert capsys.readouterr().err.strip().endswith("error: --out '': name the new run's directory, e.g. --out runs/NAME "
                                                    "(it is created)")
    kept = plain_run.parent / "kept"
    kept.mkdir()
    (kept / "config.yaml").write_text("mine")
    assert main(["convert", "--run", str(plain_run), "--core", "2:4", "--out", str(kept)]) == 2
    assert "kept is not empty (config.yaml); pick another --out" in capsys.readouterr().err
    assert (kept / "config.yaml").read_text() == "mine" and sorted(p.name for p in kept.iterdir()) == ["config.yaml"]
    # #27 pass 22: --out naming the run being converted said to delete it (rm -r the source), after reading its weights;
    # an --out that holds a run is refused before any weight is read
    for out in (str(plain_run), plain_run.name):
        assert main(["convert", "--run", str(plain_run), "--core", "2:4", "--out", out]) == 2
        err = capsys.readouterr().err
        assert err.strip() == (f"error: --out {out} is the run being converted (--run); name a new directory for the "
                               f"looped run, e.g. --out {plain_run.name}-looped") and "loaded" not in err
    assert main(["convert", "--run", str(plain_run), "--core", "2:4", "--out", "plain_conv"]) == 2
    assert "loaded" not in capsys.readouterr().err


def test_convert_out_with_a_bracket_is_refused_before_the_weights_are_read(plain_run, capsys):
    """#27 pass 33: `convert --out 'x[1]'` read the weights, then was refused as "run.name / run.dir: ... has a '['"
    (settings the user never gave); it names --out before any weight is read."""
    assert main(["convert", "--run", str(plain_run), "--core", "2:4", "--out", str(plain_run.parent / "x[1]")]) == 2
    err = capsys.readouterr().err
    assert f"error: --out {plain_run.parent / 'x[1]'}: the run directory" in err and "loaded" not in err, err
    assert "choose another --out" in err and not (plain_run.parent / "x[1]").exists()


def test_convert_with_drop_does_not_claim_the_plain_models_function(plain_run, capsys):
    """#27 pass 33: `convert --drop` said "at 1 loop it computes what the plain model did", and the dropped layers
    change it (the loss at 1 loop differs): the line names the dropped layers."""
    out = plain_run.parent / "plain_dropped"
    assert main(["convert", "--run", str(plain_run), "--core", "2:4", "--drop", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "at 1 loop it computes what the plain model did without layers [1] (dropped: not the same function); " \
           "train on with" in text
    plain = cli_json(capsys, "eval", "--run", str(plain_run), "--examples", "40")["rows"]
    one = cli_json(capsys, "eval", "--run", str(out), "--examples", "40", "--loops", "X=1")["rows"]
    assert one[0]["loss"] != pytest.approx(plain[0]["loss"], abs=1e-5)
    assert main(["convert", "--run", str(plain_run), "--core", "2:4", "--out", str(plain_run.parent / "kept1")]) == 0
    assert "at 1 loop it computes what the plain model did; train on with" in capsys.readouterr().out


@pytest.mark.slow
def test_a_plain_model_trains_and_its_conversion_trains_on(tmp_path, capsys):
    """model.stages: [] trains like any config; a converted run resumes from its step 0 with a new loop
    schedule (logged as a schedule change)."""
    cfg = tiny_config(tmp_path, "plain_train", *PLAIN, "eval.sweep_loops=[1, 2]")  # the quickstart's sweep, kept
    result = train(cfg)
    assert result.step == 3 and all(np.isfinite(m["loss"]) for m in result.eval.values())
    assert "no final sweep: eval.sweep_loops=[1, 2] sweeps circuits' loop counts" in capsys.readouterr().out
    assert not (cfg.run_dir / "final_sweep.json").exists()  # was a table of identical rows "loops 1", "loops 2"
    assert main(["convert", "--run", str(cfg.run_dir), "--core", "1:5", "--out", "conv", "--inject", "concat"]) == 0
    capsys.readouterr()
    conv = load_config(tmp_path / "conv" / "config.yaml", ["model.stages.0.circuits.X.loops=uniform(1, 2)",
                                                           "model.stages.0.circuits.X.max_loops=4"])
    result = train(conv)
    assert result.step == 3
    assert "loops of X: uniform(1, 4) -> uniform(1, 2) from step 0" in capsys.readouterr().out


def test_convert_leaves_nothing_behind_on_a_full_disk_or_sigterm(plain_run, capsys, monkeypatch):
    """A full disk during `convert` (or `import`: one writer, loopformer.train.newrun.write_run) flooded the
    terminal with the checkpoint library's tracebacks and left a half-written run; SIGTERM left it too. Now:
    one line, or "terminated" with status 143, and neither the run nor its temporary folder on disk."""
    import os
    import shutil
    import signal

    from loopformer.runs import checkpoint

    def nothing_written(name):
        assert not (plain_run.parent / name).exists()
        assert not [p.name for p in plain_run.parent.iterdir() if ".partial-" in p.name]

    before = signal.getsignal(signal.SIGTERM)
    real = shutil.disk_usage
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    assert main(["convert", "--run", str(plain_run), "--core", "2:4", "--out", "full"]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if not x.startswith("loaded ")]
    # #27 pass 21: the disk is named by --out's parent, which is there to run `df -h` on (it named the removed
    # FULL/checkpoints)
    assert re.fullmatch(rf"error: --out {plain_run.parent / 'full'}: not saving step 0: {plain_run.parent} has 0.0 MiB "
                        rf"free and the checkpoint takes [\d.]+ MiB; free some space \(df -h {plain_run.parent}\) and "
                        r"run the command again; nothing was written", line), line
    nothing_written("full")
    monkeypatch.undo()

    def killed(self, *a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` or a scheduler would, mid-save
        time.sleep(5)  # the handler interrupts this
    monkeypatch.setattr(checkpoint.Checkpoints, "save", killed)
    assert main(["convert", "--run", str(plain_run), "--core", "2:4", "--out", "killed"]) == 143
    assert capsys.readouterr().err.strip().endswith("terminated")
    nothing_written("killed")
    assert signal.getsignal(signal.SIGTERM) is before  # the command line's handler is removed again


def test_loop_flags_on_a_plain_run_say_it_has_no_circuits(plain_run, capsys):
    """A plain run's refusals ended in "this run's circuits are " and nothing."""
    assert main(["eval", "--run", str(plain_run), "--loops", "X=2"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "unknown circuit 'X' in --loops X=2; this run has no circuits (a plain transformer: nothing loops)")
