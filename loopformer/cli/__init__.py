"""Train transformers with built-in looped circuits, then evaluate, ablate, sweep, decode and operate on them.

Command line: ``loopformer train | eval | ablate | sweep | generate | inspect | prepare | activity | rys |
convert | import | export`` (also ``python -m loopformer``). One module per command; nothing in the package imports this one.

User mistakes (bad config, missing run, unknown circuit) print one ``error:`` line and exit 2.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import difflib
import importlib
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from loopformer.errors import (
    BYTES,
    DASHES,
    ConfigError,
    DecodingError,
    LoopformerError,
    OutputError,
    invisible,
    lookalike,
    plain_flag,
    printable,
    unescape_repr,
    unplain_digits,
)
from loopformer.runs import stop
from loopformer.runs.layout import unreachable
from loopformer.runs.stop import Terminated

MODULES = ("train", "eval", "ablate", "sweep", "generate", "inspect", "prepare", "activity", "rys", "convert", "hf_import",
           "export")


def _unrecognized(extra: list[str], command: str, parsers: dict[str, argparse.ArgumentParser],
                  argv: Sequence[str] = ()) -> str:
    """argparse's "unrecognized arguments" line, and where a flag given is another command's (`inspect --step 2`:
    inspect reads no weights), which commands take it; where a value follows a flag's value (`--loops X=2 Y=3`,
    ``--split 2x 4x``), that the flag takes one."""
    line = f"unrecognized arguments: {' '.join(extra)}"
    # a space before `=` (`--loops X =2`): the value and what it sets were read as two arguments (#27 pass 41's leftover)
    split = next((i for i, a in enumerate(argv) if i >= 1 and a in extra and a.startswith("=") and len(a) > 1
                  and not argv[i - 1].startswith("-")), None)
    if split is not None:
        return (f"{line} (the space before '=' made {argv[split - 1]} and {argv[split]} two arguments; write "
                f"{argv[split - 1]}{argv[split]}; see loopformer {command} --help)")
    second = _second_value(extra, parsers[command], argv)
    if second:
        return f"{line} ({second}; see loopformer {command} --help)"
    # a flag joined to its value by a space that is no separator (`--loops\u00a0X=2`, a no-break space pasted from a
    # page): "did you mean --loops?" named the flag typed (#27 pass 41)
    joined = next((e for e in extra if e[:1] in "-" + DASHES and _ODD_SPACE.search(e)), None)
    if joined is not None:
        odd = _ODD_SPACE.search(joined).group(0)
        plain = " ".join(p for p in _ODD_SPACE.split(joined) if p)
        return (f"{line} ({plain_flag(plain.split()[0])} is joined to what follows by U+{ord(odd):04X}, a space that "
                f"does not separate arguments; type a plain space: {plain}; see loopformer {command} --help)")
    # a short flag too: `eval -c cfg.yaml` is train's -c, as `eval --config` is train's --config
    typed = next((e.split("=")[0] for e in extra if e[:1] and e[:1] in "-" + DASHES and e != "--"), None)
    flag = None if typed is None else plain_flag(typed)
    mine = sorted(o for a in parsers[command]._actions for o in a.option_strings)  # noqa: SLF001
    if flag == typed and flag in mine and "--" in extra:
        # after `--`, which ends the flags, argparse reads a flag as a value: the line said this command "takes no
        # --loops" (#27 pass 41)
        return (f"{line} ({flag} comes after `--`, which ends the flags (what follows is read as values); drop the "
                f"`--`; see loopformer {command} --help)")
    # a flag of this command typed with a typographic dash, one dash, in capitals or a letter off (`—loops` pasted
    # from a page, `-loops`, `--Loops`, `--splits`): the line named none (#27 pass 40)
    if flag != typed and flag in mine:
        return f"{line} (did you mean {flag}? see loopformer {command} --help)"
    # sorted: the parsers' order is the order the commands' modules were first imported in, which tests change
    takers = sorted({name for name, sp in parsers.items() if name != command
                     for a in sp._actions if flag in a.option_strings})  # noqa: SLF001 (argparse keeps them only there)
    # this command's own flag of a longer name (`generate --split 4x` means --example-split; the line named only
    # the commands that take --split, #27 pass 37)
    own = sorted({o for a in parsers[command]._actions for o in a.option_strings  # noqa: SLF001
                  if flag and flag.startswith("--") and o.startswith("--") and o != flag
                  and (o.endswith("-" + flag[2:]) or flag.endswith("-" + o[2:]))})
    if flag and flag.startswith("--") and not takers and not own:
        own = difflib.get_close_matches(flag, [o for o in mine if o.startswith("--")], n=1, cutoff=0.8)
    if takers:
        mean = f"did you mean {' or '.join(own)}? " if own else ""
        line += (f" (loopformer {command} takes no {flag}; {mean}{', '.join(takers)} "
                 f"{'take' if len(takers) > 1 else 'takes'} it: see loopformer {command} --help)")
    elif own:
        line += f" (did you mean {' or '.join(own)}? see loopformer {command} --help)"
    return line


_ODD_SPACE = re.compile(r"[^\S ]|[\u200b-\u200d\u2060\ufeff]")  # a space other than ' ' (a tab, U+00A0), or a zero width


def _second_value(extra: list[str], parser: argparse.ArgumentParser, argv: Sequence[str]) -> str | None:
    """Where the first unrecognized argument that is no flag is a second value of the flag before it: what it takes
    (the line named the value alone: `--loops X=2 Y=3` said "unrecognized arguments: Y=3"; #27 pass 40)."""
    value = next((e for e in extra if e[:1] not in "-" + DASHES), None)
    if value is None or value not in argv:
        return None
    i = list(argv).index(value)
    if i >= 1 and argv[i - 1].startswith("--") and "=" in argv[i - 1]:  # --loops=X=2 Y=3
        flag, _, given = argv[i - 1].partition("=")
    elif i >= 2 and not argv[i - 1].startswith("-"):
        flag, given = argv[i - 2], argv[i - 1]
    else:
        return None
    action = next((a for a in parser._actions if flag in a.option_strings), None)  # noqa: SLF001
    if action is None or action.nargs is not None or not action.option_strings:
        return None
    if isinstance(action, argparse._AppendAction):  # noqa: SLF001 (argparse names the kind only there)
        if ("=" in value) != ("=" in given):  # `--split 2x X=3`: X=3 is no split, but meant for another flag
            return None
        return f"{flag} takes one value; give it once per value: {flag} {given} {flag} {value}"
    return f"{flag} takes one value"


def main(argv: list[str] | None = None, *, process: bool | None = None) -> int:
    """Run one command; its exit status. ``process`` (default: when ``argv`` is None, i.e. the console script):
    this call is the whole process, so an interrupted command ends it at once (`_end_process`)."""
    whole = argv is None if process is None else process
    if whole:
        _quiet_noise()
        _escape_unencodable()
        _second_signal_ends()
        if sys.stdout is not None:
            sys.stdout = _Guarded(sys.stdout)
    code = _main(argv)
    if code in (130, 128 + signal.SIGTERM, 128 + signal.SIGPIPE) and whole:
        _end_process(code)
    if whole:  # the work is done and reported: a signal while the interpreter exits must not turn it into 130 / 143
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    return code


def _second_signal_ends() -> None:
    """A second SIGTERM or Ctrl-C ends the process at once (status 143 / 130) while the first has not been answered.
    Python runs a signal's handler only between its own instructions, so during one long compiled call (a loop of
    10,000 iterations, a compile) a SIGTERM waited for the call to return, and so did every SIGTERM after it (#27
    pass 41's leftover). A thread reads the signals from the interpreter's wakeup pipe as they arrive; once the
    handler has run (`stop.requested`), the command's cleanup is under way and the handler's own rules hold. Ending
    so is what SIGKILL does: checkpoints are written whole or not at all."""
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        read, write = os.pipe()
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except (OSError, ValueError):  # no pipe left, or an embedding that owns the wakeup fd: signals as before
        return
    ends = {signal.SIGTERM: (143, "terminated"), signal.SIGINT: (130, "interrupted")}

    def watch() -> None:
        seen: dict[int, int] = {}
        while True:
            try:
                got = os.read(read, 64)
            except OSError:
                return
            for signum in got:
                seen[signum] = seen.get(signum, 0) + 1
                if signum in ends and seen[signum] >= 2 and stop.requested() is None:
                    code, word = ends[signum]
                    with contextlib.suppress(OSError):
                        os.write(2, f"{word} at once (a second signal while the first waited for a compiled call to "
                                    f"return; what was written before stands)\n".encode())
                    os._exit(code)

    threading.Thread(target=watch, name="loopformer-signals", daemon=True).start()


def _escape_unencodable() -> None:
    """Write characters that stdout's or stderr's encoding cannot hold (``±``, ``·``, ``✓`` under
    PYTHONIOENCODING=ascii or a Latin-1 locale) as escapes (``\\xb1``): they were a UnicodeEncodeError traceback,
    even for --help."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, LookupError, ValueError, TypeError):
            if codecs.lookup(stream.encoding).name != "utf-8":
                stream.reconfigure(errors="backslashreplace")
    # a byte of a path or flag that is not UTF-8 as ``\xff`` (`errors.printable`) in every line, argparse's too: it
    # was written as ``\udcff``, a character the user never typed (#27 pass 34)
    with contextlib.suppress(AttributeError, ValueError, TypeError):
        sys.stderr.reconfigure(errors=BYTES)


class _Guarded:
    """stdout whose write errors other than a closed pipe (a full disk behind `> out.json`, /dev/full) are an
    OutputError: they were a traceback, and `train` blamed its run directory ("free some space (df -h RUN)")."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def _guard(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self._stream, name)(*args)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise OutputError(f"standard output could not be written ({e.strerror or e}); what the command prints "
                              f"there is lost: send it where there is space (or to /dev/null)") from None

    def write(self, text: str) -> int:
        return self._guard("write", text)

    def flush(self) -> None:
        self._guard("flush")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _import_commands() -> None:
    """Import every command's module (each registers its command, and imports JAX). An environment variable that
    JAX reads as it is imported (``JAX_ENABLE_X64=maybe``, ``JAX_DEFAULT_MATMUL_PRECISION=bogus``) is one line
    naming it (it was a ValueError traceback through ``import jax``)."""
    try:
        for name in MODULES:
            importlib.import_module(f"loopformer.cli.{name}")
    except ValueError as e:
        problem = jax_variable_refused(e)
        if problem is None:
            raise
        raise ConfigError(problem) from None


