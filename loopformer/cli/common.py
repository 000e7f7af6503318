"""What the commands share: the registry, the analysis flags (--run, --step, --raw-weights, --split,
--examples, --json) and printing exactly one JSON document or one table."""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from loopformer import jsontext
from loopformer.cli import ascii_digits
from loopformer.errors import AnalysisError, DataError, PlanError
from loopformer.model import plan
from loopformer.runs.layout import replace_file, special
from loopformer.runs.log import log
from loopformer.variants.exits import EXITS

Handler = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {}

DEFAULT_EXAMPLES = 2500
EXAMPLES_HELP = (f"examples per split (default {DEFAULT_EXAMPLES}: the standard error of an accuracy p is "
                 f"sqrt(p(1-p)/N) <= 0.5/sqrt(N) = 1 point at N=2500, so ±1%% at one sigma for any accuracy; "
                 f"comparisons of settings on the same examples are tighter; use 10000 for a ±1%% 95%% interval)")


def command(name: str, help: str, add_args: Callable[[argparse.ArgumentParser], None]) -> Callable[[Handler], Handler]:
    """Register a subcommand: ``add_args`` adds its flags; the decorated function runs it."""

    def register(run: Handler) -> Handler:
        COMMANDS[name] = (help, add_args, run)
        return run

    return register


def loop_count(text: str) -> int:
    """An argparse type: a loop count in 1..MAX_LOOPS (a typo of extra zeros would run for hours)."""
    value = positive(text)
    if value > plan.MAX_LOOPS:
        raise argparse.ArgumentTypeError(f"loop count {value} is above the limit of {plan.MAX_LOOPS}")
    return value


def _integer(lo: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``lo``, else "expected <what>, got ..."."""

    def parse(text: str) -> int:
        ascii_digits(text)
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


positive = _integer(1, "a positive integer")
integer = _integer(-(2**63), "an integer")  # a flag's own range is checked where it is read


def real(text: str) -> float:
    """An argparse type: a number written in ASCII digits (float() reads '٠.٥' as 0.5)."""
    ascii_digits(text)
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
# --step: a checkpoint step, 0 included (the only checkpoint of an imported or converted run)
step_number = _integer(0, "a checkpoint step (an integer >= 0)")


def run_flags(p: argparse.ArgumentParser, *, examples: bool = True, weights: bool = True) -> None:
    """--run, --json, (with ``weights``) --step and --raw-weights, (with ``examples``) --split and --examples."""
    p.add_argument("--run", required=True, help="run directory made by `loopformer train`, e.g. runs/quickstart")
    if weights:
        p.add_argument("--step", type=step_number, help="checkpoint step to load (default: the latest)")
        p.add_argument("--raw-weights", action="store_true",
                       help="a run trained with train.ema: read the params the optimizer trained, not their moving "
                            "average (the EMA weights, read by default)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout instead of tables")
    if examples:
        p.add_argument("--split", action="append", metavar="NAME",
                       help="eval split of the run (data.eval_splits; repeatable; default: all)")
        p.add_argument("--examples", type=positive, default=DEFAULT_EXAMPLES, metavar="N", help=EXAMPLES_HELP)


def probe_file(text: str) -> str:
    """An argparse type: a probe file's name (an empty one was taken for no --probe: the splits were scored)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a probe file (e.g. asset:probes_arithmetic.jsonl), got {text!r}")
    return text


def probe_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--probe", metavar="FILE.jsonl", type=probe_file,
                   help="text runs: score on a probe file ({\"prompt\": ..., \"answer\": ...} per line; "
                        "asset:probes_arithmetic.jsonl ships) instead of the eval splits: the answers' loss per token "
                        "and greedy exact match")


def check_probe(args: argparse.Namespace, info: Any) -> list[tuple[str, str]]:
    """``--probe``'s probes (the first --examples), checked against the run ``info`` before its weights are read (a
    task run, --split beside it, or a bad file was refused after they were loaded, #27 pass 25); [] without it."""
    if not getattr(args, "probe", None):
        return []
    from loopformer.data.probes import read_probes
    from loopformer.inference.generate import tokenizer_of

    if getattr(args, "split", None):
        raise AnalysisError("give either --probe FILE or --split NAME: a probe file replaces the eval splits")
    if tokenizer_of(info.data) is None:
        raise AnalysisError(f"--probe needs a text run (prompts and answers are text), but {info.path} trains on the "
                            f"synthetic task '{info.cfg.data.task}'; drop --probe (the task's splits are scored "
                            f"without it)")
    return read_probes(args.probe)[: args.examples]  # --examples: the first N probes (a file holds tens)


