"""Shared bench helpers: argument parsing, size presets, synthetic batches, timing, table/JSON output."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loopformer.cli import (  # noqa: E402
    CWD_GONE,
    FLAGS_GIVEN,
    Parser,
    check_platforms,
    cwd_gone,
    home_from_passwd,
    jax_variable_refused,
    on_signal,
    single_flags,
)

try:  # a JAX variable that JAX refuses as it is imported (JAX_ENABLE_X64=maybe): one line, as `loopformer` says it
    import jax
except ValueError as _e:
    _refused = jax_variable_refused(_e)
    if _refused is None:
        raise
    print(f"error: {_refused}", file=sys.stderr)
    sys.exit(2)
import numpy as np  # noqa: E402

from loopformer import jsontext  # noqa: E402
from loopformer.config import ModelConfig, load_config  # noqa: E402
from loopformer.config.schema import MAX_EVAL_EXAMPLES, MAX_STEPS  # noqa: E402
from loopformer.errors import BYTES, AnalysisError, LoopformerError, not_utf8, printable, unplain_digits  # noqa: E402
from loopformer.evaluation.tables import format_table  # noqa: E402
from loopformer.flops import PEAK_ENV, datasheet_peak, measure_matmul_flops, peak_override  # noqa: E402
from loopformer.model.attend import memory_bytes  # noqa: E402
from loopformer.runs.layout import (  # noqa: E402
    DANGLING,
    RunDir,
    not_a_file,
    outside_runs,
    through_link,
    unreachable,
)
from loopformer.runs.stop import Terminated  # noqa: E402

home_from_passwd()  # an empty or relative HOME made `--out ~/x` a folder at / (#27 pass 41)

# Model presets: d_model, heads, vocab, sequence length, batch, loop count n, dtype, CPU matmul size.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=64, heads=4, vocab=64, seq=64, batch=8, loops=8, dtype="float32", matmul=1024),
    "small": dict(d_model=512, heads=8, vocab=4096, seq=512, batch=16, loops=8, dtype="bfloat16", matmul=4096),
    "medium": dict(d_model=1024, heads=16, vocab=32768, seq=1024, batch=16, loops=16, dtype="bfloat16", matmul=8192),
}


def about(doc: str) -> str:
    """A script's --help description: its docstring's first paragraph (its first line cut a sentence short)."""
    return " ".join(doc.split("\n\n")[0].split())


class ArgumentParser(Parser):
    """A script's parser: a single-value flag given twice is refused (`--steps 5 --steps 10` ran 10 with no word), as
    loopformer's commands refuse it (`loopformer.cli.single_flags`); a byte that is not UTF-8 is written ``\\xff`` where
    argparse or the script quotes it with ``repr`` (`loopformer.cli.Parser`, #27 pass 35)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        single_flags(self)

    given: frozenset[str] = frozenset()  # the single-value flags (dests) the last parse read from the command line

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        parsed, extra = super().parse_known_args(args, namespace)
        # kept: a flag given at its default value (`--merge ... --compact auto`) is still given, and a mode that does
        # not read it refuses it as it refuses any other value (#27 pass 29)
        self.given = frozenset(vars(parsed).pop(FLAGS_GIVEN, ()))
        return parsed, extra


def parser(description: str) -> argparse.ArgumentParser:
    p = ArgumentParser(description=description)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny",
                   help="model preset (tiny: CPU default; small/medium: GPU/TPU)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout instead of tables")
    p.add_argument("--out", type=out_file, help="also write the JSON document to this file")
    return p


def out_file(text: str) -> Path:
    """An argparse type: a file to write, checked before any work (a folder, or a file as its parent, was a
    traceback when the document was written at the end, and the results were lost with it)."""
    if not text:
        raise argparse.ArgumentTypeError("'': name the file to write")
    _reachable(text)
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; name a file in it, e.g. {path / 'result.json'}")
    if not_a_file(path) == "is a pipe or a device":  # /dev/null, a FIFO: the rename into place replaced it by a file
        raise argparse.ArgumentTypeError(f"{text} is a pipe or a device; name a regular file (--json prints the "
                                         f"document on stdout)")
    _no_dangling_link(text, path.absolute().parents)
    parent = next(a for a in path.absolute().parents if a.exists())  # the nearest one there (/ always is)
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot write in {parent} (permission denied)")
    if path.exists() and not os.access(path, os.W_OK):  # a traceback after the work, which was lost with it
        raise argparse.ArgumentTypeError(f"{text} is read-only for this user; make it writable or name another file")
    if path.is_symlink():  # `write_out` writes the file it leads to: that one must not be a run's either
        _outside_runs(through_link(path))
    return _outside_runs(path)


