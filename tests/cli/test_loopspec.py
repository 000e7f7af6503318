"""--loops parsing: grids, lists, ranges and the errors a user can make."""

import re

import pytest

from loopformer.cli.loopspec import geometric_grid, parse_counts, parse_exits, parse_loops
from loopformer.errors import PlanError


def test_geometric_grid():
    assert geometric_grid(1, 64) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    assert geometric_grid(5, 20) == [5, 6, 8, 12, 16, 20]
    assert geometric_grid(7, 7) == [7]
    assert geometric_grid(1, 1000)[-3:] == [512, 768, 1000]


@pytest.mark.parametrize("text, counts", [
    ("16", [16]), ("1:64", geometric_grid(1, 64)), ("2:10:4", [2, 6, 10]), ("1:8:3", [1, 4, 7]),
    ("8,1,2", [1, 2, 8]), (" 3 , 5 ", [3, 5]), ("1000", [1000]), ("1:10:20000", [1]),
])
def test_parse_counts(text, counts):
    assert parse_counts(text, "--loops X=" + text) == counts


@pytest.mark.parametrize("text, message", [
    ("0", "must be >= 1, got 0"), ("-3", "must be >= 1"), ("1:0:1", "must be >= 1"), ("8:2", "range 8:2 is empty"),
    ("x", "malformed"), ("1:", "malformed"), ("1:2:3:4", "A:B or A:B:STEP"), ("1:4,8", "mix of"),
    ("", "malformed"), ("99999", "above the limit"),
    ("8,1,2,2", r"^--loops X=8,1,2,2 lists 2 twice; give each count once$"),  # #27 pass 18: merged with no word
    # #27 pass 19: the step was called a loop count ("loop counts must be >= 1, got 0")
    ("1:3:0", r"^--loops X=1:3:0: the step of A:B:STEP must be >= 1, got 0$"), ("1:3:-1", "the step of A:B:STEP"),
])
def test_parse_counts_errors(text, message):
    with pytest.raises(PlanError, match=message):
        parse_counts(text, "--loops X=" + text)


def test_parse_loops():
    assert parse_loops(["Y=4", "X=1:4"], ["X", "Y"], grid=True) == {"X": [1, 2, 3, 4], "Y": [4]}
    assert parse_loops(None, ["X"], grid=False) == {}
    with pytest.raises(PlanError, match="unknown circuit 'Z' in --loops Z=3; this run's circuits are X, Y"):
        parse_loops(["Z=3"], ["X", "Y"], grid=False)
    with pytest.raises(PlanError, match="malformed --loops X16"):
        parse_loops(["X16"], ["X"], grid=False)
    with pytest.raises(PlanError, match="given twice"):
        parse_loops(["X=1", "X=2"], ["X"], grid=True)
    with pytest.raises(PlanError, match="one count per circuit; use `loopformer sweep`"):
        parse_loops(["X=1:8"], ["X"], grid=False)
    # #27 pass 37: two circuits in one flag were "'1:3,Y=1:2' is not a loop count", with no word of how to give Y
    with pytest.raises(PlanError, match=r"^--loops X=1:3,Y=1:2 gives several circuits in one flag; pass one --loops "
                                        r"per circuit: --loops X=1:3 --loops Y=1:2$"):
        parse_loops(["X=1:3,Y=1:2"], ["X", "Y"], grid=True)
    with pytest.raises(PlanError, match=r"^--loops X=1,2, Y=3 gives .*: --loops X=1,2 --loops Y=3$"):
        parse_loops(["X=1,2, Y=3"], ["X", "Y"], grid=True)
    with pytest.raises(PlanError, match=r"^--loops X=2,X=3 names circuit 'X' twice; pass one --loops per circuit$"):
        parse_loops(["X=2,X=3"], ["X", "Y"], grid=False)
    # each flag the line names runs: no comma left on a count, no circuit the run does not have
    with pytest.raises(PlanError, match=r"^--loops X=2,,Y=3 gives .*: --loops X=2 --loops Y=3$"):
        parse_loops(["X=2,,Y=3"], ["X", "Y"], grid=False)
    with pytest.raises(PlanError, match=r"^unknown circuit 'Z' in --loops X=2,Z=4; this run's circuits are X, Y$"):
        parse_loops(["X=2,Z=4"], ["X", "Y"], grid=False)
    # #27 pass 40: a semicolon or a space between them was suggested back as the flag given; `X==2` is one circuit
    for spec in ("X=2;Y=3", "X=2 Y=3", "X=2; Y=3"):
        with pytest.raises(PlanError, match=rf"^--loops {spec} gives .*: --loops X=2 --loops Y=3$"):
            parse_loops([spec], ["X", "Y"], grid=False)
    with pytest.raises(PlanError, match=r"^malformed --loops X==2: '=2' is not a loop count"):
        parse_loops(["X==2"], ["X", "Y"], grid=False)


