"""Opening a run directory: its config (`load_run_config`) and what the config says about the run
(`read_run` -> `RunInfo`), enough to check an analysis command's flags before any weights are read
(`loopformer.runs.restore` reads them)."""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loopformer.config import Config, config_from_dict
from loopformer.config.load import DuplicateKey, UniqueKeyLoader
from loopformer.data.sources import DataSource, build_data
from loopformer.errors import AnalysisError, CheckpointError, not_utf8, printable
from loopformer.model.plan import resolve_loops
from loopformer.runs.layout import FOREIGN_FOLDERS, OLDER_LAYOUT, RunDir, not_a_file, special


def _training_difficulties(cfg: Config) -> list[tuple[tuple[int, int], float]]:
    """The difficulty ranges training draws from, each with its share: `Config.training_ranges`, and a single task's
    curriculum's earlier ranges at share 0."""
    single = not cfg.data.mixture and cfg.data.task != "text"
    return cfg.training_ranges() + [((int(c.difficulty[0]), int(c.difficulty[1])), 0.0)
                                    for c in (cfg.data.curriculum if single else [])]


def _older_layout(data: Any) -> bool:
    """Whether a config dict was written before circuits were stored by name (0.1: read/write fields)."""
    try:
        circuits = [c for s in data["model"]["stages"] for c in s["circuits"]]
    except (KeyError, TypeError):
        return False
    return any(isinstance(c, dict) and ("read" in c or "write" in c) for c in circuits)


def read_config_dict(path: Path, run_dir: Path) -> dict[str, Any]:
    """The config file ``path`` of run ``run_dir`` as a dict; CheckpointError when it is corrupt or
    comes from an older layout."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError as e:  # a binary or re-encoded file: yaml never sees it
        raise CheckpointError(f"{path} is corrupt (not UTF-8 text: bad byte at offset {e.start}); delete {run_dir} "
                              f"to start over") from None
    except DuplicateKey as e:  # edited by hand: the last value won with no word (a config given to train is refused)
        raise CheckpointError(f"{path}: {e}") from None
    except RecursionError:  # nested past Python's limit (edited by hand): a traceback (#27 pass 24)
        raise CheckpointError(f"{path} is corrupt (nested too deeply to read); delete {run_dir} to start over") from None
    except yaml.YAMLError:
        raise CheckpointError(f"{path} is corrupt (not YAML); delete {run_dir} to start over") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is corrupt (not a mapping); delete {run_dir} to start over")
    if _older_layout(data):
        raise CheckpointError(f"{run_dir} {OLDER_LAYOUT}")
    return data


def _enclosing_run(path: Path) -> Path | None:
    """The run directory that ``path`` lies inside (its checkpoints/ or a step of them), or None."""
    return next((p for p in path.parents if p.name and RunDir(p).config.is_file() and RunDir(p).checkpoints.is_dir()),
                None)


def relative_corpus_paths(cfg: Config) -> list[tuple[str, str]]:
    """The corpus paths of ``cfg`` that are relative (not ``asset:`` names, not absolute, not ``~/...``), each with
    its setting (``data.paths``, ``data.mixture.N.paths``): the file each names depends on the current directory."""
    from loopformer.data.text import ASSET_PREFIX

    def relative(p: str) -> bool:
        return bool(p.strip()) and not p.startswith(ASSET_PREFIX) and not Path(p).expanduser().is_absolute()

    found = [("data.paths", p) for p in cfg.data.paths if relative(p)]
    for i, entry in enumerate(cfg.data.mixture):
        found += [(f"data.mixture.{i}.paths", p) for p in entry.paths if relative(p)]
    return found


def refuse_relative_corpus(cfg: Config, path: Path) -> None:
    """CheckpointError naming the first relative corpus path of a run's config ``path``: a run trained before its
    corpus paths were kept absolute (#27 pass 24) holds them as given, relative to a directory it does not record,
    and was read from the current directory: another directory's file of that name, with no word (pass 24's
    leftover). Which directory was meant is not known here, so the user says it, once, in the file."""
    relative = relative_corpus_paths(cfg)
    if relative:
        key, entry = relative[0]
        raise CheckpointError(f"{path}: {key} holds {entry!r}, a path relative to the directory the run was trained "
                              f"from, which the run does not record (a run trained before 0.4 kept paths as given); "
                              f"edit it to the corpus's absolute path (e.g. {Path(entry).absolute()} if that was "
                              f"the current directory)")


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config of an existing run (for the analysis commands); CheckpointError for a relative corpus path
    (`refuse_relative_corpus`)."""
    run_dir = Path(run_dir)
    path = RunDir(run_dir).config
    kind = special(path)
    if kind:  # a FIFO would block the read forever; either was called missing
        raise CheckpointError(f"{path} is {kind}, not the run's config file; put the run's config.yaml back")
    foreign = next((f for f in FOREIGN_FOLDERS if (run_dir / f[0]).is_file()), None)
    if not path.is_file() and foreign:  # "train first" trained into it, which is refused: it is not a run's folder
        name, what, fix = foreign
        raise CheckpointError(f"no run at {run_dir}: it is {what} ({name}), not a run; "
                              f"{fix.format(shlex.quote(str(run_dir)))}, and point --run at that run")
    if not path.is_file():
        outer = _enclosing_run(run_dir)
        raise CheckpointError(f"no run at {run_dir}: {path} is missing (" + (
            f"{run_dir} lies inside the run {outer}: point --run at it)" if outer else
            "train first, or point --run at a directory made by `loopformer train`)"))
    cfg = config_from_dict(read_config_dict(path, run_dir))
    refuse_relative_corpus(cfg, path)
    return cfg


