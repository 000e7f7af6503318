"""A stop asked for by a signal (SIGTERM, Ctrl-C). The command line's handler raises at once (`Terminated`,
KeyboardInterrupt) and also records the signal here, because Python drops an exception raised where it cannot
propagate (a garbage-collection callback). Long loops call `check` between steps, so a stop that was dropped
still ends them at the next step, not after the last."""

from __future__ import annotations

import signal

_requested: list[int] = []


class Terminated(BaseException):
    """SIGTERM, raised in the main thread (a BaseException, like KeyboardInterrupt: `except Exception` lets it by)."""


def request(signum: int) -> None:
    _requested.append(signum)


def clear() -> None:
    _requested.clear()


def requested() -> int | None:
    """The first signal that asked for a stop since `clear`, or None."""
    return _requested[0] if _requested else None


def check() -> None:
    """Raise the stop a signal asked for (again, if its first exception was dropped)."""
    signum = requested()
    if signum == signal.SIGTERM:
        raise Terminated
    if signum is not None:
        raise KeyboardInterrupt
