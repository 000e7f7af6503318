"""End-to-end training: bit-exact resume, what a resume may change (the loop schedule) and may not
(the architecture), run-dir errors, older layouts, halting and routed models, and (slow) tiny runs that
learn. Most tests start from the session's `trained_run` (tests/conftest.py) or train its config again,
so their programs come from the compilation cache."""

import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from loopformer.config import load_config
from loopformer.errors import CheckpointError, ConfigError
from loopformer.flops import peak_flops
from loopformer.runs.checkpoint import Checkpoints
from loopformer.runs.layout import RunDir
from loopformer.runs.restore import restore_params
from loopformer.runs.scalars import read_metrics, read_tensorboard_scalars
from loopformer.train import trainer
from loopformer.train.trainer import train
from tests.conftest import TASK_DEFAULTS, copy_run, tiny_config, train_until_crash, trained_config

# The learning tests' model: one 32-wide circuit (their measured losses are for it).
LEARNER = [
    "model.d_model=32", "model.mlp_ratio=2", "model.stages=[{circuits: [{name: X, width: 32, heads: 2, mlp_ratio: 2, "
    "loops: 'uniform(1, 3)', eval_loops: 2, backprop: 2}]}]", "data.eval_examples=64", "train.log_every=1",
    "eval.diagnostics=true",
]


