"""The files of a run directory, named in one place. This module imports nothing of loopformer, so
every part of the package may use it (the data layer, below `loopformer.runs`, included).

    <run.dir>/<run.name>/
      config.yaml            resolved config of the latest start (a resume may change all but the
                             architecture and the task)
      config_changes.jsonl   one line per resume that changed settings: {"step", "changes": [...]}
      checkpoints/<step>/    orbax: params, optimizer, step, grain iterator state, checksums
      tokenizer.json         text runs: the run's tokenizer (written next to the checkpoints)
      metrics.jsonl, tb/     logged scalars and tensorboard events
      final_sweep.json       eval.sweep_loops: the end-of-training sweep
      .train.lock            held (flock) by the training process for the run's life: a second
                             trainer on the directory stops with one line (multi-process runs: process i
                             of n > 1 locks .train.lock.i); analysis commands take no lock

The analysis commands write their outputs into the run as well (ablation.csv/.png, activity.csv/.png,
rys.csv, rys_<split>.png, sweeps/<circuits>/); each command names its own files.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from loopformer.errors import AnalysisError, CheckpointError, ConfigError

CONFIG_FILE = "config.yaml"
CHANGES_FILE = "config_changes.jsonl"
CHECKPOINTS = "checkpoints"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
FINAL_SWEEP_FILE = "final_sweep.json"
LOCK_FILE = ".train.lock"
WRITE_PROBE = ".write_test."  # prefix of the file a writability check creates and removes

OLDER_LAYOUT = ("comes from an older loopformer layout (before 0.2: circuit weights stored by group, "
                "stages/S/groups/G) that this version cannot read; retrain the run with this version, or read it "
                "with loopformer 0.1 (git commit 31e85c4 and earlier)")


@dataclass(frozen=True)
class RunDir:
    """The paths of the run directory ``path`` (nothing is read or created by constructing one)."""

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def changes(self) -> Path:
        return self.path / CHANGES_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def tb(self) -> Path:
        return self.path / TB_DIR

    @property
    def final_sweep(self) -> Path:
        return self.path / FINAL_SWEEP_FILE

    @property
    def holds_run(self) -> bool:
        """Whether a run lives here: its config.yaml beside its checkpoints/."""
        return self.config.is_file() and self.checkpoints.is_dir()

    def lock(self, process: int = 0) -> Path:
        """The lock file of training process ``process`` (``.train.lock``, or ``.train.lock.<i>``)."""
        return self.path / (LOCK_FILE if process == 0 else f"{LOCK_FILE}.{process}")

    def checkpoint_steps(self) -> list[int]:
        """Steps with a checkpoint directory on disk (finished or not), ascending; cheap, no orbax. A file (or a link to
        nowhere) named like a step is none: `inspect` listed it, and a resume to its step left config.yaml as it was,
        taking it for a rerun that trains nothing."""
        ckpt = self.checkpoints
        if not ckpt.is_dir():
            return []
        misnamed_step(ckpt)
        return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit() and p.is_dir())

    def trained_to(self) -> int | None:
        """The newest checkpoint step on disk, or None."""
        steps = self.checkpoint_steps()
        return steps[-1] if steps else None


def misnamed_step(checkpoints: Path) -> None:
    """CheckpointError for a folder of ``checkpoints`` named like a step but not as the checkpoint library names one
    (``03``, other scripts' digits): the library saw no checkpoint in it ("no checkpoint: train first") while a
    resume took it for one, trained from scratch and replaced the run's metrics (#27 pass 22)."""
    odd = next((p for p in sorted(checkpoints.iterdir()) if p.name.isdigit() and p.is_dir() and p.name != str(int(p.name))),
               None)
    if odd is not None:
        plain = odd.with_name(str(int(odd.name)))
        mv = f"mv {shlex.quote(str(odd))} {shlex.quote(str(plain))}"  # quoted: a run folder may hold a space
        raise CheckpointError(f"{odd} is named like checkpoint step {int(odd.name)}, but the checkpoint library reads a "
                              f"step only by its plain number, so it is no checkpoint; rename it ({mv})"
                              + (", or remove one of the two" if plain.exists() else "") + " to resume from it")


DANGLING = "a symlink that leads nowhere (or in a loop)"

# the files that mark a folder another command wrote (`prepare --out`, `export --out`), which no run holds: what it
# is, and how a run is made of it (`--run` of one said "train first", and a run trained into it replaced its
# tokenizer.json; #27 pass 33)
FOREIGN_FOLDERS = (("meta.json", "a corpus written by `loopformer prepare`", "train a run on it (data.paths=[{}])"),
                   ("config.json", "a Hugging Face model folder", "import it (loopformer import --hf {} --out "
                                                                  "runs/NAME)"))


def not_a_file(path: str | Path) -> str | None:
    """What is at ``path`` where a file is wanted and none is, worded to follow the path in a message: "is a folder",
    "is a pipe or a device", "is a symlink that leads nowhere (or in a loop)", "cannot be reached: ..." (`unreachable`)
    or "does not exist"; None for a regular
    file (or a link to one). The one wording of the commands, the config loader, the probe and corpus readers and the
    bench scripts (each had its own: #27 pass 24's leftover). A FIFO is named and never opened (with no writer it
    blocks its reader forever); a dangling link is there ("not found" sent the user looking for it). The os.path tests
    answer a name too long for the filesystem as absent (pathlib's raised)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return None
    if os.path.isdir(path):
        return "is a folder"
    if os.path.exists(path):
        return "is a pipe or a device"
    if os.path.islink(path):
        return f"is {DANGLING}"
    return unreachable(path) or "does not exist"


def unreachable(path: str | Path) -> str | None:
    """"cannot be reached: this user may not open FOLDER on its way; make it readable (chmod u+rx FOLDER)" for the
    first folder on ``path``'s way this user may not open (`unopened_parent`), worded to follow the path in a line
    (callers add their other way out: ", or choose another --out"); None when the way is open. The one wording of
    the commands, the config loader and the bench scripts (four lines had each their own)."""
    closed = unopened_parent(path)
    return (f"cannot be reached: this user may not open {closed} on its way; make it readable "
            f"(chmod u+rx {shlex.quote(closed)})" if closed else None)


def unopened_parent(path: str | Path) -> str | None:
    """The first folder on ``path``'s way that is there and that this user may not open (no execute permission),
    or None: what hides a path another user made (``--run`` of a run behind such a folder "does not exist", and the
    fix named was to point --run at a run, which it is; #27 pass 31). The way is walked as the system walks it, one
    name at a time: ``closed/../run`` passes through ``closed`` (the normalized path, ``run``, does not, and that
    path was called missing; #27 pass 32). The folder is named by its real path (a link on the way resolved)."""
    path = os.path.expanduser(os.fspath(path))
    head, names = ("/", path.split("/")[1:]) if os.path.isabs(path) else (os.getcwd(), path.split("/"))
    names = [n for n in names if n not in ("", ".")]
    for name in names[:-1]:  # the path itself is no folder on its way
        if os.path.isdir(head) and not os.access(head, os.X_OK):
            return os.path.realpath(head)
        head = os.path.join(head, name)
        if not os.path.lexists(head):
            return None
    return os.path.realpath(head) if names and os.path.isdir(head) and not os.access(head, os.X_OK) else None


def special(path: Path) -> str | None:
    """What ``path`` is when something is there but no regular file ("a folder", "a pipe or a device", "a symlink that
    leads nowhere (or in a loop)"; `not_a_file`), else None. Checked before a run's file is opened: a FIFO with no
    writer blocks the reader forever, and a dangling link was written through or called missing."""
    kind = not_a_file(path)
    return None if kind in (None, "does not exist") else kind.removeprefix("is ")


def unreadable(*paths: Path) -> Path | None:
    """The first of ``paths``, or of what lies under a folder among them, that this user may not read (a folder: list
    and enter); None when none. Root reads anything, so this matters to everyone else: an unreadable file was a
    PermissionError traceback, or the library reading it called it missing or corrupt."""
    for top in paths:
        for path in itertools.chain([top], top.rglob("*") if top.is_dir() else ()):  # lazy: top is checked first
            if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
                return path
    return None


def read_only(*paths: Path) -> Path | None:
    """The first of ``paths`` that exists and this user may not write (a folder: create and remove in it); None when
    none (root writes anything)."""
    return next((p for p in paths if p.exists() and not os.access(p, os.W_OK | (os.X_OK if p.is_dir() else 0))), None)


def through_link(path: Path) -> Path:
    """Where a write to ``path`` lands: the file or folder a symlink leads to, else ``path``. A write renamed into place
    onto the link itself would replace the link, and what it named would keep the earlier content with no word
    (`replace_file`, a sweep's tensorboard run, `export`'s folder, a bench script's --out: #27 passes 27 and 28)."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (a symlink: the file it leads to) through a temporary file beside it, renamed into
    place: a kill leaves the old file or the new one, never half of one. AnalysisError naming a file that cannot be
    written (read-only, which a rename would get past, a full disk, a folder in its place)."""
    path = through_link(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder: the rename stays on one filesystem
    try:
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError("the file is read-only")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        raise AnalysisError(f"cannot write {path} ({e.strerror or e}): make it and its folder writable (or free disk "
                            f"space) and run the command again") from None
    finally:
        tmp.unlink(missing_ok=True)


def mount_point(path: Path) -> bool:
    """Whether the directory ``path`` is a mount point, a bind mount of a folder of the same disk (a container's
    volume) included, which `os.path.ismount` misses: a folder cannot be renamed onto one ("Device or resource
    busy"), so a command that writes its output beside ``path`` and renames it into place cannot use it."""
    if not path.is_dir():
        return False
    if os.path.ismount(path):
        return True
    try:
        where = os.path.realpath(path)
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            # field 5: the mount point, with spaces, tabs, newlines and backslashes as octal escapes
            return any(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split(" ")[4]) == where for line in f)
    except (OSError, IndexError):  # no /proc (macOS): ismount's answer stands
        return False


NAME_MAX = 255  # bytes in one file or folder name (Linux, macOS)
PATH_ROOM = 3840  # bytes of a folder's absolute path, leaving room below PATH_MAX (4096) for the files written in it
SIBLING = 24  # bytes a temporary sibling adds to a name (".NAME.partial-PID", ".NAME.tmp-PID")


def too_long(path: Path, what: str, slack: int = 0) -> str | None:
    """Why ``path`` cannot be made (a name in it longer than NAME_MAX - ``slack`` bytes, ``slack`` being what a
    temporary sibling adds to the last one; or the whole longer than PATH_ROOM), naming it as ``what``; None when
    neither: otherwise the first file written there fails as "File name too long", a traceback."""
    full = Path(os.path.abspath(path))
    for i, name in enumerate(full.parts):
        room = NAME_MAX - (slack if i == len(full.parts) - 1 else 0)
        if len(os.fsencode(name)) > room:
            return (f"{what}: the name {name[:24]}... is {len(os.fsencode(name)):,} bytes, and a name can be at most "
                    f"{room} here; choose a shorter one")
    if len(os.fsencode(str(full))) > PATH_ROOM:
        return (f"{what}: the path is {len(os.fsencode(str(full))):,} bytes, and the files written in it need it "
                f"under {PATH_ROOM:,} (the limit of a path is 4,096); choose a shorter one")
    return None


def unwritable_target(out: Path, what: str, child: str, flag: str = "--out") -> str | None:
    """Why ``out`` cannot receive ``what`` (a run, a corpus, a folder), which a command writes beside it and
    renames into place; None when nothing stands in the way. Three things do, whatever the command: a symlink
    that leads nowhere or in a loop (resolving it fails; renaming onto it fails as "Not a directory") and a
    mount point (renaming onto it fails as "Device or resource busy"); and a name too long for the filesystem,
    with its sibling's suffix (`too_long`). ``child`` names the folder inside a mount point that the message
    suggests."""
    long = too_long(out, f"{flag} {out}", SIBLING)
    if long:
        return long
    dangling = out.is_symlink() and not out.exists()
    try:
        out.resolve()
    except (OSError, RuntimeError):  # RuntimeError: Python before 3.13 on a symlink loop
        dangling = True
    if dangling:  # the link may be a folder on the way: a loop there failed to resolve as ``out`` (#27 pass 31)
        link = next((p for p in (out, *out.parents) if p.is_symlink() and not p.exists()), out)
        return f"{flag} {out}{'' if link == out else f': {link}'} is {DANGLING}; remove it or choose another {flag}"
    if mount_point(out):
        return (f"{flag} {out} is a mount point, and the {what} is written beside it and renamed into place; give a "
                f"folder inside it, e.g. {flag} {out / child}")
    try:
        here = out.resolve() == Path.cwd().resolve()
    except OSError:  # the current directory was deleted: `CWD_GONE` says so where a path is used
        here = False
    if here:  # `export --out .` was a StopIteration traceback, `prepare --out .` "not a corpus, remove . yourself", and
        # the current directory by its full name was renamed over, the shell left in a removed folder (#27 pass 40)
        return (f"{flag} {out} is the current directory, and the {what} is written beside it and renamed into place "
                f"(the shell would be left in a removed folder); name a new folder, e.g. {flag} {child}")
    return None


def not_a_folder(path: Path) -> tuple[Path, str] | None:
    """(``path`` or the nearest of its parents that is there, what it is) when that is no folder: "a file" (or a pipe
    or a device) or `DANGLING`, where no folder can be made (mkdir said "File exists" or "Not a directory", which
    named neither the file nor the link); None when the nearest is a folder."""
    nearest = next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), None)
    if nearest is None or nearest.is_dir():
        return None
    return nearest, DANGLING if not nearest.exists() else "a file"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (this process counts as not: an earlier call in it writes no more)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_siblings(out: Path, kinds: tuple[str, ...], written: re.Pattern[str]) -> list[Path]:
    """The temporary folders ``.<name>.<kind>-PID`` beside ``out`` (``kind`` one of ``kinds``) of processes that no
    longer run, holding nothing but names ``written`` matches (what that command writes there, so nothing of the
    user's): what a writer killed before it renamed its work into place (``kill -9``, a crash) left behind."""
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(out.name)}\.({'|'.join(kinds)})-(\d+)")
    found = []
    for entry in sorted(out.parent.iterdir()):
        m = pattern.fullmatch(entry.name)
        if not m or entry.is_symlink() or not entry.is_dir() or process_alive(int(m.group(2))):
            continue
        if all(written.fullmatch(f.name) for f in entry.iterdir()):
            found.append(entry)
    return found


def outside_runs(out: Path, flag: str = "--out") -> Path:
    """``out`` when no run directory (config.yaml beside checkpoints/) holds it; ConfigError otherwise: a folder
    written inside a run is read as one of its checkpoints, or deleted when the trainer prunes them. An ``out`` behind
    a folder this user may not open is named with it (its parents' checks raised on it, and the line named a
    config.yaml there the user never gave: ``export --out closed/a/hf`` named ``closed/a/config.yaml``; #27 pass 32)."""
    closed = unreachable(out)
    if closed:
        raise ConfigError(f"{flag} {out} {closed}, or choose another {flag}")
    for parent in out.expanduser().absolute().parents:
        if RunDir(parent).holds_run:
            raise ConfigError(f"{flag} {out} is inside the run {parent}; write it outside any run directory (a folder "
                              f"there can be taken for a checkpoint or pruned with them)")
    return out
