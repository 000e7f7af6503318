"""Train transformers with built-in looped circuits, then evaluate, ablate, sweep, decode and operate on them.

Command line: ``loopformer train | eval | ablate | sweep | generate | inspect | prepare | activity | rys |
convert | import | export`` (also ``python -m loopformer``). One module per command; nothing in the package imports this one.

User mistakes (bad config, missing run, unknown circuit) print one ``error:`` line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from loopformer.errors import DecodingError, LoopformerError

MODULES = ("train", "eval", "ablate", "sweep", "generate", "inspect", "prepare", "activity", "rys", "convert", "hf_import",
           "export")


def main(argv: list[str] | None = None) -> int:
    for name in MODULES:
        importlib.import_module(f"loopformer.cli.{name}")  # each registers its command
    from loopformer.cli.common import COMMANDS

    parser = argparse.ArgumentParser(prog="loopformer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    # SIGTERM (a scheduler, `timeout`, `kill`) unwinds like Ctrl-C, so that a command's cleanup runs (temporary
    # folders removed, checkpoints finished, locks released) instead of the process vanishing mid-write.
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    try:
        return COMMANDS[args.command][2](args)
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


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


if __name__ == "__main__":
    sys.exit(main())