def _no_dangling_link(text: str, paths: Sequence[Path]) -> None:
    """Refuse an --out that is, or lies under, a symlink that leads nowhere: making the folder there was a
    FileExistsError traceback (a folder --out), or a refusal after the work (a file --out; #27 pass 30)."""
    link = next((a for a in paths if a.is_symlink() and not a.exists()), None)
    if link is not None:
        raise argparse.ArgumentTypeError(f"{text}: {link} is {DANGLING}; remove it, or choose another --out")


def _reachable(text: str) -> None:
    """Refuse a folder behind one this user may not open (another user's, chmod 000 on the way): its checks were a
    PermissionError traceback, in every bench script (#27 pass 31)."""
    closed = unreachable(text)
    if closed is not None:
        raise argparse.ArgumentTypeError(f"{text} {closed}, or choose another folder")


def _checkpoint_path(text: str, *, pattern: bool) -> None:
    """Refuse a folder whose runs the checkpoint library cannot open: a byte that is not UTF-8 in its path, and (where
    runs are trained, ``pattern``) a '[' or ']', which it reads as a pattern. The library's refusals named run.dir /
    run.name, or an override run.dir=... the user never gave (#27 pass 33)."""
    byte = not_utf8(text)
    if byte:
        shown = printable(text)
        raise argparse.ArgumentTypeError(f"{shown} holds the byte {byte}, which is not UTF-8 text, and the checkpoint "
                                         f"library cannot open the runs there; choose another folder")
    if pattern and any(ch in str(Path(text).absolute()) for ch in "[]"):
        raise argparse.ArgumentTypeError(f"{text}: its path has a '[' or ']', which the checkpoint library reads as a "
                                         f"pattern (the runs' checkpoints could not be read back); choose another folder")


def _outside_runs(path: Path) -> Path:
    """``path`` unless a run directory holds it: a file there replaced the run's own (config.yaml, metrics.jsonl) or,
    in checkpoints/, was replaced by a checkpoint of its name; a folder was refused by the first training, naming
    run.dir / run.name, which the user never gave."""
    try:
        return outside_runs(path)
    except LoopformerError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--out ")) from None


# The library's fixes for a run directory name run.dir / run.name, which a bench script sets from --out (seeds.py
# refuses them as overrides, the others take none): there the fix is another --out (#27 pass 27: "set
# run.dir=<a disk with room>", followed, was refused in turn).
RUN_DIR_FIXES = (("set run.dir=<a disk with room>", "give --out a folder on a disk with room"),
                 ("set run.dir=<a directory> or run.name=<another name>", "give another --out"),
                 ("set run.dir=<a writable directory> or run.name=<another name>", "give another --out"),
                 ("set run.name=<another name> to start a separate run", "give another --out to start a separate run"),
                 ("or pick a new run.name", "or give another --out"))


def bench_fix(message: str) -> str:
    """A library refusal's ``message`` with its run.dir / run.name fixes given as this script's --out."""
    for library, bench in RUN_DIR_FIXES:
        message = message.replace(library, bench)
    return message


