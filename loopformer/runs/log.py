"""Progress messages: the one `log` of the package. This module imports nothing of loopformer, so
every part may use it (the data layer's "trained a BPE tokenizer" included).

A message goes to stderr, so that an analysis command's stdout carries only its table or JSON
document; the trainer's progress is what ``loopformer train`` prints, so it logs to stdout
(`log_to`). Only process 0 of a multi-process run prints.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Literal, TypeVar

T = TypeVar("T")

Stream = Literal["stdout", "stderr"]
_stream: list[Stream] = ["stderr"]  # looked up on sys at each call (tests replace sys.stdout / sys.stderr)


def log(msg: str) -> None:
    """Print ``msg`` (flushed) on the current log stream, on process 0 only."""
    import jax  # imported here: a module this low in the package stays cheap to import

    if jax.process_index() == 0:
        print(msg, file=getattr(sys, _stream[-1]), flush=True)


@contextlib.contextmanager
def log_to(stream: Stream) -> Iterator[None]:
    """`log` writes to ``stream`` inside the block (the trainer: stdout)."""
    _stream.append(stream)
    try:
        yield
    finally:
        _stream.pop()


TICK_S = 5.0  # a bar on a terminal is redrawn at least this often, however long one item takes


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """``items`` with a progress bar (tqdm) on the log stream while it is a terminal, redrawn at least every
    `TICK_S` seconds (its elapsed time moves while one item takes long: a rys setting over a long probe, one
    eval batch with exits): long analysis commands (sweep, rys, ablate) show where they are. Off a terminal
    (pipes, CI, tests) nothing is drawn; the commands' own `log` lines still say what was done."""
    with progress_bar(desc, total) as bar:
        for item in items:
            yield item
            bar.update(1)


def progress_bar(desc: str, total: float | None = None, unit: str = "it", enabled: bool = True) -> Any:
    """A tqdm bar updated by hand (``bar.update(n)``; close it, or use it as a context manager), drawn on the log
    stream under the same rule as `progress`; ``unit="B"`` counts bytes (kB, MB). A bar that is off counts
    nothing: keep your own count."""
    from tqdm import tqdm

    stream = getattr(sys, _stream[-1])
    import jax

    off = (not enabled or jax.process_index() != 0 or not (hasattr(stream, "isatty") and stream.isatty()))
    bar = tqdm(desc=desc, total=total, unit=unit, unit_scale=unit == "B", file=stream, disable=off, leave=False,
               mininterval=0.5, maxinterval=10.0, dynamic_ncols=True)
    if not off:
        _tick(bar)
    return bar


def _tick(bar: Any) -> None:
    """Redraw ``bar`` every `TICK_S` seconds from a daemon thread until it closes (tqdm redraws only on an
    update; its lock keeps the two threads' redraws apart)."""
    closed = threading.Event()
    close = bar.close

    def ticking() -> None:
        while not closed.wait(TICK_S):
            bar.refresh()

    def closing() -> None:
        closed.set()
        close()

    bar.close = closing
    threading.Thread(target=ticking, name=f"tick {bar.desc}", daemon=True).start()