def jax_variable_refused(e: ValueError) -> str | None:
    """The line for a ValueError that ``import jax`` raised over an environment variable it reads, naming the
    variable (the bench scripts use it too); None for any other ValueError."""
    found = re.search(r"for JAX flag (\w+)", str(e)) or re.search(r"for environment '(\w+)'", str(e))
    if found is None:
        return None
    var = found.group(1).upper()
    return f"{var}={os.environ.get(var, '')!r}: JAX refuses it ({e}); fix or unset {var}"


def check_platforms() -> None:
    """ConfigError (one line) when ``JAX_PLATFORMS`` names a platform JAX cannot start here (``gpu`` on a machine
    without one, a typo): the first JAX call of the command raised it as pages of traceback, after `train` had made
    its run directory; the same for ``XLA_FLAGS`` that the backend refuses (a device count of 0). Checked only when
    one of them is set (starting the backend is what checks it)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    flags = os.environ.get("XLA_FLAGS", "")
    if not (platforms or flags):
        return
    import jax

    from loopformer.parallel import distributed_request
    if distributed_request() is not None:  # a multi-process run: the backend may start only after the trainer's
        return  # jax.distributed.initialize (parallel.initialize_distributed), so it is not started here

    problem = xla_flags_refused(flags)
    if problem:
        raise ConfigError(problem)
    try:
        jax.devices()
    except Exception as e:  # RuntimeError; an AssertionError inside JAX for `cuda` without its plugin
        why = str(e).split(" (set JAX_PLATFORMS")[0].strip() or f"{type(e).__name__} in JAX's backend setup"
        if not platforms:  # e.g. --xla_force_host_platform_device_count=0: "Could not determine process_index"
            why = why.split(" (you may need")[0]
            raise ConfigError(f"XLA_FLAGS={flags!r}: JAX cannot start its backend with these flags ({why}); fix or "
                              f"unset XLA_FLAGS") from None
        raise ConfigError(f"JAX_PLATFORMS={platforms!r}: JAX cannot start it on this machine ({why}); unset "
                          f"JAX_PLATFORMS to use what the machine has (or name one it has, e.g. JAX_PLATFORMS=cpu)"
                          ) from None


_FLAGS_READ: set[str] = set()  # XLA_FLAGS values a child process has started XLA with (`xla_flags_refused`)
# the XLA_FLAGS value a parent process has checked so (or a test harness sets): inherited, so a command's children
# and a test suite's hundreds of commands do not each pay the check's child process
FLAGS_CHECKED = "LOOPFORMER_XLA_FLAGS_CHECKED"


def xla_flags_refused(flags: str) -> str | None:
    """The line for ``XLA_FLAGS`` that XLA cannot parse (an unknown flag, a value of the wrong kind, a word without
    ``--``, which it opens as a file), or None. XLA reads them as its backend starts and, on such flags, aborts the
    process from C++: one "F... Unknown flag" line, or its 90-line flag list, status 1, no `error:` (#27 pass 41).
    So a child process starts XLA's CPU backend with them first (about 2 s, once per process and value, only where
    XLA_FLAGS is set, the backend is not started yet and no parent process checked the same value, `FLAGS_CHECKED`)."""
    from jax._src import xla_bridge

    if not flags or flags in _FLAGS_READ or os.environ.get(FLAGS_CHECKED) == flags or \
            xla_bridge.backends_are_initialized():
        return None
    import subprocess

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # the flags are parsed the same by every backend
    done = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True,
                          text=True, errors="replace", timeout=600)
    if done.returncode == 0:
        _FLAGS_READ.add(flags)
        os.environ[FLAGS_CHECKED] = flags
        return None
    said = [m.group(2) for m in re.finditer(r"^([EF])\d{4} [\d:.]+\s+\d+ [^\]]+\] (.*)$", done.stderr, re.M)]
    if not said:  # another failure (the check below names what it can)
        return None
    why = said[0].split(" (We assumed")[0]
    return f"XLA_FLAGS={flags!r}: XLA refuses it ({why}); fix or unset XLA_FLAGS"


def _drop_stdout() -> None:
    """Point stdout at /dev/null: its reader is gone, and the interpreter's flush at exit would raise again
    ("Exception ignored ... BrokenPipeError")."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _end_process(code: int) -> None:
    """Exit without the interpreter's teardown: after an interrupt, XLA's compiler threads may still run, and
    tearing the runtime down under them crashes (status 139 instead of 130 / 143). The command's own cleanup
    (temporary folders, checkpoints, locks) has already run as the exception unwound."""
    with contextlib.suppress(OSError, LoopformerError):  # a stdout that cannot be written (a full disk)
        sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def home_from_passwd() -> None:
    """Drop a ``HOME`` that names no home directory (empty, or relative): `~` in a path (``run.dir=~/runs``,
    ``--out ~/x``) then reads the user's home from the password database, as where HOME is unset. An empty HOME made
    `~/x` the folder ``/x`` at the root of the file system, and a relative one a folder under the current directory,
    with no word (#27 pass 41)."""
    home = os.environ.get("HOME")
    if home is not None and not os.path.isabs(home):
        del os.environ["HOME"]