def probe_sets(args: argparse.Namespace, run: Any) -> dict[str, list[Any]] | None:
    """``{"probe": batches}`` of ``--probe`` for a loaded text run (`loopformer.data.probes`), or None without it."""
    if not getattr(args, "probe", None):
        return None
    from loopformer.data.probes import probe_batches
    from loopformer.evaluation.run import PROBE_SPLIT
    from loopformer.inference.generate import prompt_ids, tokenizer_of

    probes = check_probe(args, run.info)
    tokenizer = tokenizer_of(run.info.data)
    fmt = run.info.cfg.data.prompt_format

    def prompt(text: str) -> list[int]:
        try:
            return prompt_ids(tokenizer, text, fmt)
        except PlanError as e:  # it named --prompt, a flag not given
            raise DataError(f"--probe {args.probe}: the prompt {text!r}{str(e).removeprefix('--prompt')}") from None

    def answer(text: str) -> list[int]:
        dropped = tokenizer.unencodable(text) if hasattr(tokenizer, "unencodable") else []
        if dropped:  # the answer scored would not be the one given
            raise DataError(f"--probe {args.probe}: the answer {text!r}: the run's tokenizer has no token for "
                            f"{', '.join(map(repr, dropped[:5]))} and no unknown token, so they would be dropped "
                            f"silently; leave them out of the answer")
        return tokenizer.encode(text)

    return run.check_fits({PROBE_SPLIT: probe_batches(probes, prompt, answer, min(16, len(probes)))})


def exit_flags(p: argparse.ArgumentParser, *, many: bool, compact: bool = True) -> None:
    """--exit and --max-loops (the cap of the circuits that exit); with ``compact``, --compact."""
    p.add_argument("--exit", action="append", metavar="[CIRCUIT=]RULE",
                   help="stop each token's iterations by a rule: " + ", ".join(EXITS.get(n).form() for n in EXITS.names())
                        + " (learned: a halting head), options ,min=N ,every=K; without CIRCUIT, every circuit"
                        + ("; several thresholds (latent_diff:0.1,0.03,0.01) are compared" if many else ""))
    p.add_argument("--max-loops", type=positive, metavar="N",
                   help="--exit: the most iterations of an exiting circuit (default: its max_loops, may exceed "
                        "anything seen in training)")
    if not compact:
        return
    p.add_argument("--compact", choices=tuple(COMPACT), default="auto",
                   help="tokens that stopped (--exit, or --loops X=auto): on computes only the running ones of a "
                        "one-block circuit, gathered into a dense buffer; off masks every token at every iteration; "
                        "auto (default) compacts batches (decoding: prefills and steps) of >= 4,096 tokens. Same "
                        "results either way")


COMPACT = {"auto": None, "on": True, "off": False}  # --compact -> Plan.compact


def _stopping(info: Any, stopping: Iterable[str], halting: bool = True, routed: bool = False) -> list[str]:
    """The circuits whose tokens may stop early: ``stopping``, (with ``halting``) the ACT circuits, which stop by
    their own rule, and (with ``routed``: evaluation) the circuit of a one-circuit routed stage, whose router stops
    them (a routed bank of several circuits is never compacted)."""
    model = info.cfg.model
    acts = [c.name for c in model.circuits() if c.halting.rule().mixes_output] if halting else []
    routers = [s.circuits[0].name for s in model.stages if s.router.routes and len(s.circuits) == 1] if routed else []
    return list(dict.fromkeys([*stopping, *acts, *routers]))


def compact_note(args: argparse.Namespace, info: Any, stopping: Iterable[str], routed: bool = False) -> dict[str, str]:
    """{"compact": auto | on | off} for a --json document where tokens may stop early (`computed_loops` and a
    decoding's `computed` count what ran, which --compact chooses), else {}."""
    return {"compact": args.compact} if _stopping(info, stopping, routed=routed) else {}


