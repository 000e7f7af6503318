"""loopformer.runs: the run directory's one layout, the one log, and restoring a run's params without
its optimizer state."""

import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from loopformer.errors import CheckpointError
from loopformer.runs.checkpoint import Checkpoints
from loopformer.runs.layout import RunDir
from loopformer.runs.log import log, log_to
from loopformer.runs.read import load_run_config
from loopformer.runs.restore import abstract_model, restore_params
from tests.conftest import STEP, make_run


def test_the_layout_names_every_file(tmp_path):
    run = RunDir(tmp_path)
    assert {k: getattr(run, k).name for k in ("config", "changes", "checkpoints", "tokenizer", "metrics", "tb",
                                              "final_sweep")} == {
        "config": "config.yaml", "changes": "config_changes.jsonl", "checkpoints": "checkpoints",
        "tokenizer": "tokenizer.json", "metrics": "metrics.jsonl", "tb": "tb", "final_sweep": "final_sweep.json"}
    assert (run.lock(0).name, run.lock(2).name) == (".train.lock", ".train.lock.2")
    assert run.checkpoint_steps() == [] and run.trained_to() is None
    for name in ("12", "3", "tmp", "7.orbax-checkpoint-tmp"):
        (run.checkpoints / name).mkdir(parents=True)
    assert run.checkpoint_steps() == [3, 12] and run.trained_to() == 12


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_run_config_that_is_a_fifo_or_a_folder_is_named_so(tmp_path, kind):
    """#27 pass 16: every analysis command said "no run at ...: config.yaml is missing" of a config.yaml that is a
    FIFO or a folder (train said "not a readable file")."""
    path = tmp_path / "config.yaml"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    what = "a pipe or a device" if kind == "fifo" else "a folder"
    with pytest.raises(CheckpointError, match=rf"^{path} is {what}, not the run's config file; put the run's "
                                              rf"config.yaml back$"):
        load_run_config(tmp_path)


def test_a_run_config_edited_to_give_a_key_twice_is_refused(run_dir, tmp_path):
    """#27 pass 20: a run's config.yaml edited by hand to give a key twice was read with the last value winning (eval
    of `seed: 0 ... seed: 1` scored other examples without a word), where a config given to train is refused."""
    path = tmp_path / "config.yaml"
    path.write_text((run_dir / "config.yaml").read_text() + "seed: 1\n")
    with pytest.raises(CheckpointError, match=r"config.yaml: key 'seed' is given twice \(lines \d+ and \d+\); keep one$"):
        load_run_config(tmp_path)


def test_a_run_config_nested_too_deeply_is_named_corrupt(run_dir, tmp_path):
    """#27 pass 24: a run's config.yaml edited to nest a value 5,000 levels deep was a RecursionError traceback."""
    (tmp_path / "config.yaml").write_text((run_dir / "config.yaml").read_text() + "x: " + "[" * 5000 + "\n")
    with pytest.raises(CheckpointError, match=r"config.yaml is corrupt \(nested too deeply to read\); delete "):
        load_run_config(tmp_path)


def test_a_run_keeps_its_corpus_paths_absolute(tmp_path, monkeypatch):
    """#27 pass 24: a run trained on data.paths=[c.txt] kept 'c.txt' in its config.yaml, so `eval --run` from another
    directory holding a c.txt scored that corpus, and a resume from there trained on it, with no word (the config
    unchanged). The run now keeps the absolute path; a resume from elsewhere with the relative one is a change."""
    from loopformer.config import load_config
    from loopformer.runs.prepare import anchor_paths, resume_changes

    first, other = tmp_path / "a", tmp_path / "b"
    for folder, words in ((first, "alpha beta gamma"), (other, "zz qq xx")):
        folder.mkdir()
        (folder / "c.txt").write_text("\n\n".join(f"{words} {i} " * 20 for i in range(40)))
    root = Path(__file__).parents[2]
    settings = [f"run.dir={tmp_path / 'runs'}", "run.name=rel", "data.paths=[c.txt]", "data.seq_len=16",
                "model.d_model=16", "model.heads=2", "model.stages.0.circuits.X.width=16",
                "model.stages.0.circuits.X.heads=2"]
    monkeypatch.chdir(first)
    run = make_run(load_config(root / "configs" / "text_bytes.yaml", settings))
    assert load_run_config(run).data.paths == [str(first / "c.txt")]
    monkeypatch.chdir(other)
    assert load_run_config(run).data.paths == [str(first / "c.txt")]  # what any command reads, from anywhere
    cfg = load_config(root / "configs" / "text_bytes.yaml", settings)
    anchor_paths(cfg)  # as prepare_run_dir does before it compares
    assert cfg.data.paths == [str(other / "c.txt")]
    assert [(c.path, c.old, c.new) for c in resume_changes(cfg, run)] == [
        ("data.paths", [str(first / "c.txt")], [str(other / "c.txt")])]
    keep = load_config(root / "configs" / "text_bytes.yaml", ["data.paths=['asset:kjv_genesis_exodus.txt', '/x/y.txt']"])
    anchor_paths(keep)
    assert keep.data.paths == ["asset:kjv_genesis_exodus.txt", "/x/y.txt"]


