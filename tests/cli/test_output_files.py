"""The analysis commands' output files (hostile pass 3b, findings 5-8): written through a temporary file and
renamed, one error line for a file that cannot be written, rys's files one consistent set, rys --probe with
--examples, rys's header count, ablate on a run without circuits; (pass 5) ablate's, activity's and sweep's files
one set too."""

import fcntl
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from loopformer.cli import ablate as ablate_cli
from loopformer.cli import activity as activity_cli
from loopformer.cli import main
from loopformer.cli import rys as rys_cli
from loopformer.cli import sweep as sweep_cli
from loopformer.cli.common import write_png
from loopformer.errors import AnalysisError
from loopformer.evaluation import tables
from tests.conftest import make_run, tiny_config

PLAIN = ["model.prelude=3", "model.coda=0", "model.stages=[]", "eval.sweep_circuits=[]"]  # 6 blocks to scan


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    return make_run(tiny_config(tmp_path_factory.mktemp("outputs"), "plain", *PLAIN))


def hidden(folder):
    """Temporary and kept-aside files (.<name>.<pid>.tmp / .old) left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def contents(folder, names):
    return {n: (folder / n).read_bytes() for n in names}


def one_error(capsys):
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: "), line
    return line


@pytest.mark.parametrize("write", [lambda p: tables.write_csv(p, [{"a": 2}]), lambda p: write_png(p, b"new")])
def test_a_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch, write):
    """write_csv / write_png opened the final name: a kill truncated it, and a read-only file was a traceback."""
    path = tmp_path / "out.dat"
    path.write_bytes(b"old")

    def fail(*a):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(os, "replace", fail)  # the data is written, the rename fails
    with pytest.raises(AnalysisError, match=rf"^cannot write {path} \(Read-only file system\): make it and its folder "):
        write(path)
    monkeypatch.undo()
    assert path.read_bytes() == b"old" and hidden(tmp_path) == []
    monkeypatch.setattr(os, "access", lambda p, mode: False)  # chmod a-w (root is not stopped by chmod)
    with pytest.raises(AnalysisError, match=r"\(the file is read-only\)"):
        write(path)
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    (tmp_path / "dir.dat").mkdir()
    with pytest.raises(AnalysisError, match=r"dir.dat \(Is a directory\)"):
        write(tmp_path / "dir.dat")
    write(path)
    assert path.read_bytes() in (b"a\r\n2\r\n", b"new") and hidden(tmp_path) == []


def test_rys_files_are_one_scans_set(plain_run, capsys, monkeypatch):
    """Finding 5: a scan stopped between its files, or a later scan of fewer splits, left rys.csv of one scan
    beside plots of another; two scans at once interleaved their files."""
    names = ["rys.csv", "rys_train.png", "rys_hard.png"]
    assert main(["rys", "--run", str(plain_run), "--examples", "8"]) == 0
    old = contents(plain_run, names)
    real = rys_cli.write_png

    def stopped(path, png):  # Ctrl-C after the csv and the first plot are in place (a plot unlike the old one)
        if path.name == "rys_hard.png":
            raise KeyboardInterrupt
        return real(path, b"the new scan's plot")
    monkeypatch.setattr(rys_cli, "write_png", stopped)
    assert main(["rys", "--run", str(plain_run), "--examples", "16"]) == 130
    assert contents(plain_run, names) == old and hidden(plain_run) == []  # the new csv (16 examples) is gone too
    monkeypatch.undo()

    locked = []

    def probing(path, png):  # another scan cannot write while this one does
        fd = os.open(plain_run, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked.append(path.name)
        finally:
            os.close(fd)
        return real(path, png)
    monkeypatch.setattr(rys_cli, "write_png", probing)
    capsys.readouterr()
    assert main(["rys", "--run", str(plain_run), "--examples", "16", "--split", "train"]) == 0
    assert locked == ["rys_train.png"]
    assert f"removed {plain_run / 'rys_hard.png'} (an earlier scan's; rys.csv now holds train)" in capsys.readouterr().err
    assert not (plain_run / "rys_hard.png").exists() and hidden(plain_run) == []
    rows = (plain_run / "rys.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 and all(",train," in r for r in rows[1:])


def test_rys_refuses_a_read_only_output_before_the_scan(plain_run, capsys, monkeypatch):
    """Finding 6: a read-only rys.csv or plot (a file mounted read-only into the run) was a traceback after
    the scan, with part of the set already rewritten."""
    assert main(["rys", "--run", str(plain_run), "--examples", "8"]) == 0
    old = contents(plain_run, ["rys.csv", "rys_train.png", "rys_hard.png"])
    capsys.readouterr()
    ro = plain_run / "rys_hard.png"
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: real(p, mode) and os.fspath(p) != os.fspath(ro))
    assert main(["rys", "--run", str(plain_run), "--examples", "16"]) == 2
    assert one_error(capsys) == (f"error: {ro} is read-only, and this command replaces it (or removes it, where its "
                                 f"new set has no such file); make it writable, or copy the run (cp -r) and pass --run COPY")
    assert contents(plain_run, old) == old  # and nothing was loaded or scanned: one line, no "loaded"


def test_rys_examples_takes_the_first_probes_and_the_header_counts_what_was_scored(text_run_dir, tmp_path, capsys):
    """Findings 7 and 8: --examples with --probe was ignored (every probe scored); a text run's header said
    --examples windows per split however few the split held."""
    run = tmp_path / "text"
    shutil.copytree(text_run_dir, run)
    probes = tmp_path / "p.jsonl"
    probes.write_text("".join(json.dumps({"prompt": f"What is {i} + 1? ", "answer": str(i + 1)}) + "\n"
                              for i in range(20)))
    assert main(["rys", "--run", str(run), "--probe", str(probes), "--examples", "5"]) == 0
    assert "· 5 probes\n" in capsys.readouterr().out
    assert main(["rys", "--run", str(run), "--probe", str(probes), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [b["examples"] for b in doc["baseline"]] == [20] and doc["rows"][0]["examples"] == 20
    assert main(["rys", "--run", str(run), "--split", "val", "--examples", "100000"]) == 0
    out = capsys.readouterr().out
    windows = int(out.split(" · text · ")[1].split()[0])
    assert 0 < windows < 100000 and f"{windows} windows per split" in out and f"rescored on {windows}:" in out


def test_ablate_on_a_run_without_circuits_is_one_line(plain_run, capsys):
    """Finding 7: ablate on a plain run wrote three baseline rows and an empty plot; activity refused."""
    assert main(["ablate", "--run", str(plain_run)]) == 2
    assert one_error(capsys) == (
        f"error: {plain_run} has no circuits (model.stages: []): ablate removes looped circuits, so there is nothing "
        f"to remove (`loopformer convert` makes one; `loopformer rys` scans a plain model's layers)")
    assert not (plain_run / "ablation.csv").exists() and not (plain_run / "ablation.png").exists()


@pytest.fixture(scope="module")
def looped_run(tmp_path_factory):
    return make_run(tiny_config(tmp_path_factory.mktemp("outputs"), "looped"))


@pytest.mark.parametrize("cli, argv, names", [
    (ablate_cli, ["ablate"], ["ablation.csv", "ablation.png"]),
    (activity_cli, ["activity"], ["activity.csv", "activity.png"]),
    (sweep_cli, ["sweep", "--loops", "X=1,2"], ["sweep.csv", "sweep_X.png", "sweep_convergence.png"]),
])
def test_ablate_activity_and_sweep_files_are_one_set(looped_run, capsys, monkeypatch, cli, argv, names):
    """Pass 5: ablate, activity and sweep wrote their files one by one without rys's lock: Ctrl-C between them, or
    two commands at once (two sweeps, a sweep and a rys), left one command's CSV beside another's plots."""
    args = [*argv, "--run", str(looped_run), "--examples", "8"]
    assert main(args) == 0
    old = contents(looped_run, names)

    def stopped(path, png):  # Ctrl-C after the csv is in place; the lock on the run is held meanwhile
        fd = os.open(looped_run, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "write_png", stopped)
    assert main([*args[:-1], "16"]) == 130
    assert contents(looped_run, names) == old and hidden(looped_run) == []  # the csv of 16 examples is gone too


def test_a_sweep_whose_tensorboard_run_cannot_be_written_keeps_the_earlier_sweep(looped_run, capsys, monkeypatch):
    """#27 pass 26: a disk that filled while `sweep` wrote its tensorboard run (sweeps/X, after the CSV and plots) was
    a traceback from tensorboard's writer, with the earlier sweep's run deleted and the new CSV beside it. Now one
    line naming the folder; the earlier sweep's files and tensorboard run stay, and nothing temporary is left."""
    import errno

    from loopformer.runs.scalars import MetricsWriter

    args = ["sweep", "--loops", "X=1,2", "--run", str(looped_run), "--examples", "8"]
    names = ["sweep.csv", "sweep_X.png", "sweep_convergence.png"]
    assert main(args) == 0
    old, tb = contents(looped_run, names), looped_run / "sweeps" / "X"
    old_tb = sorted(str(p.relative_to(tb)) for p in tb.rglob("*"))

    class Full(MetricsWriter):
        def image(self, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sweep_cli, "MetricsWriter", Full)
    dead = tb.parent / ".X.tmp-999999999"  # of a sweep killed outright (kill -9) while it wrote: removed by the next
    (dead / "tb").mkdir(parents=True)
    (dead / "metrics.jsonl").write_text("{}\n")
    capsys.readouterr()
    assert main([*args[:-1], "16"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"error: cannot write {tb} (No space left on device): make it and its folder writable (or free disk space) "
        f"and run the command again")
    assert contents(looped_run, names) == old and hidden(looped_run) == [] and hidden(tb.parent) == []
    assert sorted(str(p.relative_to(tb)) for p in tb.rglob("*")) == old_tb

def test_a_sweep_killed_between_its_renames_keeps_the_earlier_tensorboard_run(looped_run, capsys, monkeypatch):
    """#27 pass 27 left a `kill -9` between deleting the earlier sweeps/X and renaming the new one in: the earlier run
    was lost. It is now set aside first (``.X.old-PID``); a set-aside run of a dead sweep is put back when no X is
    there (here: the next sweep then fails, and the earlier run stays), and removed when the new X is in place."""
    import errno

    from loopformer.runs.scalars import MetricsWriter

    args = ["sweep", "--loops", "X=1,2", "--run", str(looped_run), "--examples", "8"]
    assert main(args) == 0
    tb = looped_run / "sweeps" / "X"
    old_tb = sorted(str(p.relative_to(tb)) for p in tb.rglob("*"))
    aside = tb.parent / ".X.old-999999999"
    tb.rename(aside)  # killed after setting the earlier run aside, before the new one was renamed in

    class Full(MetricsWriter):
        def image(self, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(sweep_cli, "MetricsWriter", Full)
        assert main(args) == 2
    assert sorted(str(p.relative_to(tb)) for p in tb.rglob("*")) == old_tb and hidden(tb.parent) == []
    shutil.copytree(tb, aside)  # killed after the new run was renamed in: the set-aside one goes
    capsys.readouterr()
    assert main(args) == 0 and tb.is_dir() and hidden(tb.parent) == []


def test_an_output_that_is_a_folder_a_pipe_or_a_link_to_one_is_refused_before_the_work(tmp_path):
    """#27 pass 28: a FIFO named sweep.csv, or a link to one (or to /dev/null), was replaced by a regular file (through
    the link: the pipe elsewhere, /dev/null as root); a folder there (or a link to one) failed after the work, saying
    to make the run writable or free disk space. Each is now refused before the work, naming what is there."""
    from loopformer.cli.common import check_writable

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.mkfifo(elsewhere / "pipe")
    makers = [("a folder", lambda p: p.mkdir()), ("a pipe or a device", lambda p: os.mkfifo(p)),
              ("a pipe or a device", lambda p: p.symlink_to(elsewhere / "pipe")),
              ("a folder", lambda p: p.symlink_to(elsewhere))]
    for i, (kind, make) in enumerate(makers):
        run = tmp_path / f"run{i}"
        run.mkdir()
        make(run / "sweep.csv")
        with pytest.raises(AnalysisError, match=rf"sweep.csv.* is {kind}, where this command writes its "
                                                r"sweep.csv \(a file, replaced whole\); move it aside"):
            check_writable(run, "sweep.csv", [run / "sweep.csv", run / "sweeps"])
    assert stat.S_ISFIFO(os.stat(elsewhere / "pipe").st_mode)
    (tmp_path / "run4" / "sweeps").mkdir(parents=True)  # a sweep's runs are folders: not refused
    check_writable(tmp_path / "run4", "sweep.csv", [tmp_path / "run4" / "sweep.csv", tmp_path / "run4" / "sweeps"])


def test_a_linked_output_on_another_disk_is_put_back(tmp_path, monkeypatch):
    """#27 pass 28: sweep.csv linked into a folder on another disk than the run: the kept copy (in the run) could not
    be renamed back onto the file ("Invalid cross-device link"), so a set that failed part way left the linked file
    with the new content beside the earlier plots, the earlier content deleted, and after a kill -9 the put-back was
    an OSError traceback in every later command. The copy is now written back whole beside the file."""
    import errno

    from loopformer.cli import common
    from loopformer.cli.common import one_set
    from loopformer.runs.layout import replace_file

    run, shared = tmp_path / "run", tmp_path / "shared"  # "another disk": a rename between the two fails
    run.mkdir()
    shared.mkdir()
    real_replace = os.replace

    def replace(src, dst):
        if {Path(src).parent.name, Path(dst).parent.name} == {"run", "shared"}:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(src, dst)

    monkeypatch.setattr(common.os, "replace", replace)
    (shared / "sweep.csv").write_text("old csv")
    (run / "sweep.csv").symlink_to(shared / "sweep.csv")
    (run / "sweep_X.png").write_bytes(b"old png")
    with pytest.raises(KeyboardInterrupt), one_set(run, [run / "sweep.csv", run / "sweep_X.png"], "sweep"):
        replace_file(run / "sweep.csv", b"new csv")
        raise KeyboardInterrupt
    assert (shared / "sweep.csv").read_text() == "old csv" and (run / "sweep.csv").is_symlink()
    assert hidden(run) == [] and hidden(shared) == []
    (run / ".sweep.csv.999999999.old").write_text("old csv")  # a sweep killed (kill -9) after writing the file
    (shared / "sweep.csv").write_text("new csv")
    (run / ".analysis-set.json").write_text(json.dumps({"command": "sweep", "pid": 999999999, "new": [],
                                                        "kept": {"sweep.csv": ".sweep.csv.999999999.old"}}))
    with one_set(run, [run / "sweep.csv"], "sweep"):
        assert (shared / "sweep.csv").read_text() == "old csv"
    assert hidden(run) == [] and hidden(shared) == []


def test_an_output_linked_into_a_folder_that_does_not_exist_is_refused_before_the_work(tmp_path):
    """#27 pass 28: sweep.csv linked to a file in a folder that does not exist passed the check (a dangling link was
    not looked through), and the write failed after the work, saying to make the file writable or free disk space.
    It is now refused before the work; the fix, followed, writes the file through the link."""
    from loopformer.cli.common import check_writable, one_set
    from loopformer.runs.layout import replace_file

    run, gone = tmp_path / "run", tmp_path / "gone"
    run.mkdir()
    (run / "sweep.csv").symlink_to(gone / "sweep.csv")
    with pytest.raises(AnalysisError, match=r"sweep.csv is a symlink into .*gone, which does not exist, and this "
                                            r"command writes the file it leads to; make that folder, or remove the link"):
        check_writable(run, "sweep.csv", [run / "sweep.csv"])
    gone.mkdir()
    check_writable(run, "sweep.csv", [run / "sweep.csv"])
    with one_set(run, [run / "sweep.csv"], "sweep"):
        replace_file(run / "sweep.csv", b"new csv")
    assert (gone / "sweep.csv").read_bytes() == b"new csv" and (run / "sweep.csv").is_symlink()


def test_a_sweeps_folder_that_is_a_symlink_is_written_through(tmp_path):
    """#27 pass 28: a run's sweeps/X kept as a symlink (to a shared disk) was replaced by a folder, the folder it led
    to kept the earlier sweep with no word, and the link, set aside as .X.old-PID, stayed beside it for good (rmtree
    refuses a link; the next sweep skips links). The folder it leads to is now written, the link kept, as
    sweep.csv's file is."""
    import types

    run, shared = tmp_path / "run", tmp_path / "shared"
    (run / "sweeps").mkdir(parents=True)
    shared.mkdir()
    fake = types.SimpleNamespace(info=types.SimpleNamespace(path=run), step=4)
    rows = [{"split": "train", "loops": {"X": n}, "accuracy": 0.5, "loss": 1.0} for n in (1, 2)]
    sweep_cli._log_tensorboard(fake, rows, {"X": [1, 2]}, {})
    (run / "sweeps" / "X").rename(shared / "X")
    (run / "sweeps" / "X").symlink_to(shared / "X")
    earlier = (shared / "X" / "metrics.jsonl").read_text()
    rows[0]["accuracy"] = 0.25
    assert sweep_cli._log_tensorboard(fake, rows, {"X": [1, 2]}, {}) == shared / "X"
    assert (run / "sweeps" / "X").is_symlink() and os.listdir(run / "sweeps") == ["X"] and hidden(shared) == []
    assert (shared / "X" / "metrics.jsonl").read_text() != earlier and "0.25" in (shared / "X" / "metrics.jsonl").read_text()


def test_an_output_that_is_a_symlink_is_written_through_and_put_back_through(tmp_path, monkeypatch):
    """#27 pass 27: a run's sweep.csv kept as a symlink (to a shared folder) was replaced by a file, and the file it
    led to kept the earlier sweep with no word; the file it leads to is now written, the link kept, a set that
    fails part way puts that file's earlier content back, and a folder it cannot be written in is found first."""
    from loopformer.cli.common import one_set
    from loopformer.runs.layout import replace_file

    run, shared = tmp_path / "run", tmp_path / "shared"
    run.mkdir()
    shared.mkdir()
    (shared / "sweep.csv").write_text("old csv")
    (run / "sweep.csv").symlink_to(shared / "sweep.csv")
    with pytest.raises(KeyboardInterrupt), one_set(run, [run / "sweep.csv"], "sweep"):
        replace_file(run / "sweep.csv", b"half of a set")
        raise KeyboardInterrupt
    assert (run / "sweep.csv").is_symlink() and (shared / "sweep.csv").read_text() == "old csv"
    with one_set(run, [run / "sweep.csv"], "sweep"):
        replace_file(run / "sweep.csv", b"new csv")
    assert (run / "sweep.csv").is_symlink() and (shared / "sweep.csv").read_text() == "new csv"
    assert hidden(run) == [] and hidden(shared) == []
    (run / ".analysis-set.json").write_text(json.dumps({"command": "sweep", "pid": 1, "new": [],
                                                        "kept": {"sweep.csv": ".sweep.csv.1.old"}}))
    (run / ".sweep.csv.1.old").write_text("kept csv")  # as a kill -9 part way leaves them
    with one_set(run, [], "ablate"):
        pass
    assert (run / "sweep.csv").is_symlink() and (shared / "sweep.csv").read_text() == "kept csv"
    from loopformer.cli.common import check_writable

    (run / ".analysis-set.json").symlink_to(shared / "sweep.csv")  # the journal is never written through a link
    with pytest.raises(AnalysisError, match=r"analysis-set.json is a symlink, where sweep, ablate, activity and rys "
                                            r"keep the journal"):
        check_writable(run, "sweep.csv", [run / "sweep.csv"])
    (run / ".analysis-set.json").unlink()

    real = os.access  # a read-only folder (chmod does not stop root): found before the work, as a read-only file is
    monkeypatch.setattr(os, "access", lambda p, mode: real(p, mode) and os.fspath(p) != str(shared))
    with pytest.raises(AnalysisError, match=rf"^{run}/sweep.csv is a symlink into {shared}, which is not writable"):
        check_writable(run, "sweep.csv", [run / "sweep.csv"])


def test_a_set_killed_outright_part_way_is_put_back_by_the_next_command(tmp_path):
    """kill -9 (or a lost machine) while a command replaced its files left a mix of the old and new set: the
    journal it wrote first names what to put back, and the next command to write a set does so before its own."""
    import subprocess
    import sys

    from loopformer.cli.common import one_set

    run = tmp_path / "run"
    run.mkdir()
    (run / "sweep.csv").write_text("old csv")
    (run / "sweep_X.png").write_bytes(b"old png")
    (run / ".sweep.csv.999999.old").write_text("a copy no journal names")
    script = ("import os, signal, sys\n"
              "from pathlib import Path\n"
              "from loopformer.cli.common import one_set\n"
              "from loopformer.runs.layout import replace_file\n"  # as every command writes its files
              "run = Path(sys.argv[1])\n"
              "with one_set(run, [run / 'sweep.csv', run / 'sweep_X.png', run / 'sweep_Y.png'], 'sweep'):\n"
              "    replace_file(run / 'sweep.csv', b'new csv')\n"
              "    replace_file(run / 'sweep_Y.png', b'new png')\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", script, str(run)], capture_output=True, text=True, timeout=60)
    assert done.returncode == -9
    assert (run / "sweep.csv").read_text() == "new csv" and (run / ".analysis-set.json").exists()  # the mix
    with one_set(run, [run / "ablation.csv"], "ablate"):
        (run / "ablation.csv").write_text("ablation")
    assert contents(run, ["sweep.csv", "sweep_X.png", "ablation.csv"]) == {
        "sweep.csv": b"old csv", "sweep_X.png": b"old png", "ablation.csv": b"ablation"}
    assert not (run / "sweep_Y.png").exists() and hidden(run) == []


@pytest.mark.parametrize("entry", [{"kept": {}, "new": ["../victim.csv"]}, {"kept": {}, "new": ["checkpoints"]},
                                   {"kept": {"config.yaml": "sweep.csv"}, "new": []},
                                   {"kept": {"sweep.csv": "../victim.csv"}, "new": []}, {"kept": {}, "new": "a.csv"}])
def test_a_journal_edited_or_copied_in_touches_no_file_a_set_does_not_hold(tmp_path, entry):
    """A journal naming files outside the run (`../victim.csv` was deleted), the run's own files (config.yaml was
    replaced by sweep.csv) or a folder (a traceback) is not one a command wrote: it is removed, and nothing else."""
    from loopformer.cli.common import one_set

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    files = {"config.yaml": b"model: {}", "sweep.csv": b"old csv", "a.csv": b"a"}
    for name, data in files.items():
        (run / name).write_bytes(data)
    (tmp_path / "victim.csv").write_bytes(b"precious")
    (run / ".analysis-set.json").write_text(json.dumps({"command": "sweep", "pid": 1, **entry}))
    with one_set(run, [run / "ablation.csv"], "ablate"):
        (run / "ablation.csv").write_text("ablation")
    assert contents(run, files) == files and (run / "checkpoints").is_dir() and hidden(run) == []
    assert (tmp_path / "victim.csv").read_bytes() == b"precious"


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_journal_that_is_a_fifo_or_a_folder_is_one_line_before_the_work(looped_run, capsys, kind):
    """#27 pass 16: a FIFO named .analysis-set.json made every sweep, ablate, activity and rys wait forever after
    its work (reading the journal); a folder was a traceback (IsADirectoryError) there. Now one line up front."""
    journal = looped_run / ".analysis-set.json"
    os.mkfifo(journal) if kind == "fifo" else journal.mkdir()
    try:
        assert main(["ablate", "--run", str(looped_run), "--examples", "8"]) == 2
        out = capsys.readouterr()
        what = "a pipe or a device" if kind == "fifo" else "a folder"
        assert out.err.strip().splitlines() == [
            f"error: {journal} is {what}, where sweep, ablate, activity and rys keep the journal of the files they "
            f"are replacing; remove it"]
        assert "ablate" not in out.err.split("error:")[0]  # before the work: no progress line
    finally:
        journal.unlink() if kind == "fifo" else journal.rmdir()


@pytest.mark.parametrize("argv, name", [(["ablate"], "ablation.png"), (["activity"], "activity.csv"),
                                        (["sweep", "--loops", "X=1,2"], "sweep.csv"),
                                        (["sweep", "--loops", "X=1,2"], "sweeps/X/tb")])
def test_every_analysis_command_refuses_a_read_only_output_before_its_work(looped_run, capsys, monkeypatch, argv,
                                                                           name):
    """rys checked its earlier files before the scan; ablate, activity and sweep found a read-only one only when
    they came to replace it, after the work (their set then rolled back: no new files, the work lost). A read-only
    folder of sweep's tensorboard run (#27 pass 18, as a user other than root) was found after the new CSV and
    plots were written, beside the earlier sweep's tensorboard run."""
    args = [*argv, "--run", str(looped_run), "--examples", "8"]
    assert main(args) == 0
    capsys.readouterr()
    ro = looped_run / name
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: real(p, mode) and os.fspath(p) != os.fspath(ro))
    assert main(args) == 2
    assert one_error(capsys) == (f"error: {ro} is read-only, and this command replaces it (or removes it, where its "
                                 f"new set has no such file); make it writable, or copy the run (cp -r) and pass "
                                 f"--run COPY")