def compact_choice(args: argparse.Namespace, info: Any, stopping: Iterable[str],
                   how: str | None = None, *, halting: bool = True, routed: bool = False) -> bool | None:
    """``Plan.compact`` from --compact; PlanError when it is forced but no token can stop early (``stopping``: the
    circuits given an exit rule or a count per example; with ``halting``, ACT circuits too, which stop by their own
    rule; ``how``: what would make them stop, in this command; None: --exit, or --loops C=auto where a circuit C has
    a rule per difficulty), or when every circuit that can is of several blocks (only a one-block circuit is
    compacted: on and off ran the same masked program)."""
    if args.compact == "auto":
        return None
    model = info.cfg.model
    stopping = _stopping(info, stopping, halting, routed)
    if how is None:  # "--loops X=auto" was named on runs without such a rule, where it is refused (#27 pass 26)
        rules = list(plan.difficulty_rules(model))
        how = "--exit" + (f" (or --loops {rules[0]}=auto)" if rules else "")
    if not stopping:
        if model.circuits() and all(s.router.routes for s in model.stages if s.circuits):
            # every circuit is in a routed stage, where --exit is refused: "add --exit" was a fix refused in turn
            # (#27 pass 38)
            raise PlanError(f"--compact {args.compact} chooses how tokens that stopped early are run, and none can: "
                            f"every circuit is in a routed stage, whose bank of several circuits is never compacted "
                            f"(its router stops the tokens); drop --compact")
        raise PlanError(f"--compact {args.compact} chooses how tokens that stopped early are run, and none can: "
                        f"add {how}, or drop --compact")
    depths = {c: model.circuit(c).depth for c in stopping}
    if min(depths.values()) > 1:
        raise PlanError(f"--compact {args.compact} chooses how a one-block circuit runs the tokens that stopped, and "
                        f"the circuits that stop early have more blocks ("
                        + ", ".join(f"{c}: {d}" for c, d in depths.items()) + "), which always mask them; drop --compact")
    return COMPACT[args.compact]


def exit_caps(info: Any, exits: dict[str, Any], max_loops: int | None, loops: dict[str, int]) -> dict[str, int]:
    """``loops`` with every exiting circuit at its cap (`loopformer.model.plan.exit_caps`: --max-loops, or its
    --loops count, or the larger of its max_loops and eval_loops)."""
    return plan.exit_caps(info.cfg.model, exits, loops, max_loops)