def losses(run_dir):
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def test_resume_is_bit_exact(tmp_path, monkeypatch, trained_run):
    """A run that crashes after its step-2 checkpoint and is restarted ends bit-identical to the
    uninterrupted `trained_run` (same losses, same eval, same parameters)."""
    straight = trained_run
    train_until_crash(trained_config(tmp_path, "b"), 3, monkeypatch)
    resumed = train(trained_config(tmp_path, "b"))
    a, b = losses(straight.run_dir), losses(resumed.run_dir)
    assert sorted(a) == list(range(1, 5)) and set(b) == set(range(1, 5))
    # Issue #17.8: step 3, logged before the crash and trained again, appears once (not twice).
    assert [r["step"] for r in read_metrics(resumed.run_dir) if "train/loss" in r] == list(range(1, 5))
    assert [a[s] for s in (3, 4)] == [b[s] for s in (3, 4)]  # exact, not approximate
    assert straight.eval == resumed.eval
    _, params_a, step_a = restore_params(trained_config(straight.run_dir.parent))
    _, params_b, step_b = restore_params(trained_config(tmp_path, "b"))
    assert step_a == step_b == 4
    for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_run_whose_checkpoints_were_deleted_is_not_mixed_with_a_new_one(tmp_path, trained_run, monkeypatch):
    """Issue #27.10: metrics.jsonl and tb/ without checkpoints/ are refused in one line, nothing touched."""
    run_dir = copy_run(trained_run, tmp_path, "orphan")
    shutil.rmtree(run_dir / "checkpoints")
    before = (run_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(CheckpointError, match=r"holds metrics.jsonl and tb of an earlier run but no checkpoints/ to "
                                              r"resume from \(deleted\?\); .* Move them aside"):
        train(trained_config(tmp_path, "orphan"))
    assert (run_dir / "metrics.jsonl").read_bytes() == before and not (run_dir / "checkpoints").exists()
    # a trainer killed before its first checkpoint left metrics and an empty checkpoints/: a rerun starts over
    train_until_crash(trained_config(tmp_path, "early"), 1, monkeypatch)
    assert (tmp_path / "early" / "metrics.jsonl").exists() and not list((tmp_path / "early" / "checkpoints").iterdir())
    assert train(trained_config(tmp_path, "early")).step == 4


def test_a_run_whose_config_or_checkpoints_folder_is_damaged_is_one_line(tmp_path, trained_run, capsys):
    """#27 pass 8: a run with checkpoints whose config.yaml was deleted, is a folder or a symlink loop resumed
    with no check of the architecture or task; a binary config.yaml was a UnicodeDecodeError traceback (train and
    every analysis command); a file named checkpoints was a FileExistsError traceback; a damaged checkpoint's
    metadata printed an ERROR:absl record above the one line."""
    from loopformer.cli import main

    for name, damage, message in [
        ("gone", lambda c: c.unlink(), r"holds checkpoints \(step 4\) but its config.yaml is missing, so nothing says"),
        ("folder", lambda c: (c.unlink(), c.mkdir()), r"holds checkpoints \(step 4\) but its config.yaml is not a "
                                                      r"readable file"),
        ("loop", lambda c: (c.unlink(), c.symlink_to(c)), r"its config.yaml is not a readable file"),
        ("binary", lambda c: c.write_bytes(b"\xab\xcd" * 50), r"config.yaml is corrupt \(not UTF-8 text: bad byte at "
                                                             r"offset 0\); delete .* to start over"),
    ]:
        run_dir = copy_run(trained_run, tmp_path, name)
        damage(run_dir / "config.yaml")
        before = sorted(p.name for p in run_dir.iterdir())
        with pytest.raises(CheckpointError, match=message):
            train(trained_config(tmp_path, name, "train.steps=6"))
        assert sorted(p.name for p in run_dir.iterdir()) == before and RunDir(run_dir).checkpoint_steps() == [2, 4]
    assert main(["eval", "--run", str(tmp_path / "binary")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    run_dir = copy_run(trained_run, tmp_path, "afile")
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "metrics.jsonl").unlink()
    shutil.rmtree(run_dir / "tb", ignore_errors=True)
    (run_dir / "checkpoints").write_text("mine")
    with pytest.raises(CheckpointError, match=r"checkpoints is a file, where the run keeps its checkpoints \(a folder\)"):
        train(trained_config(tmp_path, "afile"))
    assert (run_dir / "checkpoints").read_text() == "mine"
    run_dir = copy_run(trained_run, tmp_path, "meta")
    for f in (run_dir / "checkpoints" / "4").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\xcb" * 20)
    capsys.readouterr()
    assert main(["eval", "--run", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if not line.startswith("loaded ")] == [err[-1]], err
    assert err[-1].startswith("error: checkpoint step 4 in ")
    assert "is corrupt or incomplete (cannot read its metadata" in err[-1]


@pytest.mark.parametrize("name, folder", [("metrics.jsonl", True), ("config_changes.jsonl", True),
                                          ("tokenizer.json", True), ("final_sweep.json", True), ("tb", False)])
def test_a_run_file_of_the_wrong_kind_is_one_line_before_training(tmp_path, trained_run, name, folder):
    """#27 pass 14: a resume where metrics.jsonl, config_changes.jsonl or tokenizer.json is a folder, or tb a file,
    was a traceback (IsADirectoryError, FileExistsError); a folder named final_sweep.json was found after the
    training, as "make it writable"."""
    run_dir = copy_run(trained_run, tmp_path, "kind")
    path = run_dir / name
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    path.mkdir() if folder else path.write_text("mine")
    want = ("folder", "file") if folder else ("file", "folder")
    with pytest.raises(CheckpointError, match=rf"{name} is a {want[0]}, where the run keeps its {name} \(a {want[1]}"):
        train(trained_config(tmp_path, "kind", "train.steps=6"))
    assert RunDir(run_dir).checkpoint_steps() == [2, 4] and path.is_dir() == folder


@pytest.mark.parametrize("name", ["metrics.jsonl", "config_changes.jsonl", "final_sweep.json"])
def test_a_run_file_that_is_a_fifo_is_one_line_before_training(tmp_path, trained_run, name):
    """#27 pass 16: a resume where metrics.jsonl was a FIFO waited forever for a writer, printing nothing (the
    check above took only a folder for a file)."""
    run_dir = copy_run(trained_run, tmp_path, "fifo")
    path = run_dir / name
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    with pytest.raises(CheckpointError, match=rf"{name} is a pipe or a device, where the run keeps its {name} \(a file"):
        train(trained_config(tmp_path, "fifo", "train.steps=6"))
    assert RunDir(run_dir).checkpoint_steps() == [2, 4]


@pytest.mark.parametrize("name", ["metrics.jsonl", "config_changes.jsonl", "tb"])
def test_a_run_file_that_is_a_dangling_symlink_is_one_line_before_training(tmp_path, trained_run, name):
    """#27 pass 25: a resume where metrics.jsonl was a symlink to nothing rewrote config.yaml, then was a
    FileNotFoundError traceback from the metrics writer; a dangling tb, a traceback from its mkdir (a dangling link
    is now named as a FIFO or a folder there is)."""
    run_dir = copy_run(trained_run, tmp_path, "dangling")
    path = run_dir / name
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    path.symlink_to(tmp_path / "gone" / name)
    config, kind = (run_dir / "config.yaml").read_text(), "folder" if name == "tb" else "file"
    with pytest.raises(CheckpointError, match=rf"{name} is a symlink that leads nowhere \(or in a loop\), where the run "
                                              rf"keeps its {name} \(a {kind}\); move it aside"):
        train(trained_config(tmp_path, "dangling", "train.steps=6"))
    assert RunDir(run_dir).checkpoint_steps() == [2, 4] and (run_dir / "config.yaml").read_text() == config


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_lock_file_that_is_a_fifo_or_a_folder_is_one_line(tmp_path, kind):
    """#27 pass 16: a .train.lock that is a FIFO was a traceback (OSError EINVAL, writing the holder), a folder
    IsADirectoryError."""
    from loopformer.runs.lock import lock_file, run_lock

    path = lock_file(tmp_path)
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    what = "a pipe or a device" if kind == "fifo" else "a folder"
    want = rf"\.train\.lock is {what}, where loopformer keeps a lock file; remove it$"
    with pytest.raises(ConfigError, match=want), run_lock(tmp_path, 0):
        pass


def test_continuing_with_more_steps(tmp_path, trained_run):
    """A larger train.steps continues a finished run from its last checkpoint."""
    copy_run(trained_run, tmp_path, "g")
    more = train(trained_config(tmp_path, "g", "train.steps=6"))
    assert more.step == 6 and sorted(losses(more.run_dir)) == list(range(1, 7))


def test_run_directory_contents(tmp_path, trained_run):
    run = trained_run.run_dir
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "4").is_dir()
    rows = read_metrics(run)
    assert {"step", "train/loss", "train/accuracy", "train/lr", "loops/X"} <= set(rows[0])
    assert any("eval/hard/accuracy" in r and "diag/X/rel_change" in r for r in rows)
    tb = read_tensorboard_scalars(run)
    assert [s for s, _ in tb["train/loss"]] == [1, 2, 3, 4]
    # Loop counts are sampled per step from uniform(1, 3).
    assert {r["loops/X"] for r in rows if "loops/X" in r} <= {1.0, 2.0, 3.0}
    # Already trained: a second call trains nothing and says so, and changes nothing in the run
    # (issue #17.12: its overrides used to be written into config.yaml). On a copy: the call writes.
    run = copy_run(trained_run, tmp_path, "c")
    saved, lines = (run / "config.yaml").read_text(), (run / "metrics.jsonl").read_text()
    again = train(trained_config(tmp_path, "c", "train.lr=0.5", "model.stages.0.circuits.X.eval_loops=3"))
    assert again.step == 4 and len(losses(run)) == 4
    assert (run / "config.yaml").read_text() == saved and (run / "metrics.jsonl").read_text() == lines
    assert not (run / "config_changes.jsonl").exists()


def test_eval_every_zero_trains_without_evaluating(tmp_path):
    """train.eval_every=0: no evaluation during training or at its end (the checkpoint is still written)."""
    result = train(trained_config(tmp_path, "n", "train.eval_every=0"))
    assert result.eval == {} and (result.run_dir / "checkpoints" / "4").is_dir()
    assert not any(k.startswith("eval/") for r in read_metrics(result.run_dir) for k in r)
    assert train(trained_config(tmp_path, "n", "train.eval_every=0")).eval == {}  # already trained


def test_refuses_to_resume_a_different_architecture_or_task(tmp_path, trained_run):
    copy_run(trained_run, tmp_path, "d")
    with pytest.raises(CheckpointError, match=r"different architecture \(model.prelude: 1 -> 2\)"):
        train(trained_config(tmp_path, "d", "train.steps=6", "model.prelude=2"))
    with pytest.raises(CheckpointError, match=r"different architecture \(model.stages.0.circuits.X.heads: 2 -> 4\)"):
        train(trained_config(tmp_path, "d", "train.steps=6", "model.stages.0.circuits.X.heads=4"))
    with pytest.raises(CheckpointError, match=r"different task \(data.task_args.num_nodes: 5 -> 6\)"):
        train(trained_config(tmp_path, "d", "train.steps=6", "data.task_args={num_nodes: 6, num_symbols: 6}"))
    # Changing only the training length is a continuation, not a different run.
    assert train(trained_config(tmp_path, "d", "train.steps=6")).step == 6


def test_resume_may_change_the_loop_schedule(tmp_path, capsys, trained_run):
    """A loop curriculum: the loop distribution, eval count and truncation change on resume, are logged,
    recorded in config_changes.jsonl, and the new distribution is what the resumed steps sample."""
    copy_run(trained_run, tmp_path, "s")
    more = ["train.steps=6", "model.stages.0.circuits.X.loops=uniform(7, 9)",
            "model.stages.0.circuits.X.eval_loops=8", "model.stages.0.circuits.X.backprop=2",
            "model.stages.0.circuits.X.window=3"]
    result = train(trained_config(tmp_path, "s", *more))
    out = capsys.readouterr().out
    assert "loops of X: uniform(1, 3) -> uniform(7, 9) from step 4" in out
    assert "eval_loops of X: 2 -> 8 from step 4" in out and "window of X: 0 -> 3 from step 4" in out
    assert "backprop of X: 1 -> 2 from step 4" in out
    (record,) = [json.loads(line) for line in (result.run_dir / "config_changes.jsonl").read_text().splitlines()]
    assert record["step"] == 4
    assert {c["path"]: c["part"] for c in record["changes"]}["model.stages.0.circuits.X.loops"] == "schedule"
    counts = {r["step"]: r["loops/X"] for r in read_metrics(result.run_dir) if "loops/X" in r}
    assert {counts[s] for s in range(1, 5)} <= {1, 2, 3} and {counts[s] for s in (5, 6)} <= {7, 8, 9}


def test_older_layouts_give_one_clear_line(tmp_path):
    """Runs written before circuits were stored by name: the config (read/write fields) or the
    checkpoint (stages/S/groups/G) says so, instead of a traceback."""
    cfg = tiny_config(tmp_path, "old", "train.steps=2")
    run = cfg.run_dir
    (run / "checkpoints").mkdir(parents=True)
    with Checkpoints(run / "checkpoints", async_save=False) as ckpts:
        ckpts.save(2, {"params": {"stages": {"0": {"groups": {"0": {"write": np.zeros((2, 3))}}}}},
                       "step": np.asarray(2)})
    (run / "config.yaml").write_text(cfg.to_yaml())
    with pytest.raises(CheckpointError, match=r"checkpoint step 2 in .* comes from an older loopformer layout"):
        restore_params(cfg)
    old = cfg.to_dict()
    old["model"]["stages"][0]["circuits"][0] |= {"read": "slice", "write": "slice"}
    (run / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(CheckpointError, match=r"old comes from an older loopformer layout .* retrain"):
        train(cfg)


def test_unwritable_run_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"run\.dir / run\.name: .*/file is a file, not a directory; set run\.dir="):
        train(tiny_config(tmp_path, "x", f"run.dir={blocker}"))


def test_corrupt_checkpoint_is_reported(tmp_path, trained_run):
    run = copy_run(trained_run, tmp_path, "e")
    for f in (run / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "d" in f.parent.name:
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        train(trained_config(tmp_path, "e", "train.steps=6"))


def test_a_renamed_checkpoint_folder_is_refused(tmp_path, trained_run):
    """A step folder renamed (4 -> 9) was listed as step 9 by inspect while eval said "loaded at step 4", and
    training resumed with the step counter at 4; both now read it as a damaged checkpoint."""
    from loopformer.runs.restore import restore_params

    run = copy_run(trained_run, tmp_path, "renamed")
    (run / "checkpoints" / "4").rename(run / "checkpoints" / "9")
    line = r"checkpoint step 9 in .* is corrupt or incomplete \(its folder is named 9, but it holds the state of step 4\)"
    with pytest.raises(CheckpointError, match=line):
        restore_params(trained_config(tmp_path, "renamed"))
    with pytest.raises(CheckpointError, match=line):
        train(trained_config(tmp_path, "renamed", "train.steps=12"))


def test_a_second_trainer_on_a_run_directory_stops(tmp_path, monkeypatch):
    """Issue #17.1: two trainers on one run directory both exited 0 (the first one's checkpoints lost,
    metrics interleaved, config.yaml overwritten). A trainer started while another one trains the
    directory now stops at once with one line, before touching anything; the first one is unharmed."""
    args = ["train.eval_every=0"]  # trained_run's steps and checkpoints: its compiled programs
    real = trainer.make_train_step
    second: list[BaseException] = []

    def with_a_second_trainer(*a, **k):
        step_fn = real(*a, **k)

        def step(state, batch):
            if int(state["step"]) == 2 and not second:
                try:
                    train(trained_config(tmp_path, "lock", *args, "train.lr=5e-3"))
                except ConfigError as e:
                    second.append(e)
            return step_fn(state, batch)
        return step

    monkeypatch.setattr(trainer, "make_train_step", with_a_second_trainer)
    first = train(trained_config(tmp_path, "lock", *args))
    assert len(second) == 1
    assert re.fullmatch(rf".*lock is being trained by another process \(pid {os.getpid()} on .*\); wait for it to "
                        r"finish \(or stop it\), or set run.name=<another name> to start a separate run", str(second[0]))
    run = first.run_dir
    lr = yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"]
    assert lr == trained_config(tmp_path, "lock").train.lr != 5e-3
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r] == [1, 2, 3, 4]
    assert Checkpoints(run / "checkpoints").all_steps() == [2, 4]
    monkeypatch.setattr(trainer, "make_train_step", real)
    assert train(trained_config(tmp_path, "lock", "train.steps=6", *args)).step == 6  # released on exit


def test_the_run_lock_dies_with_its_process(tmp_path):
    """The lock is the kernel's (flock), not a pid file: a trainer killed with SIGKILL leaves no lock
    behind. Other processes of a multi-process run lock files of their own."""
    from loopformer.runs.lock import lock_file, run_lock

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from loopformer.runs.lock import run_lock\n"
         "with run_lock(sys.argv[1], process=0):\n    print('locked', flush=True); time.sleep(600)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"is being trained by another process \(pid {holder.pid} on "), \
                run_lock(tmp_path, process=0):
            pass
        with run_lock(tmp_path, process=1) as path:  # process 1 of a multi-process run: its own file
            assert path == lock_file(tmp_path, 1) and path.name == ".train.lock.1"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_lock(tmp_path, process=0) as path:  # the kill released it; the stale file is harmless
        assert path.is_file()


@pytest.mark.parametrize("content", [b"[1, 2]", b'"pid"', b'{"pid": 1}', b"\xff"])
def test_a_lock_file_written_by_something_else_still_names_the_busy_run(tmp_path, content):
    """The next trainer reads the holder's pid, host and start from the lock file: one that holds other JSON (a
    list: a traceback, "list indices must be integers") is a busy run without a holder."""
    import fcntl

    from loopformer.runs.lock import lock_file, run_lock

    fd = os.open(lock_file(tmp_path), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, content)
        with pytest.raises(ConfigError, match=r"is being trained by another process; wait"), run_lock(tmp_path, 0):
            pass
    finally:
        os.close(fd)


def test_divergence_stops_before_a_checkpoint_is_written(tmp_path):
    """Issue #17.2: NaN was only checked at log steps, so with the default log_every NaN checkpoints were
    written and rotated the finite ones out; the rerun resumed NaN. Now each step's finite flag is
    checked (on device, synced only at log/eval/checkpoint steps) before anything is saved: the run
    stops naming the step, every checkpoint on disk is finite, and a rerun with a lower lr resumes."""
    args = ["train.lr=1e6", "train.steps=6", "train.checkpoint_every=2", "train.log_every=50", "train.eval_every=0",
            "train.keep_checkpoints=2"]
    with pytest.raises(FloatingPointError, match=r"training diverged at step (\d+): the loss or gradient is NaN or "
                       r"inf; nothing from it was saved \(the last checkpoint, step \d+, is kept") as info:
        train(tiny_config(tmp_path, "nan", *args))
    bad = int(re.search(r"step (\d+)", str(info.value)).group(1))
    run = tmp_path / "nan"
    steps = Checkpoints(run / "checkpoints").all_steps()
    assert steps and max(steps) < bad
    _, params, _ = restore_params(tiny_config(tmp_path, "nan", *args))  # restore also refuses non-finite values
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    assert all(np.isfinite(v) for r in read_metrics(run) for k, v in r.items() if k != "step")
    with pytest.raises(FloatingPointError, match=rf"diverged at step {bad}"):  # the same lr diverges again
        train(tiny_config(tmp_path, "nan", *args))
    assert Checkpoints(run / "checkpoints").all_steps() == steps
    fixed = train(tiny_config(tmp_path, "nan", *args[1:]))  # the tiny config's lr, 0.03
    assert fixed.step == 6


def test_the_corrupt_checkpoint_advice_works(tmp_path, capsys, trained_run):
    """Issue #17.9: the error for a corrupt checkpoint suggested `step=50`, which the trainer rejects.
    Now it gives a shell command; running it lets training resume from the step before, and the
    analysis commands read that step with the --step it names."""
    from loopformer.cli import main

    run = copy_run(trained_run, tmp_path, "bad")  # checkpoints at 2 and 4
    # One bit of one stored parameter changed on disk (written back through orbax: the byte a position
    # picks in a chunk file of this small model may lie where restoring never reads, or under orbax's own CRC).
    state_dir = run / "checkpoints" / "4" / "state"
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(state_dir)
    leaves, treedef = jax.tree.flatten(state["params"])
    first = np.array(leaves[0])
    first.view(f"u{first.itemsize}").flat[0] ^= 1
    state["params"] = jax.tree.unflatten(treedef, [first, *leaves[1:]])
    shutil.rmtree(state_dir)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(state_dir, state)
    with pytest.raises(CheckpointError) as info:
        train(trained_config(tmp_path, "bad", "train.steps=6", "train.eval_every=0"))
    msg = str(info.value)
    assert "checkpoint step 4" in msg and "does not match the checksum" in msg and "step=" not in msg
    flag = re.search(r"with (--step \d+)\)", msg).group(1)
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "bad"), *flag.split(), "--examples", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2
    command = re.search(r"\((rm -r [^)]*)\)", msg).group(1)
    subprocess.run(command, shell=True, check=True)
    resumed = train(trained_config(tmp_path, "bad", "train.steps=6", "train.eval_every=0"))
    assert resumed.step == 6 and "resumed" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(resumed.run_dir) if "train/loss" in r] == list(range(1, 7))


@pytest.mark.slow  # 300 steps
def test_tiny_run_learns(tmp_path):
    """One-hop pointer chasing over 6 symbols (one token per edge): chance loss is ln(6) ~ 1.79 on
    the answer token; 300 steps take it to ~1.2 (measured 1.226), accuracy ~30-50% vs 1/6 chance."""
    cfg = tiny_config(tmp_path, "learn", *LEARNER, "train.steps=300", "train.checkpoint_every=300", "train.lr=3e-3",
                      "train.warmup_steps=10", "data.task_args={num_nodes: 5, num_symbols: 6, edge_tokens: true}",
                      "data.train_difficulty=[1, 1]", "data.eval_splits={train: [1, 1]}", "train.eval_every=300",
                      "train.log_every=25", "data.batch_size=32")
    result = train(cfg)
    assert result.eval["train"]["loss"] < 0.75 * math.log(6)
    assert result.eval["train"]["accuracy"] > 0.25
    first = json.loads((cfg.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["train/loss"] > 1.2  # it started near chance


def test_final_sweep_moves_only_the_chosen_circuits(tmp_path, capsys):
    """X swept at 1 and 8 with Y at its eval_loops, then (X trained per_difficulty(2, 4)) the row "auto":
    X at its rule per example."""
    cfg = load_config("configs/quickstart.yaml", ["eval.sweep_loops=[1, 8]", "eval.sweep_circuits=[X]"])

    class Recorder:  # stands in for the Evaluator: records the loop counts each evaluation asks for
        calls: list = []

        def evaluate(self, params, batches, loops, by_difficulty=None):
            rules = {c: r[:2] for c, r in (by_difficulty or {}).items()}
            self.calls.append((dict(loops), rules))
            return {"loss": 0.5, "accuracy": 0.95 if rules else loops["X"] / 10, "token_accuracy": 1.0,
                    "examples": 4, "mean_loops": dict(loops), "computed_loops": dict(loops)}

    rows = trainer.final_sweep(Recorder(), None, {"train": [], "2x": []}, cfg)
    # per split; Y stays at its eval_loops
    assert Recorder.calls == ([({"X": 1, "Y": 2}, {})] * 2 + [({"X": 8, "Y": 2}, {})] * 2
                              + [({"X": 20, "Y": 2}, {"X": (2, 4)})] * 2)
    assert [(r["loops"], r["split"], r["accuracy"]) for r in rows] == [
        (1, "train", 0.1), (1, "2x", 0.1), (8, "train", 0.8), (8, "2x", 0.8), ("auto", "train", 0.95),
        ("auto", "2x", 0.95)]
    out = capsys.readouterr().out
    assert "accuracy vs loop count (X at n; training mean per_difficulty(2, 4)" in out and "80.0%" in out
    assert "auto" in out and "95.0%" in out


@pytest.mark.slow  # 200 steps
def test_tiny_bidirectional_maze_run_learns(tmp_path):
    """A bidirectional (model.causal=false) run on 1-3 column mazes: room labels are YES for 60 % of
    rooms (always-YES scores 0.60, loss ln 2 ~ 0.69 at chance); 200 steps reach loss 0.28 and 86 %
    per room (measured), 62 % of mazes exactly."""
    cfg = tiny_config(tmp_path, "maze", *LEARNER, "train.steps=200", "train.checkpoint_every=200", "train.lr=3e-3",
                      "train.warmup_steps=10", "model.causal=false", "model.stages.0.circuits.X.window=4",
                      "data.task=maze", "data.task_args={}", "data.train_difficulty=[1, 3]",
                      "data.eval_splits={train: [1, 3]}", "train.eval_every=200", "train.log_every=50",
                      "data.batch_size=32", "model.stages.0.circuits.X.loops=uniform(2, 4)",
                      "model.stages.0.circuits.X.eval_loops=3")
    ev = train(cfg).eval["train"]
    assert ev["loss"] < 0.6 * math.log(2)
    assert ev["token_accuracy"] > 0.75 and ev["accuracy"] > 0.4


@pytest.mark.parametrize("extra", [
    ["model.stages.0.circuits.X.halting.kind=ouro", "model.stages.0.circuits.X.max_loops=4"],
    ["model.stages.0.circuits.X.halting.kind=pondernet", "model.stages.0.circuits.X.max_loops=4"],
    ["model.stages.0.circuits.X.halting.kind=act", "model.stages.0.circuits.X.max_loops=4"],
    ["model.stages.0.router.kind=token_choice", "model.stages.0.router.compute=0.01",
     "model.stages.0.circuits.X.max_loops=4", "model.stages.0.circuits.Y.max_loops=4"],
], ids=["ouro", "pondernet", "act", "router"])
def test_halting_and_routed_models_train(tmp_path, capsys, extra):
    """The loss terms of a halting head or a router train end to end, and the logged numbers are what they
    are made of: a router's objective is the CE plus its auxiliary loss, ACT's the CE plus tau x its ponder
    cost, and Ouro's or PonderNet's the CE itself at a step that ran X once (one exit step: no entropy, no
    KL). Evaluation reports the loops used (X's eval_loops, 2, when nothing stops it early), and a halting
    model's logged learned exit is what `loopformer eval --exit X=learned` computes from the checkpoint."""
    from loopformer.cli import main

    cfg = tiny_config(tmp_path, "h", "train.log_every=1", *extra)
    result = train(cfg)
    rows = read_metrics(result.run_dir)
    steps = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(np.isfinite(r["train/loss"]) for r in steps)
    assert 0 < result.eval["hard"]["mean_loops/X"] <= 4
    kind = cfg.model.stages[0].circuits[0].halting.kind
    if kind == "none":  # the router
        for r in steps:
            assert r["train/aux_loss"] > 0
            assert r["train/objective"] == pytest.approx(r["train/loss"] + r["train/aux_loss"], rel=1e-5)
        return
    assert all("train/halting/steps" in r for r in steps)
    if kind == "act":
        tau = cfg.model.stages[0].circuits[0].halting.tau
        for r in steps:
            assert r["train/objective"] == pytest.approx(r["train/loss"] + tau * r["train/halting/ponder"], rel=1e-5)
        assert "eval/hard/learned/accuracy" not in rows[-1]  # ACT evaluates with its own halting
        return
    once = [r for r in steps if r["loops/X"] == 1]
    assert once  # step 1 samples X = 1 (seed 0)
    for r in once:
        assert r["train/halting/steps"] == 1 and r["train/objective"] == pytest.approx(r["train/loss"], rel=1e-6)
    assert result.eval["hard"]["mean_loops/X"] == 2  # no exit rule: every token runs X's eval_loops
    capsys.readouterr()
    assert main(["eval", "--run", str(result.run_dir), "--exit", "X=learned:q=0.5", "--max-loops", "2", "--split",
                 "hard", "--examples", "16", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["accuracy"] == rows[-1]["eval/hard/learned/accuracy"]
    assert row["mean_loops"]["X"] == pytest.approx(rows[-1]["eval/hard/learned/mean_loops"], rel=1e-6)
    assert 1 <= row["mean_loops"]["X"] < 2  # some tokens stop after one iteration


def test_a_model_too_big_for_memory_is_one_line_before_anything_is_allocated(tmp_path):
    """model.d_model=1000000 hung in XLA waiting for memory (ignoring SIGTERM) after writing the run's config."""
    cfg = load_config("configs/plain_parity.yaml", [f"run.dir={tmp_path}", "model.d_model=1000000", "train.steps=2"])
    with pytest.raises(ConfigError, match=r"^the model has [\d,]+ parameters: its training state \(4 float32 copies: "
                                          r"params, gradient, AdamW's two moments\) takes [\d,.]+ GiB, more than the "
                                          r"[\d,]+ GiB of memory here; lower model.d_model or the layer counts$"):
        train(cfg)
    assert not (tmp_path / cfg.run.name / "config.yaml").exists()


def test_a_stop_whose_exception_was_dropped_ends_training_at_the_next_step(tmp_path):
    """A SIGTERM whose exception Python dropped (a gc callback) let a trainer run all its steps; the command
    line records it (`loopformer.runs.stop`) and the step loop checks it, so training stops at the next step."""
    import signal

    from loopformer.runs import stop

    cfg = tiny_config(tmp_path, "stopped", "train.steps=50")
    stop.request(signal.SIGTERM)
    try:
        with pytest.raises(stop.Terminated):
            train(cfg)
    finally:
        stop.clear()
    assert RunDir(cfg.run_dir).checkpoint_steps() == []  # stopped before the first step


def test_a_disk_too_full_for_one_checkpoint_is_refused_before_the_first_step(tmp_path, monkeypatch, trained_run):
    """A full disk trained until the first checkpoint, then refused it (the steps were lost): the free space is
    checked against one checkpoint before any step, naming the run directory; nothing of the run is written."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=5000))
    cfg = tiny_config(tmp_path, "full")
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(cfg.run_dir))} has 0.0 MiB free and one checkpoint of "
                                              rf"this run takes [\d.]+ MiB; free some space \(df -h "
                                              rf"{re.escape(str(cfg.run_dir.parent))}\) or set run.dir=<a disk with "
                                              rf"room>, then train again$"):
        train(cfg)
    assert not cfg.run_dir.exists()  # the folder this call made (checkpoints/ and the lock) is not left behind
    assert cfg.run_dir.parent.exists()  # what the line says to look at (it named the folder just removed)
    run = copy_run(trained_run, tmp_path, "more")  # a resume: its checkpoints are named as intact
    with pytest.raises(CheckpointError, match=r"then train again \(the checkpoints there, up to step 4, are intact\)$"):
        train(trained_config(tmp_path, "more", "train.steps=8"))
    assert RunDir(run).checkpoint_steps() == [2, 4]


def test_a_disk_that_fills_while_metrics_are_written_is_one_line(tmp_path, monkeypatch):
    """metrics.jsonl failing to flush on a full disk was a traceback (and another from closing it)."""
    from loopformer.runs.scalars import MetricsWriter

    def full(self, step, values):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(MetricsWriter, "scalars", full)
    cfg = tiny_config(tmp_path, "fills")
    with pytest.raises(CheckpointError, match=rf"^writing into {re.escape(str(cfg.run_dir))} failed \(No space left on "
                                              r"device\); free some space \(df -h .*fills\) and train again: it starts "
                                              r"again \(no checkpoint was written\)$"):
        train(cfg)


@pytest.mark.parametrize(("settings", "message"), [
    # an eval split's range past training's: its examples were built (a traceback from numpy at 20 digits, else
    # an out-of-memory one at the first evaluation) and nothing checked their length
    (["data.eval_splits={train: [1, 2], long: [1, 99999999999999999999]}"],
     r"^data.eval_splits \(sequences of [\d,]{27} tokens\): attention over .* lower data.eval_splits$"),
    (["data.eval_splits={train: [1, 2], long: [1, 5000]}", "data.eval_batch_size=100000000"],
     r"^data.eval_batch_size=100000000: attention over 5,00\d tokens in batches of 100,000,000 .* at 5,00\d tokens "
     r"\(data.eval_splits\) at most [\d,]+ fit: lower data.eval_batch_size$"),
    ([*TASK_DEFAULTS, "model.causal=false", "data.task=mixture", "data.mixture=[{task: prefix_parity, eval_splits: {a: [1, "
      "99999999999999999999]}}, {task: maze, task_args: {rows: 2}, train_difficulty: [1, 3], eval_splits: {t: [1, 3]}}]"],
     r"^data.mixture.prefix_parity.eval_splits \(sequences of [\d,]{27} tokens\): .* lower "
     r"data.mixture.prefix_parity.eval_splits$"),
    # a task's length is its difficulty: the line named data.seq_len, which a task refuses
    (["data.train_difficulty=[1, 100000]"],
     r"^data.train_difficulty \(sequences of [\d,]+ tokens\): .* lower data.train_difficulty$"),
    # #27 pass 12: a length the task's arguments set (addition's width) blamed data.train_difficulty, already [1, 4]
    (["data.task=addition", "data.task_args={aligned: true, width: 1000000}", "data.train_difficulty=[1, 4]",
      "data.eval_splits={train: [1, 4]}"],
     r"^data.task_args \(sequences of 3,000,004 tokens\): .* lower data.task_args$"),
    # #27 pass 38: a maze of 100,000,000 rows is too long at difficulty 1 (its task_args set it): the line said "lower
    # data.train_difficulty or data.batch_size" at [1, 1] and a batch of 1; not even one sequence fits, so no batch
    (["data.task=maze", "data.task_args={rows: 100000000}", "data.train_difficulty=[1, 1]", "data.batch_size=1",
      "data.eval_splits={train: [1, 4]}"],
     r"^data.task_args \(sequences of 100,000,001 tokens\): .* lower data.task_args$"),
    ([*TASK_DEFAULTS, "model.causal=false", "data.task=mixture", "data.mixture=[{task: prefix_parity}, {task: maze, "
      "task_args: {rows: 100000000}, train_difficulty: [1, 1], eval_splits: {t: [1, 1]}}]"],
     r"^data.mixture.maze.task_args \(sequences of 100,000,001 tokens\): .* lower data.mixture.maze.task_args$"),
])
def test_a_task_whose_sequences_cannot_fit_names_its_difficulty(tmp_path, settings, message):
    """#27 pass 7."""
    cfg = tiny_config(tmp_path, "long", "data.task=prefix_parity", "data.task_args={}", *settings)
    with pytest.raises(ConfigError, match=message):
        train(cfg)
    assert not cfg.run_dir.exists()


@pytest.mark.parametrize("field", ["data.batch_size", "data.eval_batch_size"])
def test_a_batch_whose_attention_cannot_fit_names_the_batch(tmp_path, field):
    """data.batch_size=100000000 blamed data.seq_len, with "at most 1 tokens fit": the batch is named, with the
    largest that fits at this data.seq_len (the length's setting: pointer_chase's is its task_args, #27 pass 12)."""
    cfg = tiny_config(tmp_path, "huge", f"{field}=100000000")
    accum = r" \(or raise train.grad_accum\)" if field == "data.batch_size" else ""
    with pytest.raises(ConfigError, match=rf"^{field}=100000000: attention over \d+ tokens in batches of 100,000,000 "
                                          rf"needs about [\d,]+ GiB, more than half of this machine's \d+ GiB; at "
                                          rf"[\d,]+ tokens \(data.(train_difficulty|eval_splits|task_args)\) at most "
                                          rf"[\d,]+ fit: lower {field}{accum}$"):
        train(cfg)
    assert not cfg.run_dir.exists()
    cfg.run_dir.mkdir(parents=True)  # a folder the user made is theirs: refused, it stays
    with pytest.raises(ConfigError, match=rf"^{field}=100000000"):
        train(cfg)
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == [".train.lock", "checkpoints"]


@pytest.mark.parametrize("code, fix", [(errno.EROFS, "make it writable to train it on, or set run.dir / run.name to "
                                                     "start a separate run"),
                                       (errno.ENOSPC, r"free some space \(df -h .*ro\) or set run.dir=<a disk with room>")])
def test_a_read_only_or_full_run_directory_names_its_own_fix(tmp_path, monkeypatch, trained_run, code, fix):
    """Resuming a read-only run was told to "set run.dir=<a writable directory>", which starts another run."""
    from pathlib import Path

    from loopformer.runs.prepare import make_run_dir

    copy_run(trained_run, tmp_path, "ro")
    cfg = trained_config(tmp_path, "ro", "train.steps=8")

    def refused(self, *a, **k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(Path, "write_text", refused)
    with pytest.raises(ConfigError, match=rf"^run.dir: cannot write to .*ro \({os.strerror(code)}\); {fix}$"):
        make_run_dir(cfg)


@pytest.mark.parametrize("value", ["abc", "0", "-1e9", "nan"])
def test_a_bad_peak_flops_setting_is_refused_before_the_run_is_written(value, tmp_path, monkeypatch):
    """#27 pass 17: LOOPFORMER_PEAK_FLOPS=abc was a ValueError traceback at the first logged step (0: a
    ZeroDivisionError; negative: a negative MFU), after the run directory was written."""
    monkeypatch.setenv("LOOPFORMER_PEAK_FLOPS", value)
    with pytest.raises(ConfigError, match=rf"^environment variable LOOPFORMER_PEAK_FLOPS='{value}' must be a finite "
                                          r"number of FLOP/s per device > 0"):
        train(tiny_config(tmp_path, "peak"))
    assert not (tmp_path / "peak").exists()


@pytest.mark.parametrize("value", ["1e-320", "989", "5e5"])
def test_a_peak_flops_below_any_device_is_refused_before_the_run_is_written(value, tmp_path, monkeypatch):
    """#27 pass 24's leftover: LOOPFORMER_PEAK_FLOPS=1e-320 is a finite number > 0, and the MFU it gave was infinite,
    written to metrics.jsonl as `Infinity` (not JSON); 989 (TFLOP/s meant) gave an MFU of thousands."""
    monkeypatch.setenv("LOOPFORMER_PEAK_FLOPS", value)
    with pytest.raises(ConfigError, match=rf"^environment variable LOOPFORMER_PEAK_FLOPS='{value}' is below 1e\+06 "
                                          r"FLOP/s per device, slower than any device \(it is in FLOP/s, not TFLOP/s"):
        train(tiny_config(tmp_path, "peak"))
    assert not (tmp_path / "peak").exists()


def test_an_mfu_past_100_percent_is_finite_json_and_warned_once(tmp_path, monkeypatch, capsys):
    """#27 pass 24's leftover: a peak below the device's own (but above the floor) gives an MFU past 1; each record of
    metrics.jsonl stays strict JSON, and the trainer says once that the peak is too low."""
    monkeypatch.setenv("LOOPFORMER_PEAK_FLOPS", "1e6")
    peak_flops.cache_clear()
    try:
        train(tiny_config(tmp_path, "mfu", "train.steps=2", "train.log_every=1", "train.eval_every=0",
                          "eval.sweep_loops=[]"))
    finally:
        peak_flops.cache_clear()

    def strict(token):
        raise ValueError(token)

    lines = (tmp_path / "mfu" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=strict) for line in lines]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["train/mfu"]) for r in records)
    out = capsys.readouterr().out
    assert out.count("warning: train/mfu is") == 1 and "LOOPFORMER_PEAK_FLOPS=1e6 is below what this device does" in out


@pytest.mark.parametrize("part", ["checkpoints", "checkpoints/4", "tb", "metrics.jsonl", "config.yaml",
                                  "config_changes.jsonl", "final_sweep.json", ".train.lock"])
def test_a_read_only_part_of_a_run_is_refused_before_any_training(tmp_path, monkeypatch, trained_run, part):
    """#27 pass 18, as a user other than root (chmod a-w): a read-only checkpoints/ hung the checkpoint library forever
    at the first save; metrics.jsonl, tb/ and .train.lock were PermissionError tracebacks; final_sweep.json was refused
    after the whole training; config.yaml was replaced, read-only or not; config_changes.jsonl was a traceback after
    the run's files were checked."""
    from pathlib import Path

    run = copy_run(trained_run, tmp_path, "ro")
    (run / "final_sweep.json").write_text("{}")
    (run / "config_changes.jsonl").touch()
    ro, real = run / part, os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: not (Path(p) == ro and mode & os.W_OK) and real(p, mode, **k))
    steps = RunDir(run).checkpoint_steps()
    with pytest.raises((CheckpointError, ConfigError), match=rf"^{re.escape(str(ro))} is read-only for this user"):
        train(trained_config(tmp_path, "ro", "train.steps=8"))
    assert RunDir(run).checkpoint_steps() == steps and (run / "final_sweep.json").read_text() == "{}"


@pytest.mark.parametrize("part", ["checkpoints/4", "metrics.jsonl", "tokenizer.json"])
def test_a_part_of_a_run_this_user_may_not_read_names_a_fix_that_reads_it(tmp_path, monkeypatch, trained_run, part):
    """#27 pass 31, as a user other than root (chmod 000): an unreadable checkpoint step, metrics.jsonl or tokenizer.json
    was "read-only ... make it writable (chmod -R u+w RUN)", which left it unreadable: the fix makes it readable too."""
    from pathlib import Path

    run = copy_run(trained_run, tmp_path, "ro")
    (run / "tokenizer.json").write_text("{}")
    closed, real = run / part, os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != closed and real(p, mode, **k))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(closed))} cannot be read or written by this user, and "
                                              rf"training reads and writes it; make it readable and writable \(chmod -R "
                                              rf"u\+rwX {re.escape(str(run))}\) to train the run on, or pick a new "
                                              rf"run.name$"):
        train(trained_config(tmp_path, "ro", "train.steps=8"))


