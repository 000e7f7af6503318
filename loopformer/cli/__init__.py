"""Train transformers with built-in looped circuits, then evaluate, ablate, sweep, decode and operate on them.

Command line: ``loopformer train | eval | ablate | sweep | generate | inspect | prepare | activity | rys |
convert | import | export`` (also ``python -m loopformer``). One module per command; nothing in the package imports this one.

User mistakes (bad config, missing run, unknown circuit) print one ``error:`` line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from loopformer.errors import DecodingError, LoopformerError

MODULES = ("train", "eval", "ablate", "sweep", "generate", "inspect", "prepare", "activity", "rys", "convert", "hf_import",
           "export")


MAX_EXAMPLES = 100_000  # per split: building more holds them all in memory for minutes (10,000: ±1% at 95%)


def main(argv: list[str] | None = None, *, process: bool | None = None) -> int:
    """Run one command; its exit status. ``process`` (default: when ``argv`` is None, i.e. the console script):
    this call is the whole process, so an interrupted command ends it at once (`_end_process`)."""
    code = _main(argv)
    if code in (130, 128 + signal.SIGTERM) and (argv is None if process is None else process):
        _end_process(code)
    return code


def _end_process(code: int) -> None:
    """Exit without the interpreter's teardown: after an interrupt, XLA's compiler threads may still run, and
    tearing the runtime down under them crashes (status 139 instead of 130 / 143). The command's own cleanup
    (temporary folders, checkpoints, locks) has already run as the exception unwound."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main(argv: list[str] | None) -> int:
    for name in MODULES:
        importlib.import_module(f"loopformer.cli.{name}")  # each registers its command
    from loopformer.cli.common import COMMANDS

    parser = argparse.ArgumentParser(prog="loopformer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    examples = getattr(args, "examples", None)
    if examples is not None and examples > MAX_EXAMPLES:
        print(f"error: --examples {examples}: at most {MAX_EXAMPLES:,} per split (they are all built in memory "
              f"first); 10,000 already gives ±1% at 95%", file=sys.stderr)
        return 2
    # SIGTERM (a scheduler, `timeout`, `kill`) unwinds like Ctrl-C, so that a command's cleanup runs (temporary
    # folders removed, checkpoints finished, locks released) instead of the process vanishing mid-write.
    _terminated.clear()
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    try:
        code = COMMANDS[args.command][2](args)
        if _terminated:  # the signal's exception was swallowed where Python cannot raise (a gc callback)
            print("terminated (the signal came where it could not stop the command, which finished)", file=sys.stderr)
            return 128 + signal.SIGTERM
        return code
    except DecodingError as e:  # the model layer says why; the command line knows the way around it
        print(f"error: {e}; use --no-cache (recomputes the prefix every token)", file=sys.stderr)
        return 2
    except LoopformerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread (a BaseException, like KeyboardInterrupt: `except Exception` lets it by)."""


_terminated: list[bool] = []


def _terminate(signum: int, frame: object) -> None:
    """First SIGTERM: unwind (`Terminated`); it is remembered, in case Python swallows the exception (it does
    in gc callbacks), and the default action is back, so a second SIGTERM ends the process at once."""
    _terminated.append(True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated


if __name__ == "__main__":
    sys.exit(main())