def test_a_run_trained_before_with_a_relative_corpus_path_is_named_not_read_from_here(tmp_path, monkeypatch, capsys):
    """#27 pass 24's leftover: a run trained before its corpus paths were kept absolute holds data.paths=[c.txt] (or a
    mixture entry's); every command read the c.txt of the current directory, another corpus from another directory,
    with no word. Its directory is not recorded, so every command that reads the run names the path and the fix, and
    so does `train -c RUN/config.yaml` (an override of data.paths is the user's own, relative to here)."""
    from loopformer.cli import main
    from loopformer.config import load_config

    root = Path(__file__).parents[2]
    (tmp_path / "c.txt").write_text("\n\n".join(f"alpha beta {i} " * 20 for i in range(40)))
    monkeypatch.chdir(tmp_path)
    settings = [f"run.dir={tmp_path / 'runs'}", "run.name=old", "data.paths=[c.txt]", "data.seq_len=16",
                "model.d_model=16", "model.heads=2", "model.stages.0.circuits.X.width=16",
                "model.stages.0.circuits.X.heads=2"]
    run = make_run(load_config(root / "configs" / "text_bytes.yaml", settings))
    config = run / "config.yaml"
    config.write_text(config.read_text().replace(str(tmp_path / "c.txt"), "c.txt"))  # as an older version wrote it
    line = (rf"^{re.escape(str(config))}: data.paths holds 'c.txt', a path relative to the directory the run was "
            rf"trained from, which the run does not record .*; edit it to the corpus's absolute path \(e.g. "
            rf"{re.escape(str(tmp_path / 'c.txt'))} if that was the current directory\)$")
    with pytest.raises(CheckpointError, match=line):
        load_run_config(run)
    for argv in (["eval", "--run", str(run)], ["inspect", "--run", str(run)], ["train", "-c", str(config)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(line, err[0].removeprefix("error: ")), (argv, err)
    config.write_text(config.read_text().replace("- c.txt", f"- {tmp_path / 'c.txt'}"))  # the fix the line gives
    assert load_run_config(run).data.paths == [str(tmp_path / "c.txt")]


def test_one_log_to_stderr_and_the_trainer_logs_to_stdout(capsys):
    log("analysis")
    with log_to("stdout"):
        log("training")
        with log_to("stderr"):
            log("nested")
        log("training again")
    log("analysis again")
    captured = capsys.readouterr()
    assert captured.out == "training\ntraining again\n"
    assert captured.err == "analysis\nnested\nanalysis again\n"


def parts_state():
    params = {"dense": {"w": jnp.arange(12.0).reshape(4, 3), "b": jnp.ones(3)}}
    return {"params": params, "opt_state": {"mu": jax.tree.map(jnp.zeros_like, params), "count": jnp.asarray(3)},
            "step": jnp.asarray(5, jnp.int32)}


def wanted(state):
    return jax.eval_shape(lambda: {"params": state["params"], "step": state["step"]})


def test_a_partial_restore_reads_only_the_parts_asked_for(tmp_path):
    state = parts_state()
    with Checkpoints(tmp_path / "ckpt", async_save=False) as ckpts:
        ckpts.save(5, state)
    restored = Checkpoints(tmp_path / "ckpt").restore(wanted(state), partial=True)
    assert set(restored) == {"params", "step"} and int(restored["step"]) == 5
    np.testing.assert_array_equal(np.asarray(restored["params"]["dense"]["w"]), np.asarray(state["params"]["dense"]["w"]))
    with pytest.raises(CheckpointError, match=r"different shapes \(leaf 'opt_state/count' is in the checkpoint but "
                       r"not in the model, and 2 more\)"):
        Checkpoints(tmp_path / "ckpt").restore(wanted(state), partial=False)  # a full restore reads every part
    bigger = wanted(state)
    bigger["params"]["dense"]["w"] = jax.ShapeDtypeStruct((5, 3), jnp.float32)
    with pytest.raises(CheckpointError, match=r"'params/dense/w' has shape \[4, 3\] there but \[5, 3\] here"):
        Checkpoints(tmp_path / "ckpt").restore(bigger, partial=True)


def test_a_partial_restore_checks_the_checksums(tmp_path):
    """A flipped byte in the params is caught by the checksum saved with them, as in a full restore."""
    from tests.train.test_checkpoint import flip_byte

    state = {"params": {"w": jnp.arange(20000, dtype=jnp.float32).reshape(100, 200) / 7},
             "opt_state": {"count": jnp.asarray(1)}, "step": jnp.asarray(4, jnp.int32)}
    with Checkpoints(tmp_path / "ckpt", async_save=False) as ckpts:
        ckpts.save(2, state)
        ckpts.save(4, state)
    flip_byte(tmp_path / "ckpt" / "4")
    with pytest.raises(CheckpointError, match=r"checkpoint step 4 in .* is corrupt: params/w does not match the "
                       r"checksum saved with it .*; delete it \(rm -r .*ckpt/4\)"):
        Checkpoints(tmp_path / "ckpt").restore(wanted(state), partial=True)
    assert int(Checkpoints(tmp_path / "ckpt").restore(wanted(state), step=2, partial=True)["step"]) == 4


def test_restore_params_reads_the_trained_params(run_dir):
    """restore_params returns what the checkpoint holds (the run the trainer's pieces wrote), the step,
    and the abstract model it fits."""
    from loopformer.train.optim import make_optimizer
    from loopformer.train.step import init_state

    cfg = load_run_config(run_dir)
    model, params, step = restore_params(cfg)
    assert step == STEP
    tx = make_optimizer(cfg.train)
    full = jax.eval_shape(lambda: init_state(nnx.to_pure_dict(nnx.state(abstract_model(cfg))), tx))
    saved = Checkpoints(RunDir(run_dir).checkpoints).restore(full)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(saved["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(nnx.to_pure_dict(nnx.state(model))) == jax.tree.structure(params)


def test_a_file_named_like_a_step_is_no_checkpoint(tmp_path):
    """#27 pass 18: a file (or a dangling link) `checkpoints/6` was a checkpoint step: `inspect` listed it, and a
    resume with train.steps=6 trained from step 4 to 6 but left config.yaml at its old settings (train.steps 4, the
    old run.dir), taken for a rerun that trains nothing."""
    layout = RunDir(tmp_path)
    (layout.checkpoints / "4").mkdir(parents=True)
    (layout.checkpoints / "6").write_text("x")
    (layout.checkpoints / "8").symlink_to(tmp_path / "nowhere")
    assert layout.checkpoint_steps() == [4] and layout.trained_to() == 4


@pytest.mark.parametrize("name", ["03", "\u0663"])  # a leading zero, an Arabic-Indic 3
def test_a_folder_named_like_a_step_but_not_plainly_is_one_line(tmp_path, name):
    """#27 pass 22: `checkpoints/03` was step 3 to a resume (its config compared) and no checkpoint to the library, so
    the resume trained from scratch and replaced the run's metrics, and `eval` said "no checkpoint: train first"."""
    layout = RunDir(tmp_path)
    (layout.checkpoints / name).mkdir(parents=True)
    match = rf"checkpoints/{name} is named like checkpoint step 3, but .* rename it \(mv .*/{name}'? .*/checkpoints/3\)"
    with pytest.raises(CheckpointError, match=match):
        layout.checkpoint_steps()
    with pytest.raises(CheckpointError, match=match):
        Checkpoints(layout.checkpoints).restore({})


def test_a_resume_after_a_torn_change_record_keeps_its_own(tmp_path):
    """#27 pass 23: config_changes.jsonl cut mid-line (a kill or a full disk while a resume appended): the next
    resume's record was written onto the end of the torn line, so it was lost with it (and `inspect` refused the
    line). It now starts on a line of its own; the torn line is still named by `inspect`."""
    import json

    from loopformer.config import Change
    from loopformer.runs.prepare import record_changes

    path = RunDir(tmp_path).changes
    path.write_text('{"step": 2, "changes": [{"path": "train.steps", "old": 2, "new": 5, "part": "setting"}]}\n'
                    '{"step": 5, "changes": [{"path": "train.st', encoding="utf-8")
    record_changes(tmp_path, 7, [Change("train.steps", 5, 9, "setting")])
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and lines[1] == '{"step": 5, "changes": [{"path": "train.st'
    assert json.loads(lines[2]) == {"step": 7, "changes": [{"path": "train.steps", "old": 5, "new": 9,
                                                             "part": "setting"}]}
    record_changes(tmp_path, 9, [Change("train.steps", 9, 11, "setting")])  # a whole file: no blank line
    assert len(path.read_text(encoding="utf-8").splitlines()) == 4


def test_every_reader_names_what_is_there_in_one_wording(tmp_path):
    """#27 pass 24's leftover: "a path that is not a file" was worded in five places, five ways ("a directory", "not a
    regular file", "a pipe or a device, not a file", "no such file", "config file not found"); one helper
    (runs.layout.not_a_file) now words it for the config loader, --probe, data.paths, --run and the run's own files."""
    from loopformer.config import load_config
    from loopformer.data.probes import read_probes
    from loopformer.data.text import expand_paths
    from loopformer.errors import LoopformerError
    from loopformer.runs.layout import not_a_file, special
    from loopformer.runs.read import read_run

    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    kinds = {"folder": "is a folder", "fifo": "is a pipe or a device",
             "link": "is a symlink that leads nowhere (or in a loop)", "missing": "does not exist"}
    assert not_a_file(tmp_path / "file") is None and special(tmp_path / "missing") is None
    for name, kind in kinds.items():
        path = tmp_path / name
        assert not_a_file(path) == kind
        assert special(path) == (None if name == "missing" else kind.removeprefix("is "))
        for read, shown in ((load_config, f"config file {path} {kind}; "), (read_probes, f"--probe {path} {kind} ("),
                            (read_run, f"--run {path} {kind} (" if name != "folder" else None),
                            (lambda p: expand_paths([str(p)]),
                             f"data.paths: '{path}' {kind}; " if name in ("fifo", "link") else None)):
            if shown is None:  # a folder is what --run wants, and a corpus's files; a missing corpus path is a glob's
                continue
            with pytest.raises(LoopformerError) as info:
                read(path)
            assert shown in str(info.value), (name, str(info.value))
    with pytest.raises(LoopformerError, match=rf"^--run {tmp_path / 'file'} is a file, not a folder \(point --run"):
        read_run(tmp_path / "file")


def test_a_run_config_that_is_a_dangling_symlink_is_named_so(tmp_path):
    """#27 pass 25: a run whose config.yaml is a symlink to nothing was "config.yaml is missing (train first ...)"."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.yaml").symlink_to(tmp_path / "gone.yaml")
    with pytest.raises(CheckpointError, match=r"config.yaml is a symlink that leads nowhere \(or in a loop\), not the "
                                              r"run's config file; put the run's config.yaml back$"):
        load_run_config(tmp_path)


def test_the_shell_commands_a_fix_names_are_quoted(tmp_path):
    """#27 pass 30: a fix's `mv` / `rm -r` named a run folder with a space unquoted: pasted, `rm -r /x/my run` removed
    /x/my and ./run, and `mv` named three paths."""
    from loopformer.config import load_config
    from loopformer.runs.prepare import resume_changes
    from loopformer.train.newrun import _occupied

    run = tmp_path / "my run"
    (run / "checkpoints" / "03").mkdir(parents=True)
    with pytest.raises(CheckpointError) as info:
        RunDir(run).checkpoint_steps()
    assert f"(mv '{run}/checkpoints/03' '{run}/checkpoints/3')" in str(info.value)
    (run / "checkpoints" / "03").rename(run / "checkpoints" / "3")
    assert f"(rm -r '{run}')" in _occupied(run)
    orphan = tmp_path / "old run"
    orphan.mkdir()
    (orphan / "metrics.jsonl").write_text("")
    with pytest.raises(CheckpointError) as info:
        resume_changes(load_config(None, []), orphan)
    assert f"(mv '{orphan}' '{orphan}.old')" in str(info.value)


@pytest.mark.parametrize(("name", "what"), [("meta.json", "a corpus written by `loopformer prepare`"),
                                            ("config.json", "a Hugging Face model folder")])
def test_a_run_into_a_prepared_corpus_or_an_exported_folder_is_refused(tmp_path, name, what):
    """#27 pass 33: `train run.name=CORPUS` (a folder `prepare --out` or `export --out` wrote) trained into it and
    replaced its tokenizer.json with the run's, with no word: the corpus's shards then read as another tokenizer's
    ids. Refused before anything is written; the folder's files are as they were."""
    from loopformer.errors import ConfigError
    from loopformer.runs.prepare import make_run_dir
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path, "corpus")
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / name).write_text("{}")
    (cfg.run_dir / "tokenizer.json").write_text("theirs")
    with pytest.raises(ConfigError, match=rf"^run.dir / run.name: {cfg.run_dir} is {re.escape(what)} \({name}\), "
                                          rf"not a run, .* set run.dir=<a directory> or run.name=<another name>$"):
        make_run_dir(cfg)
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == sorted([name, "tokenizer.json"])
    assert (cfg.run_dir / "tokenizer.json").read_text() == "theirs"
    # --run of it said "config.yaml is missing (train first ...)", and training into it is what is refused above
    from loopformer.runs.read import read_run

    fix = {"meta.json": f"train a run on it (data.paths=[{cfg.run_dir}])",
           "config.json": f"import it (loopformer import --hf {cfg.run_dir} --out runs/NAME)"}[name]
    with pytest.raises(CheckpointError, match=rf"^no run at {cfg.run_dir}: it is {re.escape(what)} \({name}\), not a "
                                              rf"run; {re.escape(fix)}, and point --run at that run$"):
        read_run(cfg.run_dir)


def test_a_run_path_that_is_not_utf8_is_one_line(tmp_path, run_dir):
    """#27 pass 33: the checkpoint library cannot open a path holding a byte that is not UTF-8 (a folder renamed
    `q$'\\xff'`, a Latin-1 name): `--run` of such a run called its step corrupt, with the fix `rm -r` of the intact
    checkpoint and two tracebacks; `convert` / `import --out` there raised 70 tracebacks after reading the weights, and
    a config naming it trained until tensorboard's writer raised. Each is one line naming the byte."""
    import shutil

    from loopformer.errors import AnalysisError, ConfigError
    from loopformer.runs.read import read_run
    from loopformer.train.newrun import out_dir
    from tests.conftest import tiny_config

    moved = Path(os.fsdecode(bytes(tmp_path) + b"/q\xff"))
    shutil.copytree(run_dir, moved)
    with pytest.raises(AnalysisError, match=r"^--run .*/q\\xff: its path holds the byte \\xff, which is not UTF-8 "
                                            r"text, and the checkpoint library cannot open such a path; rename"):
        read_run(moved)
    with pytest.raises(ConfigError, match=r"^--out .*/n\\xe9 holds the byte \\xe9, which is not UTF-8 text"):
        out_dir(os.fsdecode(bytes(tmp_path) + b"/n\xe9"))
    assert not Path(os.fsdecode(bytes(tmp_path) + b"/n\xe9")).exists()
    cfg = tiny_config(tmp_path, "r")
    cfg.run.name = os.fsdecode(b"r\xff")  # as a config file's "r\uDCFF" reads (an override is refused before)
    with pytest.raises(ConfigError, match=r"^run.name / run.dir: the run directory .*/r\\xff holds the byte \\xff"):
        cfg.run.validate()


def test_inspect_reports_a_per_difficulty_circuits_counts_of_its_training_difficulties(tmp_path):
    """#27 pass 38: a per_difficulty circuit's training range and mean were its distribution's, [count at difficulty
    1, max_loops] and their midpoint: the quickstart's X (2d + 4 over difficulties 1..4: 6..12, mean 9) with
    max_loops 64 (the cap of its exits) was reported trained on 6..64, mean 35, and the sweep plots shaded that."""
    from loopformer.cli.inspect import inspect_run
    from loopformer.config import load_config
    from loopformer.runs.prepare import write_config
    from loopformer.runs.read import read_run

    cfg = load_config("configs/quickstart.yaml", [f"run.dir={tmp_path}", "run.name=r", "data.train_difficulty=[1, 4]",
                                                  "model.stages.0.circuits.0.max_loops=64"])
    cfg.run_dir.mkdir(parents=True)
    write_config(cfg, cfg.run_dir)
    doc = inspect_run(str(cfg.run_dir))
    x, y = doc["circuits"]["X"], doc["circuits"]["Y"]
    assert (x["typical_range"], x["training_mean"]) == ([6, 12], 9.0)
    assert (y["typical_range"], y["training_mean"]) == ([2, 2], 2.0)  # fixed(2): its distribution's, as before
    assert read_run(str(cfg.run_dir)).training_range("X") == (6, 12)
    mixed = load_config("configs/routing.yaml", [f"run.dir={tmp_path}", "run.name=m",
                                                 "model.stages.0.circuits.0.loops=per_difficulty(1, 1)",
                                                 "model.stages.0.circuits.0.max_loops=30",
                                                 "data.mixture.maze.train_difficulty=[2, 3]",
                                                 "data.mixture.maze.weight=3"])
    mixed.run_dir.mkdir(parents=True)
    write_config(mixed, mixed.run_dir)
    x = inspect_run(str(mixed.run_dir))["circuits"]["X"]
    assert x["typical_range"] == [2, 9] and x["training_mean"] == (1 * 5.5 + 3 * 3.5) / 4  # parity 1..8, maze 2..3
