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
from loopformer.runs import stop
from loopformer.runs.stop import Terminated

MODULES = ("train", "eval", "ablate", "sweep", "generate", "inspect", "prepare", "activity", "rys", "convert", "hf_import",
           "export")




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
    try:
        for name in MODULES:
            importlib.import_module(f"loopformer.cli.{name}")  # each registers its command (and imports JAX)
    except KeyboardInterrupt:  # Ctrl-C in the first second: not a traceback through `import jax`
        print("interrupted", file=sys.stderr)
        return 130
    from loopformer.cli.common import COMMANDS
    from loopformer.config.schema import MAX_EVAL_EXAMPLES

    parser = argparse.ArgumentParser(prog="loopformer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    examples = getattr(args, "examples", None)
    if examples is not None and examples > MAX_EVAL_EXAMPLES:
        print(f"error: --examples {examples}: at most {MAX_EVAL_EXAMPLES:,} per split (they are all built in memory "
              f"first); 10,000 already gives ±1% at 95%", file=sys.stderr)
        return 2
    # SIGTERM (a scheduler, `timeout`, `kill`) unwinds like Ctrl-C, so that a command's cleanup runs (temporary
    # folders removed, checkpoints finished, locks released) instead of the process vanishing mid-write.
    stop.clear()
    main_thread = threading.current_thread() is threading.main_thread()
    # (a signal the parent set to be ignored, e.g. SIGINT of a background job, stays ignored)
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
                if main_thread and signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        code = COMMANDS[args.command][2](args)
        signum = stop.requested()
        if signum is not None:  # its exception was swallowed where Python cannot raise it (a gc callback)
            what = "terminated" if signum == signal.SIGTERM else "interrupted"
            print(f"{what} (the signal came where it could not stop the command, which finished)", file=sys.stderr)
            return 128 + signum
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
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop.clear()  # reported above: a later command or training in this process (tests, a notebook) starts clean


def _on_signal(signum: int, frame: object) -> None:
    """SIGTERM raises `Terminated`, SIGINT KeyboardInterrupt, to unwind the command. The signal is remembered, in
    case Python swallows the exception (it does in gc callbacks), and the usual handling is back, so a second
    SIGTERM ends the process at once and a second Ctrl-C interrupts again."""
    stop.request(signum)
    if signum == signal.SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise KeyboardInterrupt