def test_a_checkpoint_folder_made_read_only_mid_run_is_one_line(tmp_path, monkeypatch, trained_run):
    """#27 pass 18: a save into a read-only checkpoints/ waited forever for the checkpoint library's failed writer."""
    from pathlib import Path

    run = copy_run(trained_run, tmp_path, "ro")
    ckpts, real = Checkpoints(RunDir(run).checkpoints), os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != RunDir(run).checkpoints and real(p, mode, **k))
    with pytest.raises(CheckpointError, match=r"^not saving step 9: .*checkpoints is read-only for this user; make it "
                                              r"writable \(chmod -R u\+w .*\) and run the command again \(the "
                                              r"checkpoints there, up to step 4, are intact\)$"):
        ckpts.save(9, {"w": np.ones(2, np.float32)})
    ckpts.close()


def test_an_unreadable_checkpoint_is_not_called_corrupt(tmp_path, monkeypatch, trained_run):
    """#27 pass 18, as a user other than root (chmod -R a-r): a step folder this user may not read was "corrupt or
    incomplete", with advice to delete it (rm -r), after a WARNING of the checkpoint library."""
    from pathlib import Path

    run = copy_run(trained_run, tmp_path, "ur")
    step_dir, real = RunDir(run).checkpoints / "4", os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != step_dir and real(p, mode, **k))
    with pytest.raises(CheckpointError, match=rf"^checkpoint step 4 in .* cannot be read by this user \({step_dir} is "
                                              rf"not readable\); make it readable \(chmod -R u\+rX {step_dir}\)$"):
        restore_params(load_config(run / "config.yaml"))


