"""Starting a run directory: create it (`make_run_dir`), check what a resume changes against the config
the run was trained with (`resume_changes`), write the new config (`prepare_run_dir`) and keep the
run's history of settings (`record_changes`)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shlex
from pathlib import Path
from typing import Any

import jax

from loopformer.config import ARCHITECTURE, SCHEDULE, TASK, Change, Config, circuit_label, config_changes, config_from_dict
from loopformer.errors import CheckpointError, ConfigError
from loopformer.runs.layout import (
    DANGLING,
    FOREIGN_FOLDERS,
    WRITE_PROBE,
    RunDir,
    not_a_folder,
    outside_runs,
    read_only,
    special,
)
from loopformer.runs.read import read_config_dict


def resume_changes(cfg: Config, run_dir: Path) -> list[Change]:
    """What ``cfg`` changes against the config a run directory was trained with (nothing for a fresh
    directory). CheckpointError naming the first field when the architecture or the task differs."""
    layout = RunDir(run_dir)
    orphans = [p.name for p in (layout.metrics, layout.tb) if p.exists()]
    if orphans and not layout.checkpoints.exists():  # a crash before the first save leaves checkpoints/ empty, not gone
        mv = f"mv {shlex.quote(str(run_dir))} {shlex.quote(f'{run_dir}.old')}"  # quoted: the folder may hold a space
        raise CheckpointError(
            f"{run_dir} holds {' and '.join(orphans)} of an earlier run but no checkpoints/ to resume from (deleted?); "
            f"training it again would mix the two runs' metrics. Move them aside ({mv}) or pick "
            f"a new run.name")
    saved = layout.config
    steps = layout.checkpoint_steps()
    if steps and not saved.is_file():  # the trainer writes config.yaml before its first checkpoint
        what = "missing" if not (saved.exists() or saved.is_symlink()) else "not a readable file"
        raise CheckpointError(
            f"{run_dir} holds checkpoints (step {steps[-1]}) but its config.yaml is {what}, so nothing says what they "
            f"were trained with; put the run's config.yaml back to resume it, or pick a new run.name (or move "
            f"{run_dir} aside) to start fresh")
    if not steps:
        return []
    old = read_config_dict(saved, run_dir)
    with contextlib.suppress(ConfigError):  # fields added since the run was written compare at their defaults
        old = config_from_dict(old).to_dict()
    changes = config_changes(_task_defaults(old), _task_defaults(cfg.to_dict()))
    refused = [c for c in changes if c.part in (ARCHITECTURE, TASK)]
    if refused:
        what = "architecture" if refused[0].part == ARCHITECTURE else "task"
        raise CheckpointError(
            f"{run_dir} holds a run with a different {what} ({refused[0]}); resume it with its own {what}, "
            f"or pick a new run.name (or delete {run_dir}) to start fresh")
    return changes


def _task_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a dict) with each synthetic task's ``task_args`` (the run's and its mixture entries') holding every
    argument, the defaults filled in: an argument given at its default (addition's ``width: 0``) or left out is the
    same task (a resume refused it as a different one)."""
    from loopformer.data.tasks import TASKS

    def filled(entry: dict[str, Any]) -> dict[str, Any]:
        cls, args = TASKS.get(entry.get("task")), entry.get("task_args")
        if cls is None or not isinstance(args, dict):
            return entry
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        return {**entry, "task_args": {**defaults, **args}}

    data = config.get("data")
    if not isinstance(data, dict):
        return config
    data = filled(data)
    if isinstance(data.get("mixture"), list):
        data["mixture"] = [filled(e) if isinstance(e, dict) else e for e in data["mixture"]]
    return {**config, "data": data}


def describe_change(change: Change) -> str:
    """``loops of X: uniform(8, 16) -> uniform(8, 24)``."""
    label = circuit_label(change.path)
    if change.part == SCHEDULE:
        return f"{label}: {change.old} -> {change.new}"
    return f"{label}: {change.old!r} -> {change.new!r}"


def make_run_dir(cfg: Config) -> Path:
    """Create the run directory; ConfigError with the fix if it cannot be written."""
    run_dir = cfg.run_dir
    # inside another run, its checkpoints/ above all, the run was read as a corrupt checkpoint of that one (with
    # advice to delete it) or pruned with its checkpoints
    outside_runs(run_dir, "run.dir / run.name")
    blocked = not_a_folder(run_dir)
    if blocked:  # mkdir's "File exists" or "Not a directory" named neither the file nor the link
        raise ConfigError(f"run.dir / run.name: {blocked[0]} is {blocked[1]}, not a directory; set "
                          f"run.dir=<a directory> or run.name=<another name>")
    # a folder another command wrote, where a run writes its own tokenizer.json: it replaced a prepared corpus's (whose
    # shards then read as another tokenizer's ids) or an exported model's, with no word (#27 pass 33)
    foreign = next(((name, what) for name, what, _ in FOREIGN_FOLDERS if (run_dir / name).is_file()), None)
    if foreign is not None and not RunDir(run_dir).holds_run:
        raise ConfigError(f"run.dir / run.name: {run_dir} is {foreign[1]} ({foreign[0]}), not a run, and a run "
                          f"writes its tokenizer.json, checkpoints and metrics there; set run.dir=<a directory> or "
                          f"run.name=<another name>")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f"{WRITE_PROBE}{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = f"free some space (df -h {shlex.quote(str(run_dir))}) or set run.dir=<a disk with room>"
        elif RunDir(run_dir).holds_run:  # a resume: another directory would start a new run, not continue this one
            fix = "make it writable to train it on, or set run.dir / run.name to start a separate run"
        else:
            fix = "set run.dir=<a writable directory> or run.name=<another name>"
        raise ConfigError(f"run.dir: cannot write to {run_dir} ({e.strerror or e}); {fix}") from None
    return run_dir