def out_folder(text: str) -> Path:
    """An argparse type: the folder a script writes its runs and results into, checked before any work (a folder this
    user may not write was refused by the first training, naming run.dir, which the user never gave; a read-only
    result file in it was a traceback after the work)."""
    if not text:
        raise argparse.ArgumentTypeError("'': name the folder to write")
    _reachable(text)
    _checkpoint_path(text, pattern=True)
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a directory; give a directory for the runs and results")
    _no_dangling_link(text, (path.absolute(), *path.absolute().parents))
    nearest = next(a for a in (path.absolute(), *path.absolute().parents) if a.exists())
    if not nearest.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {nearest} is a file, not a directory")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot write in {nearest} (permission denied); make it writable or "
                                         f"choose another folder")
    fixed = next((f for f in path.iterdir() if f.is_file() and not os.access(f, os.W_OK)), None) if path.is_dir() else None
    if fixed:
        raise argparse.ArgumentTypeError(f"{text}: {fixed.name} is read-only for this user, and the results are "
                                         f"written there; make it writable or choose another folder")
    if RunDir(path).holds_run:  # its runs would be written inside it
        raise argparse.ArgumentTypeError(f"{text} is a run directory; give a folder outside any run for the runs and "
                                         f"results")
    if path.is_symlink():  # its files are written where it leads
        _outside_runs(through_link(path))
    return _outside_runs(path)


def folder(text: str) -> Path:
    """An argparse type: a folder to read; an empty string is refused (``Path("")`` is the current directory), and so
    is a file (its runs were looked for under it, and the fix said to train into it)."""
    if not text:
        raise argparse.ArgumentTypeError("'': name the folder")
    _reachable(text)
    _checkpoint_path(text, pattern=False)
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a directory; name the folder that holds the runs")
    return Path(text)

# Upper bounds of `at_most` for the flags several scripts share: past them the library refused the setting naming its
# own field (data.eval_examples, train.steps), or the script built examples or seeds without end
EXAMPLES = (MAX_EVAL_EXAMPLES, "each set is built in memory first")
STEPS = (MAX_STEPS, "the step counter is a 32-bit integer")
SEEDS = (1000, "seeds 0..N-1, each trained or drawn in turn")
# the timing scripts' repetition counts (#27 pass 22: 11 digits ran until stopped): a timing needs tens of steps and a
# few rounds; past these it adds hours, not precision
TIMED_STEPS = (10_000, "timed steps; a timing needs tens")
REPS = (100, "timed repetitions, each the whole measurement again; a few are kept the best of")


def at_least(p: argparse.ArgumentParser, args: argparse.Namespace, minimums: Mapping[str, int]) -> None:
    """Refuse, before any work, a count flag below its minimum (``{"--seeds": 1, "--width": 0}``; a flag left at
    None is not checked): argparse's one error line naming the flag, exit 2. A count of 0 or -1 used to crash
    deep inside (an empty concatenate or min()), print the library's traceback, or fall back to a default."""
    for flag, minimum in minimums.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and value < minimum:
            p.error(f"{flag} must be >= {minimum}, got {value}")


def at_most(p: argparse.ArgumentParser, args: argparse.Namespace, maximums: Mapping[str, tuple[int, str]]) -> None:
    """Refuse a count flag above its maximum (``{"--loops": (10000, "the loop limit")}``), as `at_least` does
    below: the library refused it later naming its own field (``data.eval_examples``), or it ran out of memory."""
    for flag, (maximum, why) in maximums.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and value > maximum:
            p.error(f"{flag} {value}: at most {maximum:,} ({why})")


def once(p: argparse.ArgumentParser, flag: str, names: Sequence[str]) -> None:
    """Refuse a name given twice in a list flag (``--tasks a,a``): it was trained, scored or reported twice."""
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice:
        p.error(f"{flag} names {twice} twice; give each once")


def int_list(p: argparse.ArgumentParser, flag: str, text: str, minimum: int = 1,
             maximum: tuple[int, str] | None = None) -> list[int]:
    """A comma-separated list of distinct whole numbers >= ``minimum`` (``--loops 4,8,16``) and, with ``maximum``
    (value, why), at most that; anything else, an empty list or a number given twice (measured and reported twice)
    included, is argparse's one error line naming the flag (exit 2)."""
    if odd := unplain_digits(text):  # int('٣') is 3 (#27 pass 40's leftover)
        p.error(f"{flag} '{printable(text)}': {odd}")
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < minimum:
        p.error(f"{flag} '{printable(text)}': give comma-separated whole numbers >= {minimum}, e.g. "
                f"{minimum},{minimum + 1}")
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        p.error(f"{flag} '{printable(text)}': {twice[0]} is given twice; give each once")
    if maximum is not None and max(values) > maximum[0]:
        p.error(f"{flag} '{printable(text)}': {max(values)} is above {maximum[0]:,} ({maximum[1]})")
    return values


