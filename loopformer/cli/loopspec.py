"""``--loops`` flags: ``X=16`` (one count), ``X=1:64`` (geometric-ish grid), ``X=1:64:4`` (linear),
``X=1,2,8`` (a list).

Every mistake raises `PlanError` with one line naming the flag and the accepted forms.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from loopformer.errors import PlanError, unplain_digits
from loopformer.model.plan import MAX_LOOPS
from loopformer.variants.exits import EXITS, ExitRule

FORMS = "CIRCUIT=N (e.g. X=16), and for sweeps CIRCUIT=A:B (grid 1,2,3,4,6,8,12,...), A:B:STEP or N1,N2,..."


def geometric_grid(lo: int, hi: int) -> list[int]:
    """lo, hi and every 2^k and 3 * 2^k in between: ``geometric_grid(1, 64)`` is
    [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64] (about two points per doubling)."""
    points, p = {lo, hi}, 1
    while p <= hi:
        points.update(v for v in (p, 3 * p) if lo <= v <= hi)
        p *= 2
    return sorted(points)


def parse_counts(text: str, flag: str) -> list[int]:
    """The loop counts of one spec (``16``, ``1:64``, ``1:64:4``, ``1,2,8``), sorted and unique."""
    text = text.strip()
    foreign = unplain_digits(text)
    if foreign:  # `X=٣` ran 3 loops: Python's int() reads any script's digits (#27 pass 40's leftover)
        raise PlanError(f"{flag}: {foreign}")  # (the flag shows the value)
    if not re.fullmatch(r"-?[0-9]+(\s*[:,]\s*-?[0-9]+)*", text):
        raise PlanError(f"malformed {flag}: '{text}' is not a loop count; write {FORMS}")
    nums = [int(t) for t in re.split(r"[:,]", text)]
    # A:B:STEP's step is no loop count (X=1:3:0 was "loop counts must be >= 1, got 0")
    stepped = ":" in text and len(nums) == 3
    if stepped and nums[2] < 1:
        raise PlanError(f"{flag}: the step of A:B:STEP must be >= 1, got {nums[2]}")
    for n in nums[:2] if stepped else nums:
        if n < 1:
            raise PlanError(f"{flag}: loop counts must be >= 1, got {n}")
        if n > MAX_LOOPS:
            raise PlanError(f"{flag}: loop count {n} is above the limit of {MAX_LOOPS}")
    if ":" in text and "," in text:
        raise PlanError(f"malformed {flag}: mix of ':' and ','; write {FORMS}")
    if ":" in text:
        if len(nums) > 3:
            raise PlanError(f"malformed {flag}: a range is A:B or A:B:STEP; write {FORMS}")
        lo, hi = nums[0], nums[1]
        if lo > hi:
            raise PlanError(f"{flag}: the range {lo}:{hi} is empty; write it low:high")
        return geometric_grid(lo, hi) if len(nums) == 2 else list(range(lo, hi + 1, nums[2]))
    twice = next((n for n in nums if nums.count(n) > 1), None)
    if twice is not None:  # refused as everywhere else a list repeats an entry (eval.sweep_loops, --split, bench lists)
        raise PlanError(f"{flag} lists {twice} twice; give each count once")
    return sorted(nums)


AUTO = "auto"  # --loops X=auto: each example its training rule's count (loops: per_difficulty(a, b))


def circuits_phrase(circuits: Sequence[str], name: str | None = None) -> str:
    """The phrase naming a run's circuits ("this run's circuits are X, Y"), or saying it has none; with the unknown
    ``name``, a circuit it matches in another Unicode form (`é` as e + U+0301): "unknown circuit 'é'; this run's
    circuits are é" named no difference (#27 pass 41)."""
    phrase = (f"this run's circuits are {', '.join(circuits)}" if circuits else
              "this run has no circuits (a plain transformer: nothing loops)")
    same = next((c for c in circuits if name is not None and unicodedata.normalize("NFKC", c)
                 == unicodedata.normalize("NFKC", name)), None)
    if same is None:
        return phrase
    return (f"{phrase}, and '{name}' ({_code_points(name)}) is circuit {same} ({_code_points(same)}) in another "
            f"Unicode form: type it as the run writes it (copy it from `loopformer inspect`)")


def _code_points(text: str) -> str:
    return " ".join(f"U+{ord(c):04X}" if ord(c) > 127 else c for c in text)