def anchor_paths(cfg: Config) -> None:
    """Make the relative entries of ``cfg``'s corpus paths (``data.paths``, a mixture entry's ``paths``) absolute, from
    the current directory, in place: a run's config.yaml held them as given, so a later command run from another
    directory read the file of that name there, another corpus, with no word (`eval` scored it, a resume trained on
    it, the config unchanged; #27 pass 24). ``asset:`` names and absolute paths stay as they are; ``~`` is expanded."""
    from loopformer.data.text import ASSET_PREFIX

    def anchored(paths: list[str]) -> list[str]:
        return [p if p.startswith(ASSET_PREFIX) or not p.strip() else str(Path(p).expanduser().absolute())
                for p in paths]

    cfg.data.paths = anchored(cfg.data.paths)
    for entry in cfg.data.mixture:
        entry.paths = anchored(entry.paths)


def prepare_run_dir(cfg: Config, *, write: bool = True) -> tuple[Path, list[Change]]:
    """Create the run directory (`make_run_dir`), check a resume against the run's config
    (`resume_changes`) and, with ``write``, write the new config (`write_config`). Returns the directory
    and the changes. The trainer writes later, once the data, model and checkpoint have accepted the new
    config: a resume that fails on them leaves the run's config.yaml as it was. The corpus paths are made absolute
    first (`anchor_paths`): a resume from another directory with the same relative paths is then a change."""
    anchor_paths(cfg)
    run_dir = make_run_dir(cfg)
    changes = resume_changes(cfg, run_dir)
    layout = RunDir(run_dir)
    for path, folder in ((layout.checkpoints, True), (layout.tb, True), (layout.metrics, False),
                         (layout.changes, False), (layout.tokenizer, False), (layout.final_sweep, False)):
        # each would fail as a traceback where the trainer writes it, and a FIFO would block it forever
        # (a dangling link where a folder goes made its mkdir a FileExistsError traceback: #27 pass 25)
        kind = ("a file" if path.exists() and not path.is_dir() else
                DANGLING if path.is_symlink() and not path.exists() else None) if folder else special(path)
        if kind:
            raise CheckpointError(f"{path} is {kind}, where the run keeps its {path.name} "
                                  f"(a {'folder' if folder else 'file'}); move it aside, or pick a new run.name")
    # written as training goes (step folders pruned, too): one read-only was a traceback at the first log line or
    # after the whole training (final_sweep.json), and a read-only checkpoints/ hung the checkpoint library forever
    ckpt_folders = sorted(p for p in layout.checkpoints.rglob("*") if p.is_dir()) if layout.checkpoints.is_dir() else []
    fixed = read_only(layout.config, layout.changes, layout.metrics, layout.tokenizer, layout.final_sweep, layout.tb,
                      layout.checkpoints, *ckpt_folders)
    if fixed:  # one this user may not read either (chmod 000) was "read-only", and the u+w it named left it unreadable
        unread = not os.access(fixed, os.R_OK | (os.X_OK if fixed.is_dir() else 0))
        what, mode = ("cannot be read or written by this user, and training reads and writes it; make it readable "
                      "and writable", "u+rwX") if unread else ("is read-only for this user, and training writes it; make "
                                                               "it writable", "u+w")
        raise CheckpointError(f"{fixed} {what} (chmod -R {mode} {shlex.quote(str(run_dir))}) to train the run on, or "
                              f"pick a new run.name")
    # checkpoints/ exists from the start, so that metrics without it mean a deleted run (resume_changes)
    layout.checkpoints.mkdir(exist_ok=True)
    if write:
        write_config(cfg, run_dir)
    return run_dir, changes


def write_config(cfg: Config, run_dir: Path) -> None:
    """Write ``cfg`` as the run's config.yaml (atomically), unless the run is already trained to train.steps
    (a rerun that trains nothing leaves config.yaml as it was)."""
    anchor_paths(cfg)
    done = RunDir(run_dir).trained_to()
    if jax.process_index() == 0 and not (done is not None and done >= cfg.train.steps):
        saved = RunDir(run_dir).config
        tmp = saved.with_suffix(".yaml.tmp")
        tmp.write_text(cfg.to_yaml())
        tmp.replace(saved)  # atomic: never a half-written config.yaml


def record_changes(run_dir: Path, step: int, changes: list[Change]) -> None:
    """Append a resume's changes to ``config_changes.jsonl`` (the run's history of settings)."""
    if not changes or jax.process_index() != 0:
        return
    line = {"step": step, "changes": [{"path": c.path, "old": c.old, "new": c.new, "part": c.part} for c in changes]}
    path = RunDir(run_dir).changes
    torn = False  # a last line cut short (a kill or a full disk mid-append): this record went onto its end, unreadable
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(("\n" if torn else "") + json.dumps(line) + "\n")
