"""Exclusive locks: the trainer's on a run directory (`run_lock`: one training process per run), and
`exclusive` for any one file (`loopformer prepare`'s on its --out)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import jax

from loopformer import jsontext
from loopformer.errors import ConfigError
from loopformer.runs.layout import RunDir, read_only, special
from loopformer.runs.log import log


def lock_file(run_dir: Path, process: int = 0) -> Path:
    return RunDir(run_dir).lock(process)


@contextlib.contextmanager
def exclusive(path: Path, busy: str, *, unlocked_note: str | None = None, remove: bool = False) -> Iterator[Path]:
    """Hold an exclusive OS lock (``flock``) on the file ``path`` (created) for the block. Held by another
    process: ConfigError ``busy`` + " (pid P on HOST, since T)" + "; ..." (``busy`` may hold ``{holder}``).
    The kernel releases the lock when the process exits, however it exits; a filesystem without locks
    runs unlocked, logging ``unlocked_note`` if given. ``remove`` deletes the file when the block ends (a
    process that opened it just before then finds it unlinked once it holds the lock, and counts as busy)."""
    kind = special(path)
    if kind:  # a folder: IsADirectoryError; a FIFO opens, then fails as the holder is written (EINVAL)
        raise ConfigError(f"{path} is {kind}, where loopformer keeps a lock file; remove it")
    if read_only(path):  # opening it to write was a PermissionError traceback
        raise ConfigError(f"{path} is read-only for this user, where loopformer keeps a lock file; make it writable "
                          f"(chmod u+w {shlex.quote(str(path))}) or remove it")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    locked = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if remove and os.fstat(fd).st_ino != _inode(path):  # the holder removed it as we opened it
                raise BlockingIOError
            locked = True
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # not one this module wrote
                info = jsontext.loads(os.pread(fd, 4096, 0) or b"{}")
                holder = f" (pid {info['pid']} on {info['host']}, since {info['since']})"
            raise ConfigError(busy.replace("{holder}", holder)) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            if unlocked_note:
                log(unlocked_note.replace("{reason}", str(e.strerror)))
        else:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        yield path
    finally:
        if remove and locked:
            with contextlib.suppress(OSError):
                os.unlink(path)  # before releasing: nobody can lock this file after us
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def shared(path: Path) -> Iterator[None]:
    """Hold a shared OS lock (``flock``) on the existing file ``path`` for the block: a training reading a prepared
    corpus, which `prepare --force` then refuses to replace (`in_use`). A file that cannot be opened or locked is
    read unlocked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        fd = None
    try:
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def in_use(path: Path) -> bool:
    """Whether another process holds a lock on the file ``path`` (`shared`)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def run_lock(run_dir: Path, process: int | None = None) -> Iterator[Path]:
    """Hold an exclusive OS lock (``flock``) on the run directory while training it.

    The lock belongs to the open file, so the kernel releases it when the process exits, however it
    exits (``kill -9`` included): a stale lock file never blocks a later run. The file also names the
    holder (pid, host, start time) for the error the next trainer prints. In a multi-process run each
    process locks its own file (``.train.lock`` for process 0, ``.train.lock.<i>``), so a second job
    fails in every process at once instead of hanging in a collective. A filesystem without locks
    (some network mounts) trains unlocked, with a note."""
    process = jax.process_index() if process is None else process
    with exclusive(lock_file(run_dir, process),
                   f"{run_dir} is being trained by another process{{holder}}; wait for it to finish (or stop it), or set "
                   f"run.name=<another name> to start a separate run",
                   unlocked_note=(f"note: {run_dir}'s filesystem has no file locks ({{reason}}); nothing stops a second "
                                  f"trainer on this directory") if process == 0 else None) as path:
        yield path