@pytest.mark.parametrize("spec, message", [
    # #27 pass 29: nothing after the colon has no comma to remove; pass 28's leftover fix said to remove one
    ("X=latent_diff:", "malformed --exit X=latent_diff:: no threshold; write "),
    ("X=latent_diff: ", "malformed --exit X=latent_diff: : no threshold; write "),
    ("X=context_diff:0.01,,min=2", "--exit X=context_diff:0.01,,min=2: an empty item between commas; remove the extra "
                                   "comma"),
    ("X=latent_diff:,", "--exit X=latent_diff:,: an empty item between commas"),
])
def test_parse_exits_names_what_is_missing(spec, message):
    with pytest.raises(PlanError) as info:
        parse_exits([spec], ["X", "Y"], many=True)
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize("specs", [["X=latent_diff:0.1", "learned:q=0.5"], ["learned:q=0.5", "X=latent_diff:0.1"],
                                   ["X=latent_diff:0.1", "kl:0.1"], ["kl:0.1", "X=latent_diff:0.1"]])
def test_a_rule_without_a_circuit_beside_a_named_one_is_told_as_two_rules_for_it(specs):
    """#27 pass 33: `--exit X=latent_diff:0.1 --exit learned:q=0.5` on a model whose X alone has a halting head was told
    "name it, e.g. --exit X=learned:q=0.5", refused in turn as two rules for X (kl without a circuit the same): the
    rule without a circuit sets X's too, which is the line."""
    with pytest.raises(PlanError, match=r"both set circuit X's rule; pass one --exit per circuit$"):
        parse_exits(specs, ["X", "Y"], many=False, heads=["X"])
    # alone, each still names the circuit to give it
    with pytest.raises(PlanError, match=r"name it, e.g. --exit X="):
        parse_exits([s for s in specs if not s.startswith("X=")], ["X", "Y"], many=False, heads=["X"])


@pytest.mark.parametrize("spec, message", [
    # each circuit's options are the ones written after its rule (X was given both: `--exit X=...,min=2,min=3`)
    ("X=latent_diff:0.1,min=2,Y=kl:0.1,min=3", "give each circuit its own --exit, e.g. --exit X=latent_diff:0.1,min=2 "
                                               "--exit Y=kl:0.1,min=3"),
    ("X=latent_diff:0.1,Y=latent_diff:0.2,min=2", "e.g. --exit X=latent_diff:0.1 --exit Y=latent_diff:0.2,min=2"),
    # a rule without a circuit is the other circuits' (`--exit latent_diff:0.1 --exit Y=...` sets Y twice)
    ("latent_diff:0.1, Y=kl:0.1", "e.g. --exit X=latent_diff:0.1 --exit Y=kl:0.1"),
    # ... and with every circuit named after it, no circuit's: it was dropped from the flags without a word (pass 36)
    ("kl:0.1,X=latent_diff:0.1,Y=latent_diff:0.2", "'kl:0.1' names no circuit, and every circuit (X, Y) is given its "
                                                   "own rule after it, so it would apply to none; drop it, and give "
                                                   "each circuit its own --exit, e.g. --exit X=latent_diff:0.1 --exit "
                                                   "Y=latent_diff:0.2"),
    # the flags suggested were refused in turn: two rules for X, and a rule `Y=`
    ("X=latent_diff:0.1,X=kl:0.1", "circuit X is given two rules ('X=latent_diff:0.1' and 'X=kl:0.1'); a circuit "
                                   "takes one rule, one --exit per circuit"),
    ("X=latent_diff:0.1,Y=", "'Y=' names circuit Y with no rule; give it one in its own --exit, or drop it"),
    # a semicolon or a space between the rules named the option '0.1;Y' as unknown (pass 40's leftover, as --loops)
    ("X=latent_diff:0.1;Y=kl:0.1", "e.g. --exit X=latent_diff:0.1 --exit Y=kl:0.1"),
    ("X=latent_diff:0.1 Y=kl:0.1", "e.g. --exit X=latent_diff:0.1 --exit Y=kl:0.1"),
    ("latent_diff:0.1,min=2; Y=kl:0.1", "e.g. --exit X=latent_diff:0.1,min=2 --exit Y=kl:0.1"),
])
def test_one_exit_naming_several_circuits_suggests_flags_that_run(spec, message):
    """#27 pass 35: the flags the line suggests for `--exit X=RULE,Y=RULE` are each accepted."""
    with pytest.raises(PlanError) as info:
        parse_exits([spec], ["X", "Y"], many=True)
    assert str(info.value).startswith(f"--exit {spec}: ") and str(info.value).endswith(message), str(info.value)
    flags = str(info.value).partition("e.g. ")[2].split("--exit ")[1:]
    if flags:
        assert parse_exits([f.strip() for f in flags], ["X", "Y"], many=True)