def test_rys_plots_of_a_mixture_split(tmp_path):
    """A mixture's splits are NAME/SPLIT: rys wrote rys_NAME/SPLIT.png into a folder that is not there and failed
    after the scan ("cannot write ... make it writable"); the plot is rys_NAME_SPLIT.png (issue 27 pass 10)."""
    from types import SimpleNamespace
    info = SimpleNamespace(path=tmp_path, splits=["parity/train", "maze/train"])
    rows = [{"start": 0, "end": 1, "repeats": 1, "split": s, "loss": 1.0} for s in info.splits]
    files = rys_cli._write(info, rows, {s: b"png" for s in info.splits})
    assert files == [str(tmp_path / "rys.csv"), str(tmp_path / "rys_parity_train.png"), str(tmp_path / "rys_maze_train.png")]
    rys_cli._write(info, rows[:1], {"parity/train": b"png"})  # the plot of a split no longer scanned is removed
    assert sorted(p.name for p in tmp_path.glob("rys*")) == ["rys.csv", "rys_parity_train.png"]


def test_a_journal_this_user_may_not_read_is_one_line_and_removes_nothing(tmp_path, monkeypatch):
    """#27 pass 31, as a user other than root: a journal another user's command left (killed while it replaced its
    set; their umask made it unreadable here) was taken for a damaged one: removed, and the earlier files it named,
    kept aside, deleted as leftovers, so that command's half-written sweep.csv stayed in place of the earlier one."""
    from pathlib import Path

    from loopformer.cli.common import check_writable, one_set
    from loopformer.errors import AnalysisError

    run = tmp_path / "run"
    run.mkdir()
    (run / "sweep.csv").write_text("half of a new csv")
    (run / ".sweep.csv.999.old").write_text("old csv")
    journal = run / ".analysis-set.json"
    journal.write_text(json.dumps({"command": "sweep", "pid": 999, "kept": {"sweep.csv": ".sweep.csv.999.old"},
                                   "new": []}))
    real_access, real_read = os.access, Path.read_text
    monkeypatch.setattr(os, "access", lambda p, mode, **k: not (Path(p) == journal and mode & os.R_OK)
                        and real_access(p, mode, **k))
    with pytest.raises(AnalysisError, match=rf"^{journal} cannot be read by this user: it names the files another "
                                            rf"sweep, .* make it readable \(chmod u\+r {journal}\) and run the command "
                                            rf"again, or, once no such command runs, remove it \(rm {journal}\)"):
        check_writable(run, "ablation.csv")  # before the work
    monkeypatch.setattr(os, "access", real_access)  # made unreadable during the work: found at the write
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied"))
                        if self == journal else real_read(self, *a, **k))
    with pytest.raises(AnalysisError, match="cannot be read by this user"), one_set(run, [run / "ablation.csv"],
                                                                                     "ablate"):
        pytest.fail("wrote its set")
    assert sorted(p.name for p in run.iterdir()) == [".analysis-set.json", ".sweep.csv.999.old", "sweep.csv"]
    monkeypatch.undo()  # readable again: the earlier set is put back
    with one_set(run, [run / "ablation.csv"], "ablate"):
        (run / "ablation.csv").write_text("ablation")
    assert (run / "sweep.csv").read_text() == "old csv" and not journal.exists()