@pytest.mark.parametrize("inside", [("", "checkpoints"), ("checkpoints", "5"), ("", "inner")])
def test_a_run_inside_another_run_is_refused(tmp_path, trained_run, inside):
    """#27 pass 18: `run.dir=OUTER/checkpoints run.name=5` trained a run that OUTER then read as its corrupt step 5
    ("delete it (rm -r ...)"), and that its checkpoint pruning would delete; `run.dir=OUTER run.name=checkpoints` wrote
    a config, metrics and tb/ into OUTER's checkpoints/ (export, convert and import refused such an --out already)."""
    outer = copy_run(trained_run, tmp_path, "outer")
    folder, name = inside
    before = sorted(p.name for p in (outer / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match=rf"^run.dir / run.name {re.escape(str(outer / folder / name))} is inside the "
                                          rf"run {re.escape(str(outer))}; write it outside any run directory"):
        train(tiny_config(outer / folder, name))
    assert sorted(p.name for p in (outer / "checkpoints").iterdir()) == before and not (outer / "inner").exists()


def test_a_rerun_names_the_final_sweep_it_replaces(tmp_path):
    """#27 pass 40's leftover: a rerun of a trained run with other eval settings replaced final_sweep.json without a
    word; the line names what it held (the weights are unchanged: the earlier settings write it back)."""
    from loopformer.train.trainer import replaced_sweep

    path = tmp_path / "final_sweep.json"
    old = [{"loops": 2, "split": "train", "accuracy": 0.5}, {"loops": "auto", "split": "train", "accuracy": 0.5}]
    new = [{"loops": 3, "split": "train", "accuracy": 0.25}]
    assert replaced_sweep(path, new) is None  # no earlier sweep
    path.write_text(json.dumps(old))
    assert replaced_sweep(path, old) is None  # the same sweep again
    line = replaced_sweep(path, new)
    assert line.startswith("replaced final_sweep.json: it held loops 2, auto on train, now loops 3 on train"), line
    assert "its numbers changed" in replaced_sweep(path, [{**old[0], "accuracy": 0.75}, old[1]])
    path.write_text("not json")
    assert replaced_sweep(path, new) is None


def test_an_iteration_loss_whose_logits_cannot_fit_is_one_line(tmp_path, monkeypatch):
    """#27 pass 41: train.iteration_loss keeps the logits after each of its W iterations; past memory it was an
    out-of-memory traceback at the first step (126 GB for W=5000, now refused past the circuit's max_loops too)."""
    from loopformer.config import load_config
    from loopformer.train import trainer as T

    cfg = load_config("configs/text_bytes.yaml", ["data.seq_len=64", "train.iteration_loss=2", f"run.dir={tmp_path}",
                                                  "run.name=w"])
    rows = cfg.data.batch_size // cfg.train.grad_accum  # attention fits, the logits do not
    monkeypatch.setattr(T, "memory_bytes", lambda: 2 * max(rows * 64 * 64 * (16 * cfg.model.max_heads + 8),
                                                           rows * 64 * 256 * 12 * 2 // 2) + 2)
    with pytest.raises(ConfigError, match=r"^train.iteration_loss=2: the logits after each of the last 2 iterations "
                                          r"\(\d+ rows of 64 tokens over a vocabulary of \d+\) need about [\d,]+ GiB, "
                                          r"more than half of .*; at most \d+ fit: lower train.iteration_loss"):
        train(cfg)
    assert not cfg.run_dir.exists()