@dataclass
class RunInfo:
    """What ``config.yaml`` says about a run: enough to check flags before restoring anything.
    ``data`` is the run's data source (a synthetic task, or a text corpus read only when needed)."""

    path: Path
    cfg: Config
    data: DataSource
    circuits: list[str] = field(init=False)
    heads: list[str] = field(init=False)  # the circuits with a learned halting head (at most one)
    routed: list[str] = field(init=False)  # the circuits of routed stages (their router stops tokens: no --exit)
    defaults: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.circuits = [c.name for c in self.cfg.model.circuits()]
        self.heads = [c.name for c in self.cfg.model.circuits() if c.halting.has_head]
        self.routed = [c.name for s in self.cfg.model.stages if s.router.routes for c in s.circuits]
        self.defaults = {c.name: c.eval_loops for c in self.cfg.model.circuits()}

    @property
    def is_text(self) -> bool:
        """A text run (a mixture is not, even with a text entry: its text splits report bits per byte)."""
        return self.data.task is None and not self.cfg.data.mixture

    @property
    def splits(self) -> dict[str, tuple[int, int] | None]:
        """Eval split name (a mixture's: NAME/SPLIT) -> difficulty range [lo, hi] (None for text splits)."""
        ranges = self.cfg.data.split_ranges()
        return {k: (int(ranges[k][0]), int(ranges[k][1])) if ranges.get(k) else None for k in self.data.split_names}

    def training_range(self, circuit: str) -> tuple[int, int]:
        """The loop counts circuit ``circuit`` typically saw in training: [lo, hi] of its distribution; a
        per_difficulty circuit's, the counts of the training difficulties (its distribution alone, unknown without
        the data, says [count at difficulty 1, max_loops]: a max_loops raised past the training range's top count,
        e.g. as the cap of exits, was reported by inspect and shaded on the sweep plots as trained; #27 pass 38)."""
        dist = self.cfg.model.circuit(circuit).distribution()
        ranges = [lo_hi for lo_hi, _ in _training_difficulties(self.cfg)]
        if not dist.per_example or not ranges:
            return dist.typical_range()
        return min(dist.at(lo) for lo, _ in ranges), min(max(dist.at(hi) for _, hi in ranges), dist.cap)

    def training_mean(self, circuit: str) -> float | None:
        """The mean loop count of circuit ``circuit`` in training (a per_difficulty circuit's over its difficulties,
        drawn uniformly, weighted by a mixture's entries; None under a difficulty curriculum, whose ranges change
        with the step)."""
        dist = self.cfg.model.circuit(circuit).distribution()
        ranges = _training_difficulties(self.cfg)
        if not dist.per_example or not ranges:
            return dist.mean()
        if self.cfg.data.curriculum:
            return None
        if not 0 < sum(w for _, w in ranges) < float("inf"):  # (weights of 1e308 sum to inf)
            ranges = [(r, 1.0) for r, _ in ranges]
        total = sum(w for _, w in ranges)
        return sum(w * sum(min(dist.at(d), dist.cap) for d in range(lo, hi + 1)) / (hi - lo + 1)
                   for (lo, hi), w in ranges) / total

    def training_label(self, circuit: str) -> str:
        return str(self.cfg.model.circuit(circuit).distribution())

    def select_splits(self, names: Sequence[str] | None) -> list[str]:
        """``names`` (default: every eval split), checked against the run's eval splits."""
        if not names:
            return list(self.splits)
        for name in names:
            if name not in self.splits:
                key = "data.mixture" if self.cfg.data.mixture else "data.eval_splits"
                where = "" if self.is_text else f" ({key} in {RunDir(self.path).config})"
                raise AnalysisError(f"--split {shlex.quote(name)}: this run has no eval split '{name}'; its splits are "
                                    f"{', '.join(self.splits)}{where}")
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:  # it was run once and reported once, as if given once: say so rather than guess
            raise AnalysisError(f"--split {twice} is given twice; give each split once")
        return list(names)

    def full_loops(self, loops: Mapping[str, int] | None = None) -> dict[str, int]:
        """Every circuit's count: its eval_loops default, overridden by ``loops`` (checked)."""
        return resolve_loops(self.defaults, loops)