def fits_memory(p: argparse.ArgumentParser, flag: str, value: int, need: Callable[[int], int], what: str,
                otherwise: str = "") -> None:
    """Refuse, before any work, a size flag whose ``need(value)`` bytes (a lower bound of the peak, e.g.
    `scores_bytes` of attention or a key/value cache; increasing in the value) exceed half of the device's memory:
    argparse's one line naming the flag and the largest value that fits (a huge value was an out-of-memory
    traceback from XLA). ``what`` names the need; ``otherwise`` is the advice when not even 1 fits."""
    memory = memory_bytes()
    if need(value) <= memory // 2:
        return
    lo, hi = 0, value  # need(lo) fits (0: nothing is asked), need(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if need(mid) <= memory // 2 else (lo, mid)
    fit = f"at most {flag} {lo:,} fits" if lo else f"not even {flag} 1 fits{otherwise and '; ' + otherwise}"
    p.error(f"{flag} {value}: {what} needs about {need(value) / 2**30:,.1f} GiB, more than half of this machine's "
            f"{memory / 2**30:.0f} GiB; {fit}")


def rows_dropped(tasks: Mapping[str, Any], names: Sequence[str], kept: Callable[[dict], bool],
                 model: Callable[[dict], str | None] = lambda row: None) -> str | None:
    """Which rows of the record's ``tasks`` (of the tasks ``names``) a run that writes the record anew would not
    score again (``kept`` false), by task and model and seed: "seeds 0, 1 of maze3", or with ``model``
    "halting (seed 2) of maze3"; None when none. `think_longer.py` and `adaptive.py` (and `exit_oracle.py`) refuse
    such a run: it replaced the record with no word (#27 passes 24 and 26)."""
    lost = []
    for name in (n for n in names if n in tasks):
        gone: dict[str | None, list[int]] = {}
        for m, seed in sorted({(model(r), int(r.get("seed", 0))) for r in tasks[name]["rows"] if not kept(r)},
                              key=lambda ms: (ms[0] or "", ms[1])):
            gone.setdefault(m, []).append(seed)
        for m, seeds in gone.items():
            s = f"seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}"
            lost.append(f"{s} of {name}" if m is None else f"{m} ({s}) of {name}")
    return "; ".join(lost) or None


def trained_past(p: argparse.ArgumentParser, cfgs: Sequence[Any], how: str) -> None:
    """Refuse, before any training, a run of ``cfgs`` (the configs a script trains and scores) that its --out holds
    trained past the config's train.steps (``how``: what set them, e.g. "--steps 5"): the trainer only said "already
    trained" on stderr, and the script scored the run as it is under a record naming the smaller count (a --quick or
    --steps smoke run into the --out of a full one, #27 pass 30). A run trained to fewer steps resumes, as before."""
    for cfg in cfgs:
        done = RunDir(cfg.run_dir).trained_to()
        if done is not None and done > cfg.train.steps:
            p.error(f"--out {cfg.run_dir.parent}: its run {cfg.run_dir.name} is trained to step {done:,}, past the "
                    f"{cfg.train.steps:,} steps this run trains it to ({how}), and would be scored as it is under a "
                    f"record of {cfg.train.steps:,} steps; choose another --out")


def tasks_replaced(p: argparse.ArgumentParser, record: Path, names: Sequence[str]) -> None:
    """Refuse, before any work, a run (or join) of the tasks ``names`` into an --out whose ``record`` (adaptive.json,
    think_longer.json, exit_oracle.json) holds results of other tasks: its record replaced that one, and they were lost
    with no word (`exit_oracle.py --tasks maze3`, then `--tasks prefix_parity` over the same runs, #27 pass 30). A
    damaged record has nothing in it to lose. --merge cannot join records of other tasks: the fix is to move it aside
    (the runs stay in --out and are reused)."""
    try:
        tasks = jsontext.loads(record.read_text(encoding="utf-8"))["tasks"] if record.is_file() else {}
        others = [n for n in tasks if n not in names]
    except (OSError, ValueError, TypeError, KeyError):
        return
    if others:
        article = "an" if record.name[0] in "aeiou" else "a"
        p.error(f"--out {record.parent} holds {article} {record.name} with the results of {', '.join(others)}, which "
                f"this run ({', '.join(names)}) does not score, and its record replaces that one; move {record} aside "
                f"(the runs in --out stay, and are reused), or choose another --out")