def _main(argv: list[str] | None) -> int:
    # SIGTERM (a scheduler, `timeout`, `kill`) unwinds like Ctrl-C, so that a command's cleanup runs (temporary
    # folders removed, checkpoints finished, locks released) instead of the process vanishing mid-write. Installed
    # before the imports: a Ctrl-C there that JAX's gc callback swallowed let the command run to the end (status 0).
    stop.clear()
    home_from_passwd()
    if sys.stdout is None:  # started with stdout closed (`>&-`): every print would be dropped, and the status 0
        if sys.stderr is not None:
            print("error: standard output is closed (`>&-`), so the command's tables, JSON and log would be lost; "
                  "send it to a file, or to /dev/null to discard it", file=sys.stderr)
        return 2
    global ARGV
    ARGV = argv
    main_thread = threading.current_thread() is threading.main_thread()
    # (a signal the parent set to be ignored, e.g. SIGINT of a background job, stays ignored)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
                if main_thread and signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        _import_commands()
        stop.check()  # a signal whose exception an import swallowed: "interrupted", not a traceback or a full run
        from loopformer.cli.common import COMMANDS
        from loopformer.config.schema import MAX_EVAL_EXAMPLES

        parser = Parser(prog="loopformer", description=__doc__.splitlines()[0])
        sub = parser.add_subparsers(dest="command", required=True)
        for name, (help_text, add_args, _) in COMMANDS.items():
            _once(sub.add_parser(name, help=help_text, description=help_text), add_args)
        args, extra = parser.parse_known_args(argv)
        vars(args).pop(FLAGS_GIVEN, None)
        # key=value settings after a flag (`train a=1 -c cfg b=2`): argparse takes one run of positionals only
        if extra and isinstance(getattr(args, "overrides", None), list) and all(
                "=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        elif extra:
            # the command's own usage and name, as argparse gives for its other errors
            sub.choices[args.command].error(_unrecognized(extra, args.command, sub.choices,
                                                          sys.argv[1:] if argv is None else argv))
        from loopformer.config.load import repeated_override

        twice = repeated_override(getattr(args, "overrides", None) or [])
        if twice:
            print(f"error: {twice}", file=sys.stderr)
            return 2
        examples = getattr(args, "examples", None)
        if examples is not None and examples > MAX_EVAL_EXAMPLES:
            print(f"error: --examples {examples}: at most {MAX_EVAL_EXAMPLES:,} per split (they are all built in "
                  f"memory first); 10,000 already gives ±1% at 95%", file=sys.stderr)
            return 2
        check_platforms()
        code = COMMANDS[args.command][2](args)
        signum = stop.requested()
        if signum is not None:  # its exception was swallowed where Python cannot raise it (a gc callback)
            what = "terminated" if signum == signal.SIGTERM else "interrupted"
            print(f"{what} (the signal came where it could not stop the command, which finished)", file=sys.stderr)
            return 128 + signum
        return code
    except OutputError as e:  # nothing more can be written there: the interpreter's flush at exit would fail again
        _drop_stdout()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DecodingError as e:  # the model layer says why; the command line knows the way around it
        # in place of the cached-decoding flags given: --no-cache beside them is refused in turn (#27 pass 26)
        given = [flag for flag, on in (("--cache", getattr(args, "cache", None) is not None),
                                       ("--continuous", getattr(args, "continuous", False))) if on]
        instead = f" in place of {' and '.join(given)}" if given else ""
        print(f"error: {e}; use --no-cache{instead} (recomputes the prefix every token)", file=sys.stderr)
        return 2
    except LoopformerError as e:
        print(f"error: {e}{invisible(_command_line(), str(e))}", file=sys.stderr)
        return 2
    except PermissionError as e:  # a file or folder this user may not read or write (root may, so it went unseen)
        what = e.filename or "a file the command needs"
        closed = unreachable(e.filename) if isinstance(e.filename, str) and e.filename else None
        if closed:  # the path may not even be there: "make it readable" named a file behind it (#27 pass 31)
            print(f"error: {what} {closed}, or use a path outside it", file=sys.stderr)
            return 2
        print(f"error: {what}: {e.strerror or 'permission denied'} for this user; make it readable (and writable, "
              f"where the command writes), or copy it where this user may", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except FileNotFoundError:
        if not cwd_gone():
            raise
        # a relative path (the default run.dir `runs`, `--run ../x`) under a folder deleted after the shell entered
        # it: Python cannot resolve it (os.getcwd), which was a traceback from pathlib or posixpath
        print(f"error: {CWD_GONE}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of stdout exited (`| head -1`): stop as a pipe's writer does, no traceback
        _drop_stdout()
        with contextlib.suppress(OSError):
            print("stopped: standard output was closed (the program reading it exited, e.g. `| head`); what was "
                  "written before stands; to keep all of it, redirect it to a file or through `tee`", file=sys.stderr)
        return 128 + signal.SIGPIPE
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


CWD_GONE = ("the current directory no longer exists (it was deleted or moved after the shell entered it), so a "
            "relative path cannot be resolved; cd to a directory that exists, or give absolute paths")


def cwd_gone() -> bool:
    """Whether the current directory was deleted (or moved) after the process entered it: a FileNotFoundError then may
    come from resolving a relative path (`CWD_GONE` says so), in the commands and the bench scripts."""
    try:
        os.getcwd()
    except FileNotFoundError:
        return True
    return False


FLAGS_GIVEN = "_flags_given"  # in the namespace while parsing: the single-value flags seen so far


class _StoreOnce(argparse.Action):
    """A flag that takes one value refuses a second (argparse lets the last one win: `train -c a.yaml -c b.yaml`
    trained b alone, `eval --run A --run B` evaluated B). Repeatable flags use action="append"."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        given = namespace.__dict__.setdefault(FLAGS_GIVEN, set())
        if self.dest in given and self.option_strings:  # positionals (train's key=value settings) may come in runs
            parser.error(f"{'/'.join(self.option_strings)} is given twice; give it once (the last one would win with "
                         f"no word)")
        given.add(self.dest)
        setattr(namespace, self.dest, values)


def _once(parser: argparse.ArgumentParser, add_args: object) -> None:
    """Add a command's flags (``add_args``) to ``parser``, every single-value flag as `_StoreOnce` (`single_flags`)."""
    single_flags(parser)
    add_args(parser)  # type: ignore[operator]


ARGV: list[str] | None = None  # the command line `main` runs (None: sys.argv's), which error lines look into


def _command_line() -> list[str]:
    """The arguments of the command `main` runs (`ARGV`, else the process's own)."""
    return sys.argv[1:] if ARGV is None else ARGV


class Parser(argparse.ArgumentParser):
    """argparse's parser, a byte that is not UTF-8 written ``\\xff`` where its lines quote a value with ``repr``
    (`errors.unescape_repr`); its subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        # (a value quoted bare, too: stderr without errors.BYTES)
        message = printable(unescape_repr(message))
        choice = re.search(r"invalid choice: '(.+?)' \(choose from (.+)\)$", message)
        if choice:  # `--compact оn` with a Cyrillic о was refused as if it were not 'on' (#27 pass 42)
            message += lookalike(choice.group(1), [choice.group(2)])
        super().error(message + invisible(_command_line(), message))

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        if kwargs.get("type") in (int, float):  # the bench scripts' numbers: int('٣') is 3 (#27 pass 40's leftover)
            kwargs["type"] = _ascii_number(kwargs["type"])
        return super().add_argument(*args, **kwargs)


def ascii_digits(text: str) -> None:
    """ArgumentTypeError for a flag's value holding a digit of another script or a '_' between digits
    (`errors.unplain_digits`): int() and float() read '٣' as 3 and '1_0' as 10."""
    foreign = unplain_digits(text)
    if foreign:
        whole = len(text.strip()) == 1 or foreign.startswith(f"'{text}'")
        raise argparse.ArgumentTypeError(foreign if whole else f"'{text}': {foreign}")


def _ascii_number(kind: type) -> Callable[[str], Any]:
    """``int`` or ``float`` as an argparse type that refuses a digit of another script (`ascii_digits`); argparse's
    own "invalid int value" for the rest (the function keeps the type's name)."""

    def parse(text: str) -> Any:
        ascii_digits(text)
        return kind(text)

    parse.__name__ = kind.__name__
    return parse


def single_flags(parser: argparse.ArgumentParser) -> None:
    """Make every single-value flag (the default action, store) that is added to ``parser`` from now on refuse a second
    value (`_StoreOnce`); the namespace then holds `FLAGS_GIVEN` until the caller drops it. The bench scripts use it."""
    parser.register("action", None, _StoreOnce)
    parser.register("action", "store", _StoreOnce)


def on_signal(signum: int, frame: object) -> None:
    """SIGTERM raises `Terminated`, SIGINT KeyboardInterrupt, to unwind the command. The signal is remembered, in
    case Python swallows the exception (it does in gc callbacks), and the usual handling is back, so a second
    SIGTERM ends the process at once and a second Ctrl-C interrupts again."""
    stop.request(signum)
    _quiet_noise()
    if signum == signal.SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise KeyboardInterrupt


_CHECKPOINT_READ = "_read_array_index_and_device_put"  # orbax's coroutine reading one array of a checkpoint


def _quiet_noise() -> None:
    """What a stopped or failed command leaves behind prints no tracebacks above its one line: the checkpoint
    library's I/O threads calling back into an event loop that the unwinding (a signal, a disk that filled) closed
    ("RuntimeError: Event loop is closed", once per pending write), and a signal's own exception where Python drops
    it ("Exception ignored in: <function _xla_gc_callback>": the signal is recorded, `stop`, and reported), and the
    reads of a checkpoint's other arrays left pending when one failed (a truncated array file: the step is reported
    corrupt in one line, then each pending read printed a 30-line TensorStore traceback as it was collected).
    Installed for the whole process by the console script, and by the first signal in any other caller (tests).
    Every other error prints as before."""
    if getattr(sys.excepthook, "quiet_after_stop", False):
        return
    except_hook, unraisable_hook = sys.excepthook, sys.unraisablehook

    def closed_loop(error: BaseException | None) -> bool:
        return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"

    def hook(kind: type[BaseException], error: BaseException, tb: object) -> None:
        if not closed_loop(error):
            except_hook(kind, error, tb)

    def unraisable(info: object) -> None:
        error = getattr(info, "exc_value", None)
        pending_read = getattr(getattr(info, "object", None), "__name__", "") == _CHECKPOINT_READ
        if not (closed_loop(error) or pending_read or isinstance(error, (KeyboardInterrupt, Terminated))):
            unraisable_hook(info)

    hook.quiet_after_stop = True  # type: ignore[attr-defined]
    sys.excepthook, sys.unraisablehook = hook, unraisable