def test_max_loops_without_exit_on_a_routed_run_names_the_fix_that_runs():
    """#27 pass 38: on a run whose every circuit is in a routed stage, --max-loops without --exit said "add --exit RULE",
    which a routed stage refuses in turn; --loops caps its router's rounds."""
    with pytest.raises(PlanError, match=r"^--max-loops 8 caps the circuits that exit, and every circuit is in a routed "
                                        r"stage, whose router stops its tokens; cap its rounds with --loops \(e.g. "
                                        r"--loops X=8\), or drop --max-loops$"):
        parse_exits(None, ["X"], many=False, max_loops=8, routed=["X"])
    with pytest.raises(PlanError, match="add --exit RULE"):  # a circuit outside the routed stage can exit
        parse_exits(None, ["X", "Y"], many=False, max_loops=8, routed=["X"])


@pytest.mark.parametrize("parse, text", [
    ("loops", "fixed(\u0663)"), ("loops", "\u0663"), ("loops", "uniform(1, \uff13)"),
    ("cache", "ring:\u0663"), ("exit", "latent_diff:0.1,every=\u0662"),
])
def test_a_digit_of_another_script_is_refused_everywhere_a_number_is_read(parse, text):
    """#27 pass 40's leftover: Python's int() and float() read '٣' and '３' as 3, so `loops: fixed(٣)`, `--cache ring:٣`
    and an exit's `every=٢` ran as if written in ASCII; each names the digit."""
    from loopformer.variants.cache import CachePolicy
    from loopformer.variants.exits import ExitRule
    from loopformer.variants.loops import LoopDistribution

    read = {"loops": LoopDistribution.parse, "cache": CachePolicy.parse, "exit": ExitRule.parse}[parse]
    with pytest.raises((ValueError, PlanError), match=r"is a digit of another script \(U\+[0-9A-F]{4}\); write ASCII "):
        read(text)


@pytest.mark.parametrize("text, shown", [("fixed(0)", "got 0"), ("fixed(-0.0)", "got 0"), ("uniform(0, 3)", "got (0, 3)"),
                                         ("fixed(2.5)", "got 2.5")])
def test_a_loop_distribution_refused_shows_its_numbers_as_given(text, shown):
    """#27 pass 40's leftover: `convert --loops fixed(0)` was "needs an integer n >= 1, got 0.0"."""
    from loopformer.variants.loops import LoopDistribution

    with pytest.raises(ValueError, match=rf", {re.escape(shown)}$"):
        LoopDistribution.parse(text)


def test_a_circuit_named_in_another_unicode_form_is_told_apart():
    """#27 pass 41: "unknown circuit 'é' in --loops é=3; this run's circuits are é" named no difference (é typed as
    U+00E9, the run's as e + U+0301)."""
    with pytest.raises(PlanError, match=r"this run's circuits are e\u0301, Y, and '\u00e9' \(U\+00E9\) is circuit "
                                        r"e\u0301 \(e U\+0301\) in another Unicode form: type it as the run writes it"):
        parse_loops(["\u00e9=3"], ["e\u0301", "Y"], grid=False)
    with pytest.raises(PlanError, match=r"^unknown circuit 'Z' in --loops Z=3; this run's circuits are X, Y$"):
        parse_loops(["Z=3"], ["X", "Y"], grid=False)