def no_json_constant(name: str) -> float:
    """``parse_constant`` for a bench record: NaN and Infinity are refused (ValueError) where Python's json reads them
    as numbers, since no bench script writes them (a NaN accuracy was joined into a verdict, #27 pass 24)."""
    raise ValueError(f"it holds {name}, which this script never writes (an accuracy is a number in [0, 1])")


def whole_number(value: object, least: int) -> bool:
    """Whether a record's field is an int >= ``least`` (not a bool, which JSON's true would be)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def is_number(value: object) -> bool:
    """Whether a record's field is an int or a float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def repeated_row(rows: Sequence[dict], key: Callable[[dict], tuple]) -> str | None:
    """Where two of a record's ``rows`` have the same ``key`` (what a run scores once: a hand-edited or concatenated
    record, whose rows a join counted twice in the selection): "rows I and J are both KEY", else None."""
    first: dict[tuple, int] = {}
    for i, row in enumerate(rows):
        j = first.setdefault(key(row), i)
        if j != i:
            return f"rows {j} and {i} are both {', '.join(map(str, key(row)))}"
    return None


def merge_records(p: argparse.ArgumentParser, paths: Sequence[Path], own: Path,
                  read: Callable[[Path], dict]) -> dict[str, dict]:
    """``--merge``'s records, path -> document, each read by ``read`` (a script's record reader: OSError, or
    ValueError / TypeError / KeyError for what no run of the script writes); argparse's one error line for a record
    that is missing, --out's own (``own``, which the joined record replaces), named twice or not the script's."""
    docs: dict[str, dict] = {}
    for path in paths:
        if not_a_file(path):
            p.error(f"--merge: {path} {not_a_file(path)}; give the {own.name} records to join")
        if path.resolve() == own.resolve():
            p.error(f"--merge: {path} is --out's own record, which the joined record replaces; choose another --out")
        if str(path) in docs:
            p.error(f"--merge names {path} twice; give each record once")
        try:  # each must be a whole record of the script
            docs[str(path)] = read(path)
        except OSError as e:
            p.error(f"--merge: cannot read {path} ({e.strerror or e})")
        except (ValueError, TypeError, KeyError) as e:
            p.error(f"--merge: {path} is not a result of this script ({type(e).__name__}: {e})")
    return docs


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """Run a bench script's ``main`` and exit with its code; a setting the library refuses (a
    `LoopformerError`: a bad config or override, an --out that is a file) is its one line on stderr, exit 2;
    Ctrl-C is "interrupted", exit 130, without the interpreter's teardown (as `loopformer` ends: a Ctrl-C during
    a compile printed a traceback, then the teardown crashed under XLA's compiler threads, status 139); SIGTERM (a
    scheduler, `timeout`) unwinds the same way, "terminated", exit 143, so a training inside finishes its checkpoint
    and releases its lock (the process vanished without a word, #27 pass 22)."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
        signal.signal(signal.SIGTERM, on_signal)
    # a byte that is not UTF-8 as ``\xff`` in every line, argparse's too, as the commands write it (#27 pass 34)
    with contextlib.suppress(AttributeError, ValueError, TypeError):
        sys.stderr.reconfigure(errors=BYTES)
    try:
        check_platforms()  # JAX_PLATFORMS or XLA_FLAGS that JAX cannot start: one line, before any work
        code = main()
    except LoopformerError as e:
        print(f"error: {bench_fix(str(e))}", file=sys.stderr)
        code = 2
    except FileNotFoundError:
        if not cwd_gone():
            raise
        # a relative --out or --run under a folder deleted after the shell entered it: the checks of --out resolve it
        # (os.getcwd), which was a FileNotFoundError traceback (#27 pass 33), as in the commands since pass 23
        print(f"error: {CWD_GONE}", file=sys.stderr)
        code = 2
    except (KeyboardInterrupt, Terminated) as e:
        print("terminated" if isinstance(e, Terminated) else "interrupted", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(143 if isinstance(e, Terminated) else 130)
    sys.exit(code)


def model_config(size: dict[str, Any], *, prelude: int = 1, coda: int = 1, depth: int = 1, loops: str = "fixed(1)",
                 backprop: int = 1, inject: str = "none", init: str = "input") -> ModelConfig:
    """A model whose core is one full-width circuit X (slice read/write): depth blocks looped n times."""
    d, h = size["d_model"], size["heads"]
    circuit = (f"{{name: X, depth: {depth}, width: {d}, heads: {h}, loops: '{loops}', max_loops: 1024, "
               f"eval_loops: 1, backprop: {backprop}, inject: {inject}, init: {init}}}")
    return load_config(None, [f"model.d_model={d}", f"model.heads={h}", f"model.prelude={prelude}",
                              f"model.coda={coda}", f"model.compute_dtype={size['dtype']}",
                              f"model.stages=[{{circuits: [{circuit}]}}]"]).model


def random_kernels(model: Any, seed: int = 1) -> Any:
    """``model`` with every kernel drawn from N(0, 1/fan_in) (in place; returned): at initialisation writes are
    zero and blocks near-identity, so every layer and loop should move the output for speed or exactness runs."""
    from flax import nnx

    key = jax.random.key(seed)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and path[-1] == "kernel":
            key, sub = jax.random.split(key)
            var[...] = jax.random.normal(sub, var[...].shape) / np.sqrt(var[...].shape[-2])
    return model


def synthetic_batch(size: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (size["batch"], size["seq"])
    return {"inputs": rng.integers(0, size["vocab"], shape, dtype=np.int32),
            "targets": rng.integers(0, size["vocab"], shape, dtype=np.int32),
            "mask": np.ones(shape, np.float32)}


def block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    block(fn())
    return time.perf_counter() - t0


def summary(times: Sequence[float]) -> dict[str, float]:
    return {"best_s": min(times), "median_s": statistics.median(times)}


def environment() -> dict[str, Any]:
    """What a record's numbers depend on beside the code: the numeric libraries' versions and the machine. A trained
    model is not reproducible across them: the same commit and seed trained prefix_parity's seed 0 to a model that
    solves 2x strings under jax 0.10.1 and to one that does not under 0.10.2 (their losses part by step 250)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    d = jax.devices()[0]
    return {"jax": jax.__version__, **{n: installed(n) for n in ("jaxlib", "flax", "optax", "numpy")},
            "backend": d.platform, "device_kind": d.device_kind, "cpu": _cpu_model(),
            "device_count": jax.device_count(), "host_cpus": os.cpu_count(),
            # the cores this process may run on (taskset, a container's cpuset): XLA's CPU threads use these
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": platform.python_version(), "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def _cpu_model() -> str | None:
    """The host CPU's model name and whether it has AVX-512 (XLA's CPU code, and so a CPU-trained model, depends on
    the vector instructions it finds); None where /proc/cpuinfo is not there."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or None
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    return f"{name or 'unknown'}{', avx512' if 'avx512f' in flags.split() else ''}"


def peak(size: dict[str, Any]) -> dict[str, Any]:
    """Denominator for MFU on one device: ``LOOPFORMER_PEAK_FLOPS`` when set (bench/README.md; it was ignored here),
    else the datasheet peak on GPU/TPU, a measured matmul on CPU (the matmul is measured on accelerators too, for
    reference)."""
    measured = measure_matmul_flops(size["matmul"], size["dtype"] if jax.devices()[0].platform != "cpu" else "float32")
    sheet = datasheet_peak(jax.devices()[0], size["dtype"])
    override = peak_override()
    source = PEAK_ENV if override else "datasheet" if sheet else f"measured {size['matmul']}^3 matmul"
    return {"peak_flops": override or sheet or measured, "source": source, "datasheet_flops": sheet,
            "measured_matmul_flops": measured}


def _finite(value: Any) -> Any:
    """``value`` with each number that is not finite (NumPy's included) made None, through dicts, lists and tuples."""
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, float) and not np.isfinite(value) else value


def dumps(doc: Any, **kwargs: Any) -> str:
    """The JSON text of a result document that every JSON reader takes: a number that is not finite (a part without
    matmuls has no ceiling, an undefined ratio) is null. `json.dumps` wrote NaN and Infinity, which are not JSON (jq,
    a browser and this project's own record readers refuse them; #27 pass 25). NumPy numbers are plain numbers."""
    return json.dumps(_finite(doc), allow_nan=False, **kwargs)


def emit(result: dict[str, Any], tables: list[str], args: argparse.Namespace) -> None:
    """Print the result (``--json``: the document, else the tables), then write the document to ``--out``."""
    doc = dumps(result, indent=1, default=float)
    if args.json:
        print(doc, flush=True)
    else:
        print("\n\n".join(tables), flush=True)
    if args.out:
        write_out(args.out, doc + "\n", "printed above")


def report(out: Path, stem: str, doc: dict[str, Any], text: str, as_json: bool) -> None:
    """A folder script's results: printed (``as_json``: the document on one line, else the Markdown ``text``), then
    written to ``out``/<stem>.json (indented) and <stem>.md, each by `write_out`."""
    doc = {**doc, "environment": doc.get("environment") or environment()}
    print(dumps(doc) if as_json else text, flush=True)
    write_out(out / f"{stem}.json", dumps(doc, indent=1), "printed above")
    write_out(out / f"{stem}.md", text + "\n", "printed above")


def write_out(path: Path, text: str | bytes, shown: str) -> None:
    """Write a script's document (``text``; bytes: a plot) to ``--out`` whole, through a temporary file beside it
    renamed into place (a full disk truncated the earlier document and left half of the new one, which --replot then
    read: #27 pass 22); a failure (a full disk, a file made read-only meanwhile) is one AnalysisError naming it (a
    traceback after the work), the document being ``shown`` elsewhere and the earlier one left as it was. Every file
    a script writes into its --out goes through here (think_longer.py, routing.py, gate_stage.py and adaptive.py
    wrote some in place: a traceback after hours of training, the earlier record torn, #27 pass 24)."""
    path = through_link(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError("the file is read-only")
        if isinstance(text, bytes):
            tmp.write_bytes(text)
        else:
            tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        raise AnalysisError(f"--out {path}: cannot write it ({e.strerror or e}); the results are {shown}") from None
    finally:
        tmp.unlink(missing_ok=True)


def read_wall(record: Path) -> float:
    """The training seconds a run's wall record holds (0 when it has none); AnalysisError for a damaged one (a
    record cut short by a kill was a JSONDecodeError traceback when the benchmark was run again)."""
    if not record.is_file():
        return 0.0
    try:
        return float(jsontext.loads(record.read_text())["train_wall_s"])
    except (ValueError, KeyError, TypeError) as e:
        raise AnalysisError(f"{record} is damaged ({type(e).__name__}: {e}); delete it, and the run's training time "
                            f"is counted from its next training") from None


def write_wall(record: Path, spent: float, steps: int) -> None:
    """Write a run's wall record whole (a temporary file renamed over it): a kill leaves the old one or the new."""
    tmp = record.with_name(f".{record.name}.tmp")
    tmp.write_text(json.dumps({"train_wall_s": spent, "steps": steps}))
    tmp.replace(record)


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """``title`` over a Markdown table of ``rows`` (numbers formatted by `_fmt`)."""
    return title + "\n" + format_table(header, [[_fmt(c) for c in r] for r in rows], markdown=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e6:
            return f"{v:.4g}" if abs(v) < 10 else f"{v:,.1f}"
        return f"{v:.3e}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def log(msg: str, args: argparse.Namespace) -> None:
    """Progress on stderr (stdout stays clean for --json)."""
    print(msg, file=sys.stderr, flush=True)
