"""`loopformer export`, `import` and `prepare` on hostile inputs (hostile pass 3, items 4, 7 and 8): export's load
hint is a Python literal, --out is checked before any weight is read and the disk before the unrolled copies are
made; import refuses overrides the folder fixes and a seq_len past its positions; prepare names its flags."""

import ast
import dataclasses
import errno
import itertools
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from flax import nnx

from loopformer.cli import export as export_cli
from loopformer.cli import hf_import, main
from loopformer.config import load_config
from loopformer.data.prepare import prepare_corpus
from loopformer.errors import CheckpointError, DataError
from loopformer.model.transformer import build_model
from loopformer.runs.read import read_run
from loopformer.surgery import export
from loopformer.surgery.convert import Recipe, converted_config
from tests.surgery.test_export import plain
from tests.surgery.test_hf_bad_folders import write_folder

POSITIONS = 64  # the folder's max_position_embeddings: below import's default data.seq_len (128)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("hf") / "tiny", config={"max_position_embeddings": POSITIONS})


@pytest.fixture(scope="module")
def imported(folder):
    """The folder imported with overrides import honours: the model's runtime fields and a train setting."""
    out = folder.parent / "run"
    assert main(["import", "--hf", str(folder), "--out", str(out), "model.compute_dtype=bfloat16",
                 "model.attention=xla", "train.lr=3e-4"]) == 0
    return out


def error_line(capsys) -> str:
    """The one line a refusal prints (the log's "loaded ..." lines aside)."""
    (line,) = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("loaded ")]
    return line


def unreachable(*args, **kwargs):
    raise AssertionError("reached: the input should have been refused before this")


def test_export_prints_a_python_literal_to_load_the_folder(imported, tmp_path, capsys):
    out = tmp_path / "sp ace 'q' [b]"
    assert main(["export", "--run", str(imported), "--out", str(out)]) == 0
    hint = capsys.readouterr().out.strip().splitlines()[-1]
    literal = re.fullmatch(r"\s*load it: transformers\.AutoModelForCausalLM\.from_pretrained\((.*)\)", hint).group(1)
    assert ast.literal_eval(literal) == str(out) and (out / "model.safetensors").is_file()


def test_export_writes_every_file_with_the_same_mode(imported, tmp_path):
    """safetensors wrote model.safetensors readable by its owner only (0600) beside a 0644 config.json: another
    user (or a serving process) could read the config and not the weights."""
    out = tmp_path / "hf"
    assert main(["export", "--run", str(imported), "--out", str(out)]) == 0
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes


@pytest.mark.parametrize("tie,bias", [(True, False), (False, True)])
def test_export_bytes_are_the_tensors_bytes_and_grow_with_the_loops(tie, bias):
    cfg = converted_config(dataclasses.replace(plain(), tie_embeddings=tie, qkv_bias=bias), Recipe(core=(1, 3)))
    params = nnx.to_pure_dict(nnx.state(build_model(cfg, 40, 0)))
    size = {n: export.export_bytes(cfg, params, {"X": n}) for n in (1, 2, 3, 10000)}
    for n in (1, 3):
        assert size[n] == sum(v.nbytes for v in export.hf_tensors(cfg, params, {"X": n}).values())
    assert size[10000] == size[1] + 9999 * (size[2] - size[1])