def strict(value: Any) -> Any:
    """``value`` with NaN / inf floats (a diverging loop) replaced by None: strict JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict(v) for v in value]
    return value


def emit(args: argparse.Namespace, body: Callable[[], tuple[dict[str, Any], str]]) -> int:
    """Run ``body`` -> (JSON document, text); print one of them. In --json mode anything written to
    stdout on the way is sent to stderr, so stdout holds exactly the document."""
    out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr if args.json else out):
        doc, text = body()
    print(json.dumps(strict(doc), allow_nan=False) if args.json else text, file=out, flush=True)
    return 0


def check_writable(run: Path, writes: str, files: Sequence[Path] = ()) -> None:
    """AnalysisError, before any work is done, when a command cannot write its files (``writes``) into
    the run directory ``run`` (a read-only run: the fix is a copy of the run), or cannot replace or remove one
    of its earlier ``files`` (one made read-only, or mounted read-only into the run): found at the end, it would
    cost the work and leave no new set."""
    try:
        with tempfile.NamedTemporaryFile(dir=run, prefix=".write_test."):
            pass
    except OSError as e:
        copy = shlex.quote(str(Path(run).resolve().name) + "_copy")
        raise AnalysisError(f"{run} is not writable ({e.strerror or e}), and this command writes {writes} into it; "
                            f"copy the run (cp -r {shlex.quote(str(run))} {copy}) and pass --run {copy}") from None
    _check_journal(Path(run) / _JOURNAL)  # before the work: it is read when the new set is written
    for path in files:
        kind = special(path) if _OUTPUT.fullmatch(path.name) else None  # (not the folders of a sweep's runs)
        if kind in ("a folder", "a pipe or a device"):  # a folder failed after the work, naming free space; a FIFO (or
            # /dev/null through a link) was replaced by a file (#27 pass 28)
            where = f"{path} (a symlink to {os.path.realpath(path)})" if path.is_symlink() else str(path)
            raise AnalysisError(f"{where} is {kind}, where this command writes its {path.name} (a file, replaced "
                                f"whole); move it aside and run the command again")
        if path.exists() and not os.access(path, os.W_OK):
            raise AnalysisError(f"{path} is read-only, and this command replaces it (or removes it, where its new set "
                                f"has no such file); make it writable, or copy the run (cp -r) and pass --run COPY")
        target = Path(os.path.realpath(path)).parent if path.is_symlink() else None
        if target is not None and not target.is_dir():  # a link to nowhere: written through, failing after the work
            raise AnalysisError(f"{path} is a symlink into {target}, which does not exist, and this command writes the "
                                f"file it leads to; make that folder, or remove the link")
        if target is not None and not os.access(target, os.W_OK | os.X_OK):  # `replace_file` writes beside the file
            raise AnalysisError(f"{path} is a symlink into {target}, which is not writable, and this command replaces "
                                f"the file it leads to; make that folder writable, or put a copy of the file in its place")


def write_png(path: Path, png: bytes) -> str:
    """Write a plot into place (`replace_file`: never half of one) and log it; the path."""
    replace_file(path, png)
    log(f"wrote {path}")
    return str(path)


_JOURNAL = ".analysis-set.json"  # in a run directory while a command writes its set: what to put back
_KEPT = re.compile(r"\.(.+)\.(\d+)\.old")  # `_keep`'s copies
_OUTPUT = re.compile(r"[^/.][^/]*\.(csv|png)")  # the files a set holds: CSVs and plots directly in the run


@contextlib.contextmanager
def one_set(run_dir: Path, paths: Sequence[Path], name: str) -> Iterator[None]:
    """Write a command's files (``paths``: every one the block may replace or remove, inside ``run_dir``;
    ``name``: the command) as one set: under a lock on the run directory, so two commands at once (two sweeps, a
    sweep and a rys) write one after the other (the last one's set stays whole, never one's CSV beside the
    other's plots), and with the earlier files kept aside, so a failure part way (an error, Ctrl-C, SIGTERM) puts
    them all back. A journal (`_JOURNAL`) names the kept files while the block runs: a command killed outright
    (kill -9, a lost machine) part way leaves it, and the next command to write a set puts the earlier set back
    first (`_recover`), so a mix of old and new files lasts only until then."""
    fd = os.open(run_dir, os.O_RDONLY)
    saved: dict[Path, Path] = {}
    journal = run_dir / _JOURNAL
    try:
        with contextlib.suppress(OSError):  # a filesystem without locks: unlocked, as the trainer's lock does
            fcntl.flock(fd, fcntl.LOCK_EX)  # held for a few file writes: wait for them
        _recover(run_dir)
        kept = {path: _kept_name(path) for path in paths if path.exists()}
        record = {"command": name, "pid": os.getpid(),
                  "kept": {os.path.relpath(p, run_dir): os.path.relpath(k, run_dir) for p, k in kept.items()},
                  "new": [os.path.relpath(p, run_dir) for p in paths if p not in kept]}
        replace_file(journal, json.dumps(record, indent=1).encode())  # AnalysisError if it cannot be written
        try:
            for path, keep in kept.items():
                saved[path] = _keep(path, keep, name)
            yield
        except BaseException:
            for path in paths:
                with contextlib.suppress(OSError, AnalysisError):  # best effort: the error that got here is reported
                    if path in saved:  # (a link to the same file is left in place: `finally` removes it)
                        _put_back(saved[path], path)
                    elif path not in kept:
                        path.unlink(missing_ok=True)  # a new file where the earlier scan had none
            raise
        finally:
            journal.unlink(missing_ok=True)  # before the kept files go: a journal always finds what it names
    finally:
        for keep in saved.values():
            keep.unlink(missing_ok=True)
        os.close(fd)  # releases the lock


def _check_journal(journal: Path) -> None:
    """AnalysisError when the journal's name holds something `one_set` never writes: a FIFO blocked its read
    forever, a folder was a traceback where the journal is removed."""
    kind = special(journal) or ("a symlink" if journal.is_symlink() else None)  # written through, it would land elsewhere
    if kind:
        raise AnalysisError(f"{journal} is {kind}, where sweep, ablate, activity and rys keep the journal of the "
                            f"files they are replacing; remove it")
    if journal.is_file() and not os.access(journal, os.R_OK):
        _unreadable_journal(journal)


def _unreadable_journal(journal: Path) -> NoReturn:
    """AnalysisError for a journal this user may not read (another user's command, killed while writing its set,
    left it with their umask): it was taken for a damaged one and removed, and the earlier files it named, kept
    aside, were deleted as leftovers, leaving that command's half-written set in their place (#27 pass 31)."""
    q = shlex.quote(str(journal))
    raise AnalysisError(f"{journal} cannot be read by this user: it names the files another sweep, ablate, activity or "
                        f"rys is replacing, or was when it was killed, kept aside to be put back; make it readable "
                        f"(chmod u+r {q}) and run the command again, or, once no such command runs, remove it (rm {q}) "
                        f"to keep the files as they are")


def _recover(run_dir: Path) -> None:
    """Put back the set that a command killed outright while writing it left behind (its journal, `one_set`),
    and remove kept copies that no journal names (a kill after the journal went). Called under the lock."""
    journal = run_dir / _JOURNAL
    _check_journal(journal)
    try:
        entry = jsontext.loads(journal.read_text(encoding="utf-8"))
        kept, new, command = dict(entry["kept"]), list(entry["new"]), str(entry["command"])
        if not all(_OUTPUT.fullmatch(p) for p in [*kept, *new]) or not all(
                re.fullmatch(rf"\.{re.escape(p)}\.\d+\.old", k) for p, k in kept.items()):
            raise ValueError("names files no set holds")  # edited by hand or copied: put back and remove nothing
    except FileNotFoundError:
        entry = None
    except PermissionError:  # whole, for all this user knows: put back nothing and remove nothing
        _unreadable_journal(journal)
    except (OSError, ValueError, KeyError, TypeError):  # not one `one_set` wrote (it writes whole files): ignored
        entry = None
        journal.unlink(missing_ok=True)
    if entry is not None:
        for path, keep in kept.items():
            if (run_dir / keep).is_file():
                _put_back(run_dir / keep, run_dir / path)
        for path in new:
            (run_dir / path).unlink(missing_ok=True)
        journal.unlink()
        log(f"put back the files in {run_dir} that an earlier {command} (pid {entry.get('pid')}) was killed while "
            f"replacing")
    for leftover in run_dir.iterdir():
        if _KEPT.fullmatch(leftover.name) and leftover.is_file():
            leftover.unlink(missing_ok=True)


def _put_back(keep: Path, path: Path) -> None:
    """Put the kept copy ``keep`` back as ``path`` (a symlink: the file it leads to, as `replace_file` writes it): a
    rename, or, where that file is on another disk than the run (a link to a shared folder), a copy written whole
    beside it: the rename failed ("Invalid cross-device link"), so a set that failed part way kept the linked file's
    new content, the earlier one deleted, and the put-back after a kill -9 was a traceback in every later command."""
    target = Path(os.path.realpath(path))
    try:
        os.replace(keep, target)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        replace_file(target, keep.read_bytes())
        keep.unlink(missing_ok=True)


def _kept_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.old")


def _keep(path: Path, keep: Path, name: str) -> Path:
    """A hard link (or, where links fail, a copy) of ``path`` as ``keep``: the file as it is, whatever replaces
    it."""
    keep.unlink(missing_ok=True)
    try:
        try:
            os.link(os.path.realpath(path), keep)  # a symlink's file: the link itself kept nothing to put back
        except OSError:
            shutil.copy2(path, keep)
    except OSError as e:
        raise AnalysisError(f"cannot keep a copy of {path} while {name} replaces it ({e.strerror or e}): make the run "
                            f"writable (or free disk space) and run the command again") from None
    return keep
