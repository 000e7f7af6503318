"""The trainer's lock on a run directory (`run_lock`): one training process per run."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import jax

from loopformer.errors import ConfigError
from loopformer.runs.layout import RunDir
from loopformer.runs.log import log


def lock_file(run_dir: Path, process: int = 0) -> Path:
    return RunDir(run_dir).lock(process)


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
    path = lock_file(run_dir, process)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                info = json.loads(os.pread(fd, 4096, 0) or b"{}")
                holder = f" (pid {info['pid']} on {info['host']}, since {info['since']})"
            raise ConfigError(f"{run_dir} is being trained by another process{holder}; wait for it to finish "
                              f"(or stop it), or set run.name=<another name> to start a separate run") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            if process == 0:
                log(f"note: {run_dir}'s filesystem has no file locks ({e.strerror}); nothing stops a second "
                    f"trainer on this directory")
        else:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