def split_auto(specs: Sequence[str] | None, circuits: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the ``--loops`` specs that are counts, the circuits given as ``CIRCUIT=auto``)."""
    rest, auto = [], []
    for spec in specs or []:
        name, sep, value = spec.partition("=")
        if sep and value.strip().lower() == AUTO:
            if name.strip() not in circuits:
                raise PlanError(f"unknown circuit '{name.strip()}' in --loops {spec}; "
                               f"{circuits_phrase(circuits, name.strip())}")
            auto.append(name.strip())
        else:
            rest.append(spec)
    return rest, auto


def parse_loops(specs: Sequence[str] | None, circuits: Sequence[str], *, grid: bool,
                single: str = "this command takes one count per circuit; use `loopformer sweep` to evaluate a range "
                              "of counts") -> dict[str, list[int]]:
    """``["X=1:64", "Y=4"]`` -> ``{"X": [1, 2, ..., 64], "Y": [4]}`` (circuits in the model's order).

    With ``grid=False`` each circuit takes exactly one count (eval, generate with one setting); ``single`` says
    why when a range is given.
    """
    out: dict[str, list[int]] = {}
    for spec in specs or []:
        flag = f"--loops {spec}"
        name, sep, counts = spec.partition("=")
        name = name.strip()
        if not sep or not name:
            raise PlanError(f"malformed {flag}: write {FORMS}")
        if name not in circuits:
            raise PlanError(f"unknown circuit '{name}' in {flag}; {circuits_phrase(circuits, name)}")
        if name in out:
            raise PlanError(f"{flag}: circuit '{name}' is given twice; pass one --loops per circuit")
        if counts.strip().lower() == AUTO:  # eval removes these first (split_auto)
            raise PlanError(f"{flag}: {AUTO} (each example at its training rule's count) is read by `loopformer eval` "
                            f"only; give this command a count, e.g. --loops {name}=8")
        # several circuits in one flag: `--loops X=1:3,Y=1:2` was "'1:3,Y=1:2' is not a loop count", with no word of
        # how to give Y (the commas between them dropped, and names checked first: `X=2,,Y=3` suggested `--loops X=2,`,
        # and `Z=4` on a run without Z a flag refused in turn); a semicolon or a space between them too (`X=2;Y=3`
        # suggested `--loops X=2;Y=3`, the flag given; `X==2`, one circuit, was called several; #27 pass 40)
        pieces = [p.strip(" \t,;") for p in re.split(r"[,;\s][\s,;]*(?=[^,;\s=]+=)", spec.strip())]
        if len(pieces) > 1:
            names = [p.partition("=")[0].strip() for p in pieces]
            unknown = next((n for n in names if n not in circuits), None)
            if unknown is not None:
                raise PlanError(f"unknown circuit '{unknown}' in {flag}; {circuits_phrase(circuits, unknown)}")
            twice = next((n for n in names if names.count(n) > 1), None)
            if twice is not None:
                raise PlanError(f"{flag} names circuit '{twice}' twice; pass one --loops per circuit")
            raise PlanError(f"{flag} gives several circuits in one flag; pass one --loops per circuit: "
                            + " ".join(f"--loops {p}" for p in pieces))
        values = parse_counts(counts, flag)
        if not grid and len(values) > 1:
            raise PlanError(f"{flag}: {single}")
        out[name] = values
    return {c: out[c] for c in circuits if c in out}


def exit_forms() -> str:
    """How --exit is written, with the kinds registered now (`register_exit`: a hand-kept list left patience out)."""
    *kinds, last = EXITS.names()
    return (f"[CIRCUIT=]KIND:THRESHOLDS[,min=N][,every=K] with KIND {', '.join(kinds)} or {last} (e.g. "
            f"latent_diff:0.01, X=kl:5e-4, learned:q=0.5; sweep: latent_diff:0.1,0.03,0.01)")


def _split_exit(flag: str, spec: str, named: str, circuits: Sequence[str], targets: Sequence[str]) -> str:
    """The line for one ``--exit`` that names circuits inside it (``X=RULE,min=2,Y=RULE,min=3``): the flags meant, one
    per circuit, each with the options written after its rule (the suggestion gave X every flag's options, ``min=2,
    min=3``), or the circuit named twice or with no rule (the suggestion was refused in turn; #27 pass 35)."""
    names = "|".join(re.escape(c) for c in sorted(circuits, key=len, reverse=True))
    pieces = [p.strip() for p in re.split(rf",\s*(?=(?:{names})\s*=)", spec)]
    given = [(p.partition("=")[0].strip(), p) for p in pieces[1:]]
    first = pieces[0] if len(targets) == 1 else None
    if first is None:  # a rule without a circuit first: it is meant for the circuits the others do not name
        rest = [c for c in circuits if c not in {c for c, _ in given}]
        if not rest:  # the suggestion dropped it: every circuit named after it has a rule (#27 pass 36)
            return (f"{flag}: '{pieces[0]}' names no circuit, and every circuit ({', '.join(circuits)}) is given its "
                    f"own rule after it, so it would apply to none; drop it, and give each circuit its own --exit, "
                    f"e.g. " + " ".join(f"--exit {piece}" for _, piece in given))
        given = [(c, f"{c}={pieces[0]}") for c in rest] + given
    else:
        given = [(targets[0], first), *given]
    seen: dict[str, str] = {}
    for circuit, piece in given:
        if circuit in seen:
            return (f"{flag}: circuit {circuit} is given two rules ('{seen[circuit]}' and '{piece}'); a circuit takes "
                    f"one rule, one --exit per circuit")
        seen[circuit] = piece
        if not piece.partition("=")[2].strip():
            return f"{flag}: '{piece}' names circuit {circuit} with no rule; give it one in its own --exit, or drop it"
    return (f"{flag}: '{named}' names circuit {named.split('=')[0].strip()} inside one --exit; give each circuit its "
            f"own --exit, e.g. " + " ".join(f"--exit {piece}" for _, piece in given))


def parse_exits(specs: Sequence[str] | None, circuits: Sequence[str], *, many: bool, max_loops: int | None = None,
                heads: Sequence[str] = (), routed: Sequence[str] = ()) -> list[dict[str, ExitRule]]:
    """``--exit`` flags -> one {circuit: rule} per threshold (the flags' thresholds in order; several
    only with ``many``, for sweeps). A rule without a circuit applies to every circuit; kl and
    entropy_diff read the model's output, so without a name they need a one-circuit model, as learned needs one
    where only some circuits have a halting head (``heads``). PlanError for ``--max-loops`` (``max_loops``) without an
    exit, a run with no circuits, or a circuit given two rules (``routed``: circuits that take no exit rule)."""
    if max_loops is not None and max_loops > MAX_LOOPS:
        raise PlanError(f"--max-loops {max_loops}: loop count {max_loops} is above the limit of {MAX_LOOPS}")
    if not specs:
        if max_loops is not None and not circuits:  # --exit and --loops, the fixes below, are refused there too
            raise PlanError(f"--max-loops {max_loops} caps the circuits that exit, and this run has no looped circuits; "
                            f"drop --max-loops")
        if max_loops is not None and set(circuits) <= set(routed):  # (``routed``: circuits of routed stages)
            # --exit is refused on a routed stage: "add --exit RULE" was a fix refused in turn (#27 pass 38)
            raise PlanError(f"--max-loops {max_loops} caps the circuits that exit, and every circuit is in a routed "
                            f"stage, whose router stops its tokens; cap its rounds with --loops (e.g. --loops "
                            f"{circuits[0]}={max_loops}), or drop --max-loops")
        if max_loops is not None:
            raise PlanError(f"--max-loops {max_loops} caps the circuits that exit, and no --exit is given; add --exit "
                            f"RULE, or give a fixed count with --loops")
        return []
    if not circuits:
        raise PlanError(f"--exit {specs[0]}: this run has no looped circuits, so nothing can exit; drop --exit")
    per_flag = []
    # a rule without a circuit that must name one, told once every flag is read: beside `--exit X=latent_diff:0.1`
    # the circuit it would name (X) has a rule, and "name it, e.g. --exit X=learned:q=0.5" was refused in turn as
    # two rules for X, the line that answers them both (#27 pass 33)
    unnamed: PlanError | None = None
    for spec in specs:
        flag = f"--exit {spec}"
        name, sep, rest = spec.partition("=")
        if sep and ":" not in name and name.strip() != "q":
            name, body = name.strip(), rest
            if name not in circuits:
                raise PlanError(f"unknown circuit '{name}' in {flag}; {circuits_phrase(circuits, name)}")
            targets = [name]
        else:
            body, targets = spec, list(circuits)
        # several rules split by a semicolon or a space (`X=latent_diff:0.1;Y=kl:0.1`) named the option '0.1;Y' as
        # unknown; read as the commas `_split_exit` answers with the flags meant (#27 pass 40's leftover, as --loops)
        names = "|".join(re.escape(c) for c in sorted(circuits, key=len, reverse=True))
        joined = re.sub(rf"[\s,]*[;\s][\s;,]*(?=(?:{names})\s*=)", ",", spec.strip())
        if joined != re.sub(rf",\s*(?=(?:{names})\s*=)", ",", spec.strip()):
            later = re.search(rf",\s*((?:{names})\s*=[^,]*)", joined)
            if later is not None and ";" not in joined.replace(later.group(0), ""):
                raise PlanError(_split_exit(flag, joined, later.group(1), circuits, targets))
        kind, colon, values = body.partition(":")
        if not colon:
            raise PlanError(f"malformed {flag}: write {exit_forms()}")
        parts = [p.strip() for p in values.split(",")]
        if len(parts) > 1 and "" in parts:  # an empty item was dropped: `context_diff:0.01,,min=2` read as one comma
            raise PlanError(f"{flag}: an empty item between commas; remove the extra comma (write {exit_forms()})")
        parts = [p for p in parts if p]  # `latent_diff:` has no comma to remove: "no threshold" below
        options = [p for p in parts if p.split("=")[0].strip() in ("min", "every")]
        thresholds = [p for p in parts if p not in options]
        unknown = [p for p in thresholds if "=" in p and not (kind.strip() == "learned" and p.startswith("q="))]
        named = next((p for p in unknown if p.split("=")[0].strip() in circuits), None)
        if named is not None:  # `--exit X=latent_diff:0.01,Y=latent_diff:0.01` was "unknown option 'Y'" (#27 pass 34)
            raise PlanError(_split_exit(flag, spec, named, circuits, targets))
        if unknown:
            raise PlanError(f"{flag}: unknown option '{unknown[0].split('=')[0].strip()}' (the options are min=N and "
                            f"every=K)")
        if not thresholds:
            raise PlanError(f"malformed {flag}: no threshold; write {exit_forms()}")
        kind = kind.strip()
        thresholds = [f"q={t.removeprefix('q=').strip()}" if kind == "learned" else t for t in thresholds]
        rules = [ExitRule.parse(",".join([f"{kind}:{t}", *options])) for t in thresholds]
        twice = next((r for r in rules if rules.count(r) > 1), None)
        if twice is not None:  # evaluated and written twice (pass 7), then merged with no word (as a list repeats)
            raise PlanError(f"{flag} lists the threshold {twice} twice; give each once")
        if rules[0].needs_readout and len(targets) > 1:
            unnamed = unnamed or PlanError(f"{flag}: {kind} reads the model's output after every iteration, for one "
                                           f"circuit at a time; name it, e.g. --exit {circuits[0]}={body}")
        headless = [c for c in targets if c not in heads]
        if rules[0].needs_head and len(targets) > 1 and heads and headless:
            # the circuit without a head was refused with latent_diff as its fix, where the rule was meant for the
            # one with it (#27 pass 31); told here, where it is known that no circuit was named (#27 pass 32 told
            # the two apart by the rule objects' identity)
            have = f"circuit {heads[0]} has" if len(heads) == 1 else f"circuits {', '.join(heads)} have"
            unnamed = unnamed or PlanError(f"{flag} applies to every circuit ({', '.join(targets)}), and only {have} "
                                           f"a halting head for it to read; name it, e.g. --exit {heads[0]}={body}")
        for earlier, (done, _) in zip(specs, per_flag, strict=False):
            twice = [c for c in targets if c in done]
            if twice:
                raise PlanError(f"--exit {earlier} and --exit {spec} both set circuit {twice[0]}'s rule; pass one "
                                f"--exit per circuit")
        if max_loops is not None and rules[0].min_loops > max_loops:
            raise PlanError(f"{flag}: min={rules[0].min_loops} is above --max-loops {max_loops}, so no token could stop "
                            f"by the rule; lower min or raise --max-loops")
        per_flag.append((targets, rules))
    if unnamed is not None:
        raise unnamed
    count = max(len(r) for _, r in per_flag)
    if count > 1 and not many:
        raise PlanError("--exit: this command takes one threshold per rule; use `loopformer sweep` to compare thresholds")
    if any(len(r) not in (1, count) for _, r in per_flag):
        raise PlanError("--exit: flags with several thresholds must list the same number of them")
    out = []
    for i in range(count):
        setting: dict[str, ExitRule] = {}
        for targets, rules in per_flag:
            for c in targets:
                setting[c] = rules[i if len(rules) > 1 else 0]
        if sum(r.needs_readout for r in setting.values()) > 1:
            raise PlanError("--exit: only one circuit at a time can use kl or entropy_diff")
        out.append({c: setting[c] for c in circuits if c in setting})
    return out