def test_export_refuses_a_disk_too_small_before_unrolling(imported, tmp_path, capsys, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(export.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    out = tmp_path / "new" / "big"
    with monkeypatch.context() as m:
        m.setattr(export_cli, "hf_tensors", unreachable)  # refused before the unrolled copies are made
        assert main(["export", "--run", str(imported), "--out", str(out)]) == 2
    line = error_line(capsys)
    assert re.fullmatch(rf"error: --out {re.escape(str(out))}: the export takes [\d.]+ MiB and "
                        rf"{re.escape(str(tmp_path))} has 0\.0 MiB free \(the unrolled layers grow with --loops\); free "
                        r"some space \(df -h .*\), lower --loops, or choose another --out", line), line
    with pytest.raises(CheckpointError, match=r"the export takes [\d.]+ MiB and .* has 0\.0 MiB free"):
        export.write_folder(out, {}, export.hf_tensors(plain(), nnx.to_pure_dict(nnx.state(build_model(plain(), 40, 0))),
                                                       {}), imported / "tokenizer.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, not even the parent


def test_export_checks_out_before_any_weight_is_read(imported, tmp_path, capsys, monkeypatch):
    full, afile, ro = tmp_path / "full", tmp_path / "afile", tmp_path / "ro"
    full.mkdir()
    (full / "kept").write_text("mine")
    afile.write_text("mine")
    ro.mkdir()
    real = tempfile.NamedTemporaryFile

    def probe(*args, dir=None, **kwargs):  # a read-only directory (chmod does not stop root: say it here)
        if dir is not None and Path(dir) == ro:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(export.tempfile, "NamedTemporaryFile", probe)
    monkeypatch.setattr(export_cli, "load_run", unreachable)
    monkeypatch.chdir(tmp_path)
    for out, message in [
        (full, f"--out {full} already exists and is not empty; pick a new directory"),
        (afile, f"--out {afile} is a file, not a directory; pick a new directory"),
        (afile / "sub", f"--out {afile}/sub: {afile} is a file, not a directory; choose an --out whose parents are "
                        f"directories"),
        (Path("afile/sub/deeper"), "--out afile/sub/deeper: afile is a file, not a directory; choose an --out whose "
                                   "parents are directories"),
        (ro / "new", f"--out {ro}/new: cannot write to {ro} (Read-only file system); choose a writable directory"),
        (imported / "x", f"--out {imported}/x is inside the run {imported}; write it outside any run directory"),
    ]:
        assert main(["export", "--run", str(imported), "--out", str(out)]) == 2
        assert error_line(capsys).startswith(f"error: {message}")
    assert (full / "kept").read_text() == afile.read_text() == "mine" and not list(ro.iterdir())


def test_export_into_a_symlink_to_an_empty_folder_writes_the_folder(imported, tmp_path, capsys):
    """#27 pass 27: export --out LINK, LINK leading to an empty folder, read the weights and then said "writing the
    folder failed (Not a directory)" (renaming onto the link), where import and convert write the folder it leads to;
    export now does too, the link kept."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "hf")
    assert main(["export", "--run", str(imported), "--out", str(tmp_path / "link")]) == 0
    capsys.readouterr()
    assert (tmp_path / "link").is_symlink() and (tmp_path / "hf" / "model.safetensors").is_file()


def test_an_out_that_is_a_symlink_loop_is_one_line(imported, folder, tmp_path, capsys, monkeypatch):
    """#27 pass 8: convert, import and prepare were an OSError traceback ("Too many levels of symbolic links"),
    export said "writing the folder failed (Not a directory)" after reading the weights. A dangling link is
    refused the same way: renaming the new folder onto it fails."""
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    monkeypatch.setattr(export_cli, "load_run", unreachable)
    monkeypatch.setattr(hf_import, "import_folder", unreachable)
    corpus = tmp_path / "c.txt"
    corpus.write_text("In the beginning.\n\n" * 20)
    for loop, argv in itertools.product([str(tmp_path / "a"), str(tmp_path / "dangling")], [
        ["export", "--run", str(imported), "--out"],
        ["convert", "--run", str(imported), "--core", "0:1", "--out"],
        ["import", "--hf", str(folder), "--out"],
        ["prepare", "data.task=text", f"data.paths=[{str(corpus)!r}]", "--out"],
    ]):  # one layout function says it for every command
        assert main([*argv, loop]) == 2, argv
        assert error_line(capsys) == (f"error: --out {loop} is a symlink that leads nowhere (or in a loop); remove it "
                                      f"or choose another --out"), argv


def test_an_out_that_is_a_mount_point_is_refused_before_the_work(imported, folder, tmp_path, capsys, monkeypatch):
    """#27 pass 9: export, import and prepare write --out beside it and rename it into place, which a mount point
    (a container's volume, a bind mount) refuses: "writing the folder failed (Device or resource busy)" after
    all the work. Now one line up front, naming a folder inside it."""
    from loopformer.runs import layout

    mount = tmp_path / "vol"
    mount.mkdir()
    monkeypatch.setattr(layout, "mount_point", lambda p: Path(p) == mount)
    monkeypatch.setattr(export_cli, "load_run", unreachable)
    monkeypatch.setattr(hf_import, "import_folder", unreachable)
    corpus = tmp_path / "c.txt"
    corpus.write_text("In the beginning.\n\n" * 20)
    for argv, message in [
        (["export", "--run", str(imported), "--out", str(mount)], f"--out {mount} is a mount point, and the folder is "
                                                                  f"written beside it and renamed into place; give a "
                                                                  f"folder inside it, e.g. --out {mount}/hf"),
        (["import", "--hf", str(folder), "--out", str(mount)], f"--out {mount} is a mount point, and the run is "
                                                               f"written beside it and renamed into place"),
        (["prepare", "--out", str(mount), "data.task=text", f"data.paths=[{str(corpus)!r}]"],
         f"--out {mount} is a mount point, and the corpus is written beside it and renamed into place; give a folder "
         f"inside it, e.g. --out {mount}/corpus"),
    ]:
        assert main(argv) == 2, argv
        assert error_line(capsys).startswith(f"error: {message}"), argv
    assert not list(mount.iterdir())


def test_an_out_that_is_the_current_directory_is_refused_before_the_work(imported, folder, tmp_path, capsys,
                                                                         monkeypatch):
    """#27 pass 40: `export --out .` in an empty current directory was a StopIteration traceback, `prepare --out .`
    "not a corpus written by prepare; remove . yourself", and the current directory by another name (its full path,
    ../here) was renamed over, the shell left in a removed folder. One line now, naming a new folder."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.setattr(export_cli, "load_run", unreachable)
    monkeypatch.setattr(hf_import, "import_folder", unreachable)
    corpus = tmp_path / "c.txt"
    corpus.write_text("In the beginning.\n\n" * 20)
    for argv, out, what, child in [
        (["export", "--run", str(imported), "--out"], ".", "folder", "hf"),
        (["export", "--run", str(imported), "--out"], str(here), "folder", "hf"),
        (["convert", "--run", str(imported), "--core", "0:1", "--out"], str(here), "run", "run"),
        (["import", "--hf", str(folder), "--out"], "../here", "run", "run"),
        (["prepare", "data.task=text", f"data.paths=[{str(corpus)!r}]", "--out"], ".", "corpus", "corpus"),
        (["prepare", "data.task=text", f"data.paths=[{str(corpus)!r}]", "--out"], "../here", "corpus", "corpus"),
    ]:
        assert main([*argv, out]) == 2, argv
        assert error_line(capsys) == (f"error: --out {out} is the current directory, and the {what} is written beside "
                                      f"it and renamed into place (the shell would be left in a removed folder); name "
                                      f"a new folder, e.g. --out {child}"), argv
    assert not list(here.iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "here"]


def test_mount_point_of_the_root_a_folder_and_a_file():
    from loopformer.runs.layout import mount_point

    assert mount_point(Path("/")) and not mount_point(Path(__file__).parent) and not mount_point(Path(__file__))


def test_import_into_a_read_only_parent_names_out_once(folder, tmp_path, capsys, monkeypatch):
    """#27 pass 9: "error: --out X: --out X: cannot write to ..." (the inner error wrapped again)."""
    real = Path.mkdir

    def read_only(self, *args, **kwargs):  # the temporary run's folders (chmod does not stop root: say it here)
        if ".partial-" in str(self):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    out = tmp_path / "ro" / "run"
    assert main(["import", "--hf", str(folder), "--out", str(out)]) == 2
    assert error_line(capsys) == (f"error: --out {out}: cannot write to {out.parent} (Read-only file system); choose a "
                                  f"writable directory; nothing was written")


def test_import_keeps_the_overrides_it_honours(imported):
    cfg = read_run(imported).cfg
    assert (cfg.model.compute_dtype, cfg.model.attention, cfg.train.lr) == ("bfloat16", "xla", 3e-4)
    assert cfg.model.d_model == 16 and cfg.model.prelude == 2  # the folder's
    assert cfg.data.seq_len == POSITIONS  # the default (128) capped at the folder's max_position_embeddings


@pytest.mark.parametrize("override,why", [
    ("model.d_model=32", "an imported model's architecture comes from {folder}/config.json (import honours only "
                         "model.compute_dtype and model.attention of the model section)"),
    ("model.heads=2", "an imported model's architecture comes from {folder}/config.json"),
    ("model.prelude=2", "an imported model's architecture comes from {folder}/config.json"),
    ("model.rope_base=500.0", "an imported model's architecture comes from {folder}/config.json"),
    ("data.tokenizer=bytes", "an imported run's tokenizer is {folder}/tokenizer.json, the one the weights were "
                             "trained with"),
    ("data.task=parity", "an imported run is a text run (data.task=text), its data the --data files"),
    # #27 pass 8: run.name / run.dir were accepted and dropped (the run went to --out)
    ("run.name=x", "--out names the imported run's directory"),
    ("run.dir=/tmp", "--out names the imported run's directory"),
    # #27 pass 20: data.paths replaced --data's files (given or the default) with no word
    ("data.paths=[a.txt]", "--data names the imported run's text (data.paths); give the files with --data"),
])
def test_import_refuses_overrides_the_folder_fixes(folder, tmp_path, capsys, monkeypatch, override, why):
    monkeypatch.setattr(hf_import, "import_folder", unreachable)  # refused before the weights are read
    assert main(["import", "--hf", str(folder), "--out", str(tmp_path / "r"), "data.seq_len=32", override]) == 2
    assert error_line(capsys).startswith(f"error: {override}: {why.format(folder=folder)}")
    assert not (tmp_path / "r").exists()


def test_import_refuses_a_seq_len_past_the_folders_positions(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hf_import, "import_folder", unreachable)
    assert main(["import", "--hf", str(folder), "--out", str(tmp_path / "r"), "data.seq_len=100000"]) == 2
    assert error_line(capsys) == (f"error: data.seq_len=100000 is above max_position_embeddings {POSITIONS} of "
                                  f"{folder}: the model was not trained on longer sequences; pass data.seq_len="
                                  f"{POSITIONS} or less")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags,message", [
    (["--chunk-tokens", "0"], "--chunk-tokens 0: give a number of tokens per record >= 1 (default 4096)"),
    (["--chunk-tokens", "-5"], "--chunk-tokens -5: give a number of tokens per record >= 1 (default 4096)"),
    (["--chunk-tokens", "64", "--shard-tokens", "10"], "--shard-tokens 10 is below --chunk-tokens 64: a shard holds "
                                                       "whole records; give --shard-tokens >= 64 (default 67108864)"),
    (["--shard-tokens", "0"], "--shard-tokens 0 is below --chunk-tokens 4096"),
    # #27 pass 7: a 20-digit record size was told to raise --shard-tokens to 20 digits; --out '' was the current
    # directory ("remove . yourself")
    (["--chunk-tokens", "99999999999999999999"], "--chunk-tokens 99999999999999999999 is above --shard-tokens "
                                                 "67108864: a shard holds whole records; lower --chunk-tokens (default "
                                                 "4096)$"),
    (["--out", ""], "--out '': name the directory to write, e.g. --out prepared/NAME$"),
])
def test_prepare_names_its_flags(tmp_path, capsys, flags, message):
    out = [] if "--out" in flags else ["--out", str(tmp_path / "p")]
    assert main(["prepare", *out, *flags]) == 2
    line = error_line(capsys)
    assert line == f"error: {message[:-1]}" if message.endswith("$") else line.startswith(f"error: {message}")
    assert not (tmp_path / "p").exists()


def test_prepare_corpus_names_its_arguments(tmp_path):
    """The library's callers pass chunk_tokens= and shard_tokens=: its messages name those."""
    text = tmp_path / "a.txt"
    text.write_text("In the beginning.\n\n" * 20)
    cfg = load_config(None, ["data.task=text", f"data.paths=[{str(text)!r}]"])
    with pytest.raises(DataError, match=r"^shard_tokens 8 is below chunk_tokens 16: a shard holds whole records"):
        prepare_corpus(cfg, tmp_path / "p", chunk_tokens=16, shard_tokens=8, progress=False)


def test_prepare_onto_a_full_disk_is_one_line(tmp_path, monkeypatch):
    """Pass 5: the ArrayRecord writer's RuntimeError on a full disk was a traceback (its temporary folder was removed)."""
    from array_record.python import array_record_module

    class Full:
        def __init__(self, path, options):
            pass

        def write(self, data):
            raise RuntimeError("write() failed: No space left on device; writing x.array_record; at byte 200704")

    monkeypatch.setattr(array_record_module, "ArrayRecordWriter", Full)
    text = tmp_path / "a.txt"
    text.write_text("In the beginning.\n\n" * 20)
    cfg = load_config(None, ["data.task=text", f"data.paths=[{str(text)!r}]"])
    with pytest.raises(DataError, match=r"^--out .*p: writing the prepared corpus failed \(No space left on device; disk "
                                        r"full or read-only\?\); nothing was replaced$"):
        prepare_corpus(cfg, tmp_path / "p", chunk_tokens=16, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_import_splits_documents_at_blank_lines(imported):
    """import's corpus is split at blank lines: its '\\n\\n' in YAML single quotes was folded into one newline,
    so every line of the text was a document (issue 27 pass 10)."""
    assert load_config(imported / "config.yaml").data.doc_separator == "\n\n"


def test_what_a_kill_9_left_is_removed_by_the_next_write_of_that_out(imported, folder, tmp_path, capsys):
    """#27 pass 12: `kill -9` during `export`, `import` or `convert` left its hidden temporary folder
    (``.NAME.tmp-PID``, ``.NAME.partial-PID``: the whole checkpoint) beside --out for good; the next write of that
    --out now removes one whose process is gone, and keeps one that holds anything it does not write."""
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    left = {tmp_path / f".hf.tmp-{dead.pid}": ["config.json", "model.safetensors"],
            tmp_path / f".run.partial-{dead.pid}": ["config.yaml", "checkpoints/0/x"],
            tmp_path / f".run.partial-{dead.pid + 1}": ["config.yaml", "mine.txt"]}
    for leftover, files in left.items():
        for name in files:
            (leftover / name).parent.mkdir(parents=True, exist_ok=True)
            (leftover / name).write_text("half")
    assert main(["export", "--run", str(imported), "--out", str(tmp_path / "hf")]) == 0
    assert main(["import", "--hf", str(folder), "--out", str(tmp_path / "run")]) == 0
    assert f"removed {tmp_path}/.hf.tmp-{dead.pid}, left by an interrupted export" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".run.partial-{dead.pid + 1}", "hf", "run"]


@pytest.mark.parametrize("name", ["", "config.json", "tokenizer.json", "model.safetensors"])
def test_import_of_a_folder_this_user_may_not_read(folder, tmp_path, capsys, monkeypatch, name):
    """#27 pass 18, as a user other than root (chmod 000): an unreadable config.json (or folder) was a PermissionError
    traceback, and an unreadable model.safetensors "cannot read it as safetensors (FileNotFoundError: No such file or
    directory)"."""
    hf = tmp_path / "hf"
    shutil.copytree(folder, hf)
    hidden, real = hf / name, os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != hidden and real(p, mode, **k))
    assert main(["import", "--hf", str(hf), "--out", str(tmp_path / "out")]) == 2
    what = name or "the folder"
    assert error_line(capsys) == f"error: --hf {hf}: this user may not read {what}; make it readable (chmod -R u+rX {hf})"
    assert not (tmp_path / "out").exists()


def test_an_exported_run_encodes_a_prompt_as_the_run_does(tmp_path, capsys):
    """#27 pass 26: a run trains each document as BOS ids EOS and `generate` puts BOS before a prompt; export copied
    its tokenizer.json as it was, so transformers and the imported run (prompt_format tokenizer) encoded a prompt
    without it, and the round trip's continuation differed from the run's with no word (the logits of one input
    matched). The folder's tokenizer now puts BOS in front, as the run does; an imported run's is kept as it was."""
    from loopformer.data.tokenizers import read_tokenizer
    from loopformer.inference.generate import prompt_ids, tokenizer_of
    from tests.conftest import make_run

    cfg = load_config("configs/text_bytes.yaml", [
        f"run.dir={tmp_path}", "run.name=bpe", "data.tokenizer=bpe", "data.vocab_size=300", "data.seq_len=32",
        "model.mlp=swiglu", "model.d_model=16", "model.heads=2", "model.stages=[]", "model.prelude=1"])
    run = make_run(cfg)
    prompt = "And God said"
    for source, out in ((run, tmp_path / "hf"), (tmp_path / "back", tmp_path / "hf_again")):
        info = read_run(source)
        want = prompt_ids(tokenizer_of(info.data), prompt, info.cfg.data.prompt_format)
        assert main(["export", "--run", str(source), "--out", str(out)]) == 0
        assert read_tokenizer(out / "tokenizer.json").encode_prompt(prompt) == want  # transformers' encoding
        if source == run:
            assert want[0] == tokenizer_of(info.data).bos_id
            assert main(["import", "--hf", str(out), "--out", str(tmp_path / "back")]) == 0
            back = read_run(tmp_path / "back")
            assert prompt_ids(tokenizer_of(back.data), prompt, back.cfg.data.prompt_format) == want
    capsys.readouterr()