def read_run(path: str | Path) -> RunInfo:
    """Parse ``<path>/config.yaml``; the config's run.dir/run.name are re-pointed at ``path`` so a
    moved or copied run directory still finds its own checkpoints."""
    if not str(path).strip():  # Path('') is the current directory: "no run at ." named no input
        raise AnalysisError("--run '': name a run directory made by `loopformer train`, e.g. runs/quickstart")
    path = Path(path)
    if not os.path.isdir(path):  # (Path.is_dir raises on a name too long for the filesystem)
        what = not_a_file(path) or "is a file, not a folder"  # (a file was "no such directory")
        outer = _enclosing_run(path) if os.path.exists(path) else None
        if what.startswith("cannot be reached"):  # it may well be a run: the fix is the permission, not another path
            raise AnalysisError(f"--run {path} {what}, or copy the run where this user may")
        raise AnalysisError(f"--run {path} {what} (point --run at " + (f"the run that holds it, {outer})" if outer else
                            "a directory made by `loopformer train`, e.g. runs/quickstart)"))
    if not os.access(path, os.R_OK | os.X_OK):  # the PermissionError named config.yaml, not the folder
        raise AnalysisError(f"--run {path}: this user may not read the folder; make it readable (chmod -R u+rX "
                            f"{shlex.quote(str(path))})")
    byte = not_utf8(str(path.resolve()))
    if byte:  # its steps were "corrupt ... delete it (rm -r ...)", with the checkpoint library's tracebacks (#27 pass 33)
        shown = printable(path)
        raise AnalysisError(f"--run {shown}: its path holds the byte {byte}, which is not UTF-8 text, and the checkpoint "
                            f"library cannot open such a path; rename the folder in UTF-8 (its checkpoints are intact)")
    cfg = load_run_config(path)
    cfg.run.dir, cfg.run.name = str(path.resolve().parent), path.resolve().name
    return RunInfo(path, cfg, build_data(cfg))
