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
from loopformer.errors import AnalysisError, CheckpointError
from loopformer.model.plan import resolve_loops
from loopformer.runs.layout import OLDER_LAYOUT, RunDir, special


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


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config of an existing run (for the analysis commands)."""
    run_dir = Path(run_dir)
    path = RunDir(run_dir).config
    kind = special(path)
    if kind:  # a FIFO would block the read forever; either was called missing
        raise CheckpointError(f"{path} is {kind}, not the run's config file; put the run's config.yaml back")
    if not path.is_file():
        outer = _enclosing_run(run_dir)
        raise CheckpointError(f"no run at {run_dir}: {path} is missing (" + (
            f"{run_dir} lies inside the run {outer}: point --run at it)" if outer else
            "train first, or point --run at a directory made by `loopformer train`)"))
    return config_from_dict(read_config_dict(path, run_dir))


@dataclass
class RunInfo:
    """What ``config.yaml`` says about a run: enough to check flags before restoring anything.
    ``data`` is the run's data source (a synthetic task, or a text corpus read only when needed)."""

    path: Path
    cfg: Config
    data: DataSource
    circuits: list[str] = field(init=False)
    defaults: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.circuits = [c.name for c in self.cfg.model.circuits()]
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
        """The loop counts circuit ``circuit`` typically saw in training: [lo, hi] of its distribution."""
        return self.cfg.model.circuit(circuit).distribution().typical_range()

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
                raise AnalysisError(f"--split {name}: this run has no eval split '{name}'; its splits are "
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
        what = ("a symlink that leads nowhere (or in a loop)" if os.path.islink(path) else
                "a file, not a directory" if os.path.exists(path) else "no such directory")  # (a file was "no such")
        outer = _enclosing_run(path) if os.path.exists(path) else None
        raise AnalysisError(f"--run {path}: {what} (point --run at " + (f"the run that holds it, {outer})" if outer else
                            "a directory made by `loopformer train`, e.g. runs/quickstart)"))
    if not os.access(path, os.R_OK | os.X_OK):  # the PermissionError named config.yaml, not the folder
        raise AnalysisError(f"--run {path}: this user may not read the folder; make it readable (chmod -R u+rX "
                            f"{shlex.quote(str(path))})")
    cfg = load_run_config(path)
    cfg.run.dir, cfg.run.name = str(path.resolve().parent), path.resolve().name
    return RunInfo(path, cfg, build_data(cfg))
