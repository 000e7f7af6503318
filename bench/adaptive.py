"""Adaptive computation, measured fairly: does a policy that decides per token how long to loop match the
best fixed loop count for less executed compute and wall-clock, and does its compute follow difficulty?

Setting (declared before its first run; #25). Per task (prefix_parity and maze3, think_longer's settings),
per seed 0..S-1, three models trained with the same data, steps and truncated backprop (the router's
states carry gradient through its last 4 rounds, ``router.backprop=4``, as the loops' do): think_longer's
looped model (with its recipe), the same with an Ouro halting head (``configs/adaptive/<task>_halting.yaml``) and
with a token-choice router over its bank (``configs/adaptive/<task>_router.yaml``). Every difficulty
(train, 2x, 4x) has two held-out sets from the same generator, "val" and "test" (think_longer's, 256
examples each, batches of 64). Policies: every fixed count of the think-longer sweep and the
difficulty rule ``auto`` (it reads each instance's length: a reference, not a policy the bar counts)
on the looped model; the training-free exits latent_diff, kl and entropy_diff at several thresholds
(looped model); the learned gate at several quantiles (halting model); the router at caps m, 2m, 4m and 8m
rounds; exits and gates capped at 8m = 96 iterations; evaluation as the library does it by default
(``--compact auto``: at batch 64 these tasks' batches are under its 4,096 tokens, so they run masked, every token
until the batch's slowest stops). ``--compact on`` (added 2026-12-05, before its first run, after the maze3 seed-0
record showed exits executing up to 5x the fixed count's FLOPs masked) forces compacted execution of every policy
in which tokens may stop at different iterations (exits, the gate, the difficulty rule, the router's exits): the
same predictions (``tests/model/test_compact.py``, ``tests/model/test_adaptive.py``), executed FLOPs and time of the
compacted path, bucket slack included. The JSON records which (``compact``).

The router and the halting model trained with their looped model's loop rule (declared 2026-12-05 21:00 UTC,
before their first runs, after the parity record in which the router and the gate, trained with ``uniform(8, 16)``
as the configs have it, extrapolated on one seed of three at best, as the looped model without its recipe does):
their X takes the looped model's ``per_difficulty`` recipe entry (for the router each token's count caps its
rounds, which it may stop earlier; for the halting head it is where the rest of each token's exit distribution
falls), runs ``<task>-{router,halting}_per_difficulty-seed<S>``; the router is scored at caps m, 2m, 4m and 8m
rounds (4m added with it: the best fixed counts at 2x were 3m-4m). The JSON records their loop overrides
(``variant_loops``). ``--variant-loops config`` (declared 2026-12-07 06:36 UTC, before its first run, after the maze3
router trained with the recipe's counts solved 66.4 % of seed 0's 2x mazes at every cap from 24 up, its rounds
growing with the cap, where the one trained with ``uniform(8, 16)`` had met the bar on that seed under the earlier
install) trains them with their configs' own loops again, runs ``<task>-{router,halting}-seed<S>``; everything
else is as above. Records of the two do not join (``variant_loops`` differs).

``--variant-loops full`` (declared 2026-12-07 19:50 UTC, before its first run) trains the router with the looped
model's whole recipe: its per-difficulty counts and its loss at each of the last 4 iterations (``train.iteration_loss=4``),
read on a routed bank at its last 4 rounds (a token that exited earlier holds its exit's state in all four), runs
``<task>-router_full-seed<S>`` (``--models looped,router``: a halting head has its own loss over the iterations). Why:
a diagnosis on val (2026-12-07, of the maze3 routers of the two-router record, not a record) found that the routers
that learned no stop are wrong on the 2x mazes' unreachable rooms (37.5 % of them on seed 0's recipe router at cap
48, 7.5 % on seed 2's config router, 0-0.1 % of the reachable ones), which run to the cap, while the routers that
learned a stop exit the reachable rooms early and keep the unreachable ones right to the cap: the states that run on
drift, and the looped model, which does not drift, is trained with this loss. Everything else is as ``recipe``.

``--variant-loops own`` (declared 2026-12-07 22:45 UTC, before its first run, after ``full``'s three-seed record
learned no stop) is ``full`` with the loss read where the looped model reads it: at each token's own last 4 rounds
(``router.window=own``; a loop's window reads each token's last 4 iterations h_{n-j}), runs
``<task>-router_own-seed<S>``. Under ``full`` a room that exits at round m, or whose count ends before the bank's,
is scored 4 times at its exit's state; read at its own rounds it is asked to be right over the 4 rounds before it
exits, as the looped model is asked over its last 4 iterations. Everything else is as ``full``.

``--variant-loops sense`` (declared 2026-12-08 01:55 UTC, before its first run, after ``own``'s routers collapsed and a
diagnosis (`bench/router_rooms.py`) had found that the maze3 routers which learned no stop lose the 2x mazes'
unreachable rooms, which no local step confirms: only the end of the flood elsewhere in the maze says they are done,
and a router that reads its own token's stream alone cannot see it) is ``recipe`` with a router that also reads how
much the states still move (``router.inputs=[change,context]``, `loopformer.model.router.settling_inputs`): the log
of its token's latent change over its last round, and the largest such change among the tokens that reach it (on
maze3's bidirectional model its whole maze, as context_diff reads them), through a linear map into its scores that
starts at zero. Runs ``<task>-router_sense-seed<S>``; the router alone (``--models looped,router``); everything else
is as ``recipe`` (its counts, no loss over the last iterations). The inputs' FLOPs are counted with the router's.

``--models ...,router_config`` (declared 2026-12-07 13:50 UTC, before its first run, after the two maze3 router records
above failed on different seeds: the router trained with the recipe's counts learned no stop on seed 0, the one
trained with ``uniform(8, 16)`` ran against the maze's steps on seed 2) trains both routers per seed: ``router`` with
``--variant-loops`` (the recipe's counts by default) and ``router_config`` with its config's own loops (runs
``<task>-router-seed<S>``, policies ``router, config loops (cap N)``). Both are the one family ``router``: which
training loops a router is used with is a setting chosen on val with its cap, by the rule below, as an exit's
threshold is. The router family then has two trainings per seed where the looped model has one (twice its
training budget, each training the looped model's steps); the record says so. Not in the default ``--models``.

A stop rule that waits for the tokens before each token (declared 2026-12-06 15:10 UTC, before its first run, after
``bench/exit_oracle.py`` showed that a token whose own answer is right is not done: later tokens still read its
state): ``context_diff`` (`loopformer.variants.exits.ContextDiff`) stops a token once latent_diff's test holds for it
and for every token that can reach it (on parity's causal model the tokens before it, so tokens stop in sequence
order; on maze3's bidirectional one its whole row, so each maze stops as a whole), at the thresholds 0.01, 0.003,
0.001, 3e-4 and 1e-4; latent_diff gets 3e-4 and 1e-4 beside its earlier five, since at 0.001 it stopped too early on
every parity seed. context_diff is scored twice: with the library's compaction buffers (shares 1, 2, 4, 8 of the
batch's rows and tokens) and, as its own family ``context_diff/fine``, with exit_oracle's finer ones (1, 1.5, 2, 3,
4, 6, 8, 16; `Plan.compact_shares`), since a row's running tail, which shrinks token by token, fits the coarse
buffers loosely (both declared with the rule, before either ran). ``--models`` (same
date) scores a subset of the three models (the looped model always: the best fixed count is its), for a rescoring
of new policies that leaves the trained variants' earlier rows standing; the JSON records which (``models``). A run
into an --out whose adaptive.json holds rows it would not score again (other models or seeds of its tasks) is refused
before training: it would replace that record (move it aside first).

``--tasks prefix_parity_settle`` (declared 2026-12-06 18:16 UTC, before its first run): think_longer's setting of that
name, the parity recipe with the settling loss (``train.settle``), scored as prefix_parity is; its halting and router
variants would train without the loss (``--models looped`` scores its looped model alone). ``--tasks maze3_settle``
(declared 2026-12-07 02:40 UTC, before its first run): think_longer's setting of that name, maze3's recipe with the
same settling loss, scored as maze3 is (``--models looped``, as above).

Columns per row: exact-match accuracy; mean loops per real token; executed token-iterations per real
token (``computed_loops``: tokens that wait for the batch's slowest count); executed FLOPs per token
(`loopformer.flops`: the forward outside the loops, the executed iterations, for kl / entropy_diff
one read of the logits per executed iteration, and for the router its scores and the stream's write for every
token at every round its bank ran, ``scored_rounds``, `FlopCounter.routing`: counted since 2026-12-05, before the
first run of the per_difficulty router below; the records before it left them out, under 0.1 of an iteration per
round); wall-clock per token at batch 64 (the faster of two
passes after one warm-up batch; all policies of a seed timed in one process); and the Spearman
correlation between each instance's loops and its ``Task.depth``, the instances of all difficulties of
that split pooled.

The bar's time ratios are timed in alternation (declared 2026-12-07 12:15 UTC, before the first run with it, after
``bench/paired_time.py`` found the same fixed count's time moving by a fifth between scorings minutes apart): once a
seed's models are scored, its 2x selections (chosen on val as below) and its best fixed count are timed again on the
2x test set, ``PAIRED_ROUNDS`` rounds of one pass each, in turn, the order reversed every other round; each one's
time is its fastest round, and a selection's time ratio is that over the fixed count's (``paired``, per seed and
family, in the JSON). The rows keep the first timing; the selection's ``recorded_time_ratio`` is the ratio of those.

Selection, per (seed, difficulty): the best fixed count is the one with the best val accuracy (ties: the
fewest loops); per non-fixed family (each exit kind, the learned gate, the router) the setting with the
fewest val FLOPs among those within 1 point of the best fixed count's val accuracy (else its most
accurate on val). Both are reported on test. The bar (#25), at 2x on test for every seed: some family's
selection is within 1 point of the best fixed count's accuracy, at <= 0.6x its FLOPs per token, <= 0.7x
its wall-clock per token, with Spearman >= 0.6.

    python bench/adaptive.py [--tasks prefix_parity,maze3,prefix_parity_settle,maze3_settle,text] [--seeds 3]
                             [--models looped,halting,router] [--json] [--out DIR] [--examples N] [--compact auto|on|off]
                             [--first-seed K] [--variant-loops recipe|config|full|own|sense]
    python bench/adaptive.py --merge A/adaptive.json B/adaptive.json --out C   # seeds of both, one bar

``--tasks text``: ``configs/adaptive/text_ponder.yaml`` (the shipped text model trained with
Poisson-lognormal loops and a state norm), bits per byte vs mean loops per policy on the val split.

JSON: {"tasks": {NAME: {"rows": [{"seed", "difficulty", "split", "policy", "family", "model", "accuracy",
"mean_loops", "computed_loops", "scored_rounds", "flops_per_token", "seconds_per_token", "depth_spearman"}],
"selected": [...], "bar": {...}, "paired": {SEED: {FAMILY: {"policy", "fixed", "seconds", "fixed_seconds",
"time_ratio"}}}, "paired_rounds"}}}; tables (Markdown) and a Pareto plot per task in --out.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import sys
import time
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
from scipy import stats

from loopformer import jsontext
from loopformer.cli.common import COMPACT
from loopformer.config import load_config
from loopformer.data.pipeline import eval_batches
from loopformer.data.sources import build_data
from loopformer.evaluation.evaluator import evaluator_for
from loopformer.evaluation.tables import format_table
from loopformer.flops import FlopCounter
from loopformer.metrics import text_metrics
from loopformer.model.plan import difficulty_rules
from loopformer.runs.restore import restore_params
from loopformer.train.trainer import train
from loopformer.variants.exits import exit_rule

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("think_longer", Path(__file__).with_name("think_longer.py"))
think_longer = importlib.util.module_from_spec(_spec)
sys.modules["think_longer"] = think_longer
_spec.loader.exec_module(think_longer)

# think_longer setting -> configs/adaptive/<name>_*.yaml
TASKS = {"prefix_parity": "parity", "maze3": "maze3", "prefix_parity_settle": "parity", "maze3_settle": "maze3"}
EXITS = {"latent_diff": (0.1, 0.03, 0.01, 0.003, 0.001, 3e-4, 1e-4), "kl": (1e-3, 1e-4, 1e-5),
         "entropy_diff": (1e-3, 1e-4, 1e-5), "context_diff": (0.01, 0.003, 0.001, 3e-4, 1e-4)}
MODELS = ("looped", "halting", "router", "router_config")
DEFAULT_MODELS = MODELS[:3]  # router_config: opt-in (module docstring)
FINE_SHARES = (1, 1.5, 2, 3, 4, 6, 8, 16)  # exit_oracle's finer compaction buffers, for context_diff/fine
QUANTILES = (0.3, 0.5, 0.7, 0.9)
TEXT_FIXED = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32)
TEXT_EXITS = {"latent_diff": (0.1, 0.03, 0.01, 0.003), "kl": (1e-2, 1e-3, 1e-4)}
SPLITS = think_longer.SPLITS  # its held-out sets: settings are chosen on val, reported on test
BATCH = 64  # wall-clock per token is measured at batch 64
TIMINGS = 2  # passes per policy and set; the faster one is reported
PAIRED_ROUNDS = 5  # the bar's time ratios: each 2x selection and its best fixed count, timed in alternation
ROUTER_BACKPROP = 4  # the router's states carry gradient through its last 4 rounds, as the loops' (backprop 4)
# --variant-loops: the looped model's recipe entries the halting and router models train with too, and the tag of
# their runs (<task>-<variant><tag>-seed<S>): recipe (its counts per difficulty), config (their configs' own loops),
# full (the router alone: its counts and its loss at each of the last 4 iterations, as the bank's last 4 rounds)
# own (as full, the loss read at each token's own last 4 rounds: router.window=own), sense (the router alone: recipe,
# the router reading how much the states still move: router.inputs); the third entry: the router's own overrides
# beside the recipe's
VARIANT_RECIPES = {"recipe": (("per_difficulty",), "_per_difficulty", ()), "config": ((), "", ()),
                   "full": (("per_difficulty", "iteration_loss"), "_full", ()),
                   "own": (("per_difficulty", "iteration_loss"), "_own", ("model.stages.0.router.window=own",)),
                   "sense": (("per_difficulty",), "_sense", ("model.stages.0.router.inputs=[change,context]",))}
WINDOWED = ("full", "own")  # the --variant-loops values with the looped model's loss over its last iterations
ROUTER_ONLY = (*WINDOWED, "sense")  # the --variant-loops values that train the router alone (no halting model)
VARIANT_LOOPS = tuple(VARIANT_RECIPES)
# the bar (#25): within 1 point of the best fixed count, <= 0.6x its FLOPs, <= 0.7x its time, Spearman >= 0.6
WITHIN, FLOPS_RATIO, TIME_RATIO, SPEARMAN = 0.01, 0.6, 0.7, 0.6


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def trained(cfg, out: Path):  # noqa: ANN001, ANN201
    """Train (or resume) a run; returns (model, params, data)."""
    t0 = time.time()
    with contextlib.redirect_stdout(sys.stderr):
        train(cfg)
    log(f"[{cfg.run.name}] trained in {time.time() - t0:.0f}s")
    data = build_data(cfg)
    model, params, _ = restore_params(cfg, data=data)
    return model, params, data


def routed(model_name: str) -> bool:
    """Whether ``model_name`` is one of the routers ("router", "router_config"), whose tokens may stop at any round."""
    return model_name in ("router", "router_config")


def family(policy: str) -> str:
    """fixed | auto | latent_diff | kl | entropy_diff | context_diff | learned | router | halting model (its fixed
    count)."""
    return policy.split(":")[0].split(" (")[0].split(",")[0]


def measure(ev, params, batches: list, cfg, vocab: int, loops: dict, exits: dict | None,  # noqa: ANN001
            rules: dict | None = None, compact: bool | None = None, shares: tuple[float, ...] | None = None,
            timings: int = TIMINGS) -> dict:
    """One policy on one held-out set: accuracy, loops, executed work and time per token (the fastest of ``timings``
    passes), per-instance loops; ``compact``: `Plan.compact` (None: the library's default)."""
    ev.examples(params, batches[:1], loops, exits or None, rules, compact, shares)  # compile (and warm) untimed
    seconds = []
    for _ in range(timings):  # the faster of two passes: the machine is shared
        t0 = time.perf_counter()
        ex = ev.examples(params, batches, loops, exits or None, rules, compact, shares)
        seconds.append(time.perf_counter() - t0)
    seconds = min(seconds)
    hist = ex["histogram"]["X"]
    tokens = max(sum(hist.values()), 1)
    seq_len = batches[0]["inputs"].shape[1]
    counter = FlopCounter(cfg.model, vocab, seq_len, causal=cfg.model.causal)
    computed = ex["computed_loops"]["X"]
    flops = counter.forward({"X": computed})
    if exits and any(r.needs_readout for r in exits.values()):
        flops += counter.readout() * computed
    scored = ex["scored_rounds"].get("X", 0.0)  # a router scores every token at every round its bank runs
    flops += counter.routing() * scored
    return {"accuracy": float(ex["correct"].mean()), "mean_loops": sum(int(k) * v for k, v in hist.items()) / tokens,
            "computed_loops": computed, "scored_rounds": scored, "flops_per_token": flops,
            "seconds_per_token": seconds / tokens,
            "instance_loops": ex["loops"]["X"]}


def held_out(task, setting, examples: int, seed: int) -> dict:  # noqa: ANN001
    """{(difficulty, split): batches}: think_longer's val and test sets, in batches of 64."""
    return {(d, s): eval_batches(task, f"{d}/{s}", tuple(rng), examples, BATCH, seed)
            for d, rng in setting.splits.items() for s in SPLITS}


def score_model(model_name: str, cfg, model, params, data, sets: dict, policies: list, seed: int,  # noqa: ANN001
                compact: bool | None = None) -> list[dict]:
    ev = evaluator_for(model)
    rows = []
    for policy, loops, exits, rules, *shares in policies:
        # tokens may stop at different iterations (exits, the difficulty rule, the router): --compact applies
        stops = bool(exits) or bool(rules) or routed(model_name)
        for (difficulty, split), batches in sets.items():
            m = measure(ev, params, batches, cfg, model.vocab_size, loops, exits, rules, compact if stops else None,
                        shares[0] if shares else None)
            rows.append({"seed": seed, "model": model_name, "policy": policy, "family": family(policy),
                         "difficulty": difficulty, "split": split, "cap": loops["X"], **m})
        test = [r for r in rows[-len(sets):] if r["split"] == "test"]
        log(f"  seed {seed} {model_name} {policy}: " + " ".join(
            f"{r['difficulty']} {100 * r['accuracy']:.1f}% @ {r['mean_loops']:.1f} "
            f"({r['flops_per_token'] / 1e6:.2f} MFLOP, {1e6 * r['seconds_per_token']:.0f} us)" for r in test))
    return rows


def spearman(rows: list[dict], depths: dict) -> None:
    """Per (seed, model, policy, split): Spearman of instance loops vs depth, difficulties pooled (None when the
    loops do not vary), written into each row; the per-instance loops are dropped from the rows."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["seed"], r["model"], r["policy"], r["split"]), []).append(r)
    for (seed, _, _, split), rs in groups.items():
        loops = np.concatenate([r["instance_loops"] for r in rs])
        depth = np.concatenate([depths[(seed, r["difficulty"], split)] for r in rs])
        rho = None if np.ptp(loops) == 0 else float(stats.spearmanr(loops, depth).statistic)
        for r in rs:
            r["depth_spearman"] = rho
            del r["instance_loops"]


def recipe_loops(name: str, loops: str = "recipe") -> list[str]:
    """The loop overrides task ``name``'s halting and router models train with: the looped model's
    `VARIANT_RECIPES` entries for ``loops``: recipe (its counts per difficulty), config (none: their configs' own
    loops), full (its counts and its loss at each of the last 4 iterations), own (full, the loss read at each
    token's own last 4 rounds) or sense (its counts, the router reading how much the states move)."""
    if loops not in VARIANT_LOOPS:
        raise ValueError(f"variant loops {loops!r}: choose from {', '.join(VARIANT_LOOPS)}")
    entries, _, own = VARIANT_RECIPES[loops]
    return [o for entry, overrides in think_longer.TASKS[name].recipe if entry in entries for o in overrides] + list(own)


def variant_config(name: str, variant: str, seed: int, out: Path, examples: int, steps: int,  # noqa: ANN201
                   loops: str = "recipe"):
    """The config of task ``name``'s ``variant`` ("halting" | "router") model of ``seed``, trained with
    `recipe_loops` (run ``<name>-<variant>[_per_difficulty|_full|_own|_sense]-seed<S>`` in ``out``)."""
    variant_loops = recipe_loops(name, loops)
    extra = [f"model.stages.0.router.backprop={ROUTER_BACKPROP}"] if variant == "router" else []
    tag = variant + VARIANT_RECIPES[loops][1]
    return load_config(ROOT / "configs" / "adaptive" / f"{TASKS[name]}_{variant}.yaml",
                       [f"seed={seed}", f"run.dir={out}", f"run.name={name}-{tag}-seed{seed}",
                        f"data.eval_examples={examples}", f"train.steps={steps}", "train.eval_every=0",
                        "train.checkpoint_every=100000", *extra, *variant_loops])


def policies(name: str, model_name: str, cfg) -> list[tuple]:  # noqa: ANN001
    """Task ``name``'s policies for model ``model_name`` (module docstring), each (policy, loops, exits, rules[,
    compaction shares]): the looped model's fixed counts, difficulty rule and exits, the halting model's quantiles
    and its fixed count m, the router's caps m, 2m, 4m and 8m (m: the task's training count, 8m the exits' cap)."""
    setting = think_longer.TASKS[name]
    m = setting.train_loops
    cap = 8 * m
    if model_name == "halting":
        return [*((f"learned:q={q:g}", {"X": cap}, {"X": exit_rule("learned", q)}, None) for q in QUANTILES),
                (f"halting model, fixed:{m}", {"X": m}, None, None)]
    if routed(model_name):  # router_config is the family "router" too: its training loops, a setting chosen on val
        label = "router" if model_name == "router" else "router, config loops"
        return [(f"{label} (cap {n})", {"X": n}, None, None) for n in (m, 2 * m, 4 * m, cap)]
    out: list[tuple] = [(f"fixed:{n}", {"X": n}, None, None) for n in setting.counts()]
    rules = difficulty_rules(cfg.model, ["X"])
    if rules:
        out.append(("auto (difficulty rule)", {"X": cap}, None, rules))
    out += [(f"{kind}:{eps:g}", {"X": cap}, {"X": exit_rule(kind, eps)}, None)
            for kind, values in EXITS.items() for eps in values]
    return out + [(f"context_diff/fine:{eps:g}", {"X": cap}, {"X": exit_rule("context_diff", eps)}, None, FINE_SHARES)
                  for eps in EXITS["context_diff"]]  # compacted under --compact on (auto: masked at batch 64)


def policy_spec(name: str, model_name: str, cfg, policy: str) -> tuple:  # noqa: ANN001
    """`policies`' (policy, loops, exits, rules[, shares]) for ``policy`` of ``model_name``."""
    found = [p for p in policies(name, model_name, cfg) if p[0] == policy]
    if not found:
        raise ValueError(f"{name}: the record's policy {policy!r} ({model_name}) is not one adaptive.py scores")
    return found[0]


def run_task(name: str, out: Path, examples: int, seeds: int, steps: int | None = None,
             compact: bool | None = None, models: tuple[str, ...] = DEFAULT_MODELS, first_seed: int = 0,
             loops: str = "recipe") -> dict:
    """Train (or reuse) and score the task's ``models`` over seeds ``first_seed .. first_seed + seeds - 1``."""
    setting = think_longer.TASKS[name]
    cap = 8 * setting.train_loops
    steps = setting.steps[1] if steps is None else steps
    rows, depths, paired = [], {}, {}
    variant_loops = recipe_loops(name, loops)
    for seed in range(first_seed, first_seed + seeds):
        variants = seed_configs(name, out, examples, seed, steps, models, loops)
        cfg = variants.pop("looped")
        model, params, data = trained(cfg, out)
        sets = held_out(data.task, setting, examples, seed)
        for (d, s), bs in sets.items():
            depths[(seed, d, s)] = np.asarray([data.task.depth(x) for b in bs
                                               for x, msk in zip(b["inputs"], b["mask"], strict=True) if msk.sum()])
        rows += score_model("looped", cfg, model, params, data, sets, policies(name, "looped", cfg), seed, compact)
        runs = {"looped": (cfg, model, params)}
        for variant, vcfg in variants.items():
            vmodel, vparams, vdata = trained(vcfg, out)
            rows += score_model(variant, vcfg, vmodel, vparams, vdata, sets, policies(name, variant, vcfg), seed,
                                compact)
            runs[variant] = (vcfg, vmodel, vparams)
        paired[str(seed)] = paired_times(name, [r for r in rows if r["seed"] == seed], runs, sets[("2x", "test")],
                                         compact)
        C.write_out(out / f"adaptive_{name}.rows.partial.json", C.dumps(
            [{k: v for k, v in r.items() if k != "instance_loops"} for r in rows]),
            "in its runs, which a rerun with this --out scores again")
    spearman(rows, depths)
    selected = select(rows, paired)
    return {"rows": rows, "selected": selected, "bar": bar(selected, seeds), "paired": paired,
            "paired_rounds": PAIRED_ROUNDS, "cap": cap, "train_loops": setting.train_loops,
            "variant_loops": variant_loops, "models": list(models),
            "seeds": seeds, "first_seed": first_seed, "steps": steps,
            "depth": {f"{d}/{s}": {"mean": float(np.mean(np.concatenate([v for (_, d2, s2), v in depths.items()
                                                                          if (d2, s2) == (d, s)]))),
                                   "max": int(max(v.max() for (_, d2, s2), v in depths.items() if (d2, s2) == (d, s)))}
                      for d in setting.splits for s in SPLITS}}


NON_FIXED = ("latent_diff", "kl", "entropy_diff", "context_diff", "context_diff/fine", "learned", "router")


def select(rows: list[dict], paired: dict | None = None) -> list[dict]:
    """Per (seed, difficulty): the best fixed count and each non-fixed family's setting, chosen on val (module
    docstring), with their test rows and the test ratios to the best fixed count; at 2x a family's ``time_ratio`` is
    its paired one where ``paired`` (str(seed) -> family -> `paired_times`'s entry) holds it for the same policy, the
    rows' own kept as ``recorded_time_ratio``."""
    at = {(r["seed"], r["difficulty"], r["split"], r["model"], r["policy"]): r for r in rows}
    out = []
    for seed, difficulty in dict.fromkeys((r["seed"], r["difficulty"]) for r in rows):
        val = [r for r in rows if (r["seed"], r["difficulty"], r["split"]) == (seed, difficulty, "val")]
        fixed = [r for r in val if r["model"] == "looped" and r["family"] == "fixed"]
        best = max(r["accuracy"] for r in fixed)
        fx = min((r for r in fixed if r["accuracy"] == best), key=lambda r: r["cap"])
        fx_test = at[(seed, difficulty, "test", "looped", fx["policy"])]
        entry = {"seed": seed, "difficulty": difficulty, "best_fixed": {
            "policy": fx["policy"], "val_accuracy": fx["accuracy"], **_test(fx_test)}, "families": {}}
        for fam in NON_FIXED:
            cands = [r for r in val if r["family"] == fam]
            if not cands:
                continue
            close = [r for r in cands if r["accuracy"] >= best - WITHIN - 1e-9]
            pick = (min(close, key=lambda r: r["flops_per_token"]) if close
                    else max(cands, key=lambda r: (r["accuracy"], -r["flops_per_token"])))
            t = at[(seed, difficulty, "test", pick["model"], pick["policy"])]
            entry["families"][fam] = {"policy": pick["policy"], "val_accuracy": pick["accuracy"], **_test(t),
                                      "flops_ratio": t["flops_per_token"] / fx_test["flops_per_token"],
                                      "time_ratio": t["seconds_per_token"] / fx_test["seconds_per_token"],
                                      "accuracy_gap": t["accuracy"] - fx_test["accuracy"]}
            timed = (paired or {}).get(str(seed), {}).get(fam)
            if difficulty == "2x" and timed and timed["policy"] == pick["policy"] and timed["fixed"] == fx["policy"]:
                f = entry["families"][fam]
                f["recorded_time_ratio"], f["time_ratio"] = f["time_ratio"], timed["time_ratio"]
        out.append(entry)
    return out


def rounds_of(passes: dict[str, Callable[[], dict]], rounds: int) -> dict[str, list[dict]]:
    """Every pass of ``passes`` once per round, ``rounds`` times, in turn, the order reversed every other round (a
    machine that slows down part way weighs on every policy alike): name -> its rounds' results."""
    out: dict[str, list[dict]] = {name: [] for name in passes}
    names = list(passes)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            out[name].append(passes[name]())
    return out


def paired_times(name: str, seed_rows: list[dict], runs: dict, batches: list, compact: bool | None,
                 rounds: int = PAIRED_ROUNDS, check: Callable[[str, str, dict], None] | None = None) -> dict[str, dict]:
    """One seed's 2x selections (chosen on val from ``seed_rows``) and its best fixed count timed in alternation on the
    2x test ``batches`` (`rounds_of`; ``runs``: model name -> (cfg, model, params)): family -> {"policy", "fixed",
    "seconds", "fixed_seconds", "time_ratio"} (fastest round over the fixed count's fastest). ``check(model, policy,
    result)`` sees each pass's result (`bench/paired_time.py` compares it with a stored record's)."""
    entry = next(e for e in select(seed_rows) if e["difficulty"] == "2x")
    model_of = {r["policy"]: r["model"] for r in seed_rows}
    chosen = {"fixed": entry["best_fixed"]["policy"]} | {fam: f["policy"] for fam, f in entry["families"].items()}
    evaluators, passes = {}, {}
    for fam, policy in chosen.items():
        model_name = model_of[policy]
        cfg, model, params = runs[model_name]
        evaluators.setdefault(model_name, evaluator_for(model))
        _, loops, exits, rules, *shares = policy_spec(name, model_name, cfg, policy)
        stops = bool(exits) or bool(rules) or routed(model_name)
        one = functools.partial(measure, evaluators[model_name], params, batches, cfg, model.vocab_size, loops, exits,
                                rules, compact if stops else None, shares[0] if shares else None, timings=1)
        passes[fam] = one if check is None else functools.partial(_checked, one, check, model_name, policy)
    timed = {fam: [t["seconds_per_token"] for t in ts] for fam, ts in rounds_of(passes, rounds).items()}
    log(f"  seed {entry['seed']} paired at 2x: " + ", ".join(
        f"{chosen[fam]} {min(timed[fam]) / min(timed['fixed']):.3f}x" for fam in entry["families"]))
    return {fam: {"policy": chosen[fam], "fixed": chosen["fixed"], "seconds": timed[fam],
                  "fixed_seconds": timed["fixed"], "time_ratio": min(timed[fam]) / min(timed["fixed"])}
            for fam in entry["families"]}


def _checked(one: Callable[[], dict], check: Callable[[str, str, dict], None], model_name: str, policy: str) -> dict:
    got = one()
    check(model_name, policy, got)
    return got


def _test(r: dict) -> dict:
    return {"test_accuracy": r["accuracy"], "test_mean_loops": r["mean_loops"], "test_flops": r["flops_per_token"],
            "test_seconds": r["seconds_per_token"], "test_spearman": r.get("depth_spearman")}  # (after `spearman`)


def passes(f: dict) -> bool:
    return (f["accuracy_gap"] >= -WITHIN - 1e-9 and f["flops_ratio"] <= FLOPS_RATIO and f["time_ratio"] <= TIME_RATIO
            and (f["test_spearman"] or 0.0) >= SPEARMAN)


def bar(selected: list[dict], seeds: int) -> dict:
    """At 2x: per seed the families whose test numbers meet every condition; the bar holds when every seed has one."""
    per_seed = {e["seed"]: [fam for fam, f in e["families"].items() if passes(f)]
                for e in selected if e["difficulty"] == "2x"}
    return {"holds": len(per_seed) == seeds and all(per_seed.values()), "passing": per_seed}


def text_config(out: Path, steps: int | None = None):  # noqa: ANN201
    """The text task's one run (configs/adaptive/text_ponder.yaml at ``steps``; None: the config's)."""
    return load_config(ROOT / "configs" / "adaptive" / "text_ponder.yaml",
                       [f"run.dir={out}", "run.name=text_ponder", "eval.sweep_loops=[]"]
                       + ([f"train.steps={steps}"] if steps is not None else []))


def planned(names: list[str], out: Path, examples: int, seeds: range, steps: int | None,
            models: tuple[str, ...], loops: str = "recipe") -> list:
    """The config of every run a scoring of ``names`` trains (or reuses), as `run_task` and `run_text` build them."""
    cfgs = []
    for name in names:
        if name == "text":
            cfgs.append(text_config(out, steps))
            continue
        task_steps = think_longer.TASKS[name].steps[1] if steps is None else steps
        for seed in seeds:
            cfgs += seed_configs(name, out, examples, seed, task_steps, models, loops).values()
    return cfgs


def seed_configs(name: str, out: Path, examples: int, seed: int, steps: int, models: tuple[str, ...],
                 loops: str = "recipe") -> dict:
    """{"looped": its config, then "halting" / "router" / "router_config" (the router with its config's loops) where
    ``models`` names them}: the runs of one seed of task ``name`` (one builder for `run_task` and `planned`)."""
    cfgs = {"looped": think_longer.config(name, "looped", steps, out, examples, seed)}
    cfgs |= {v: variant_config(name, v, seed, out, examples, steps, loops) for v in ("halting", "router")
             if v in models}
    if "router_config" in models:
        cfgs["router_config"] = variant_config(name, "router", seed, out, examples, steps, "config")
    return cfgs


def run_text(out: Path, steps: int | None = None, compact: bool | None = None) -> dict:
    cfg = text_config(out, steps)
    model, params, data = trained(cfg, out)
    sets = data.eval_sets(["val"])
    bpt = data.bytes_per_token(sets["val"])
    ev = evaluator_for(model)
    rows = []
    policies = [(f"fixed:{n}", {"X": n}, None) for n in TEXT_FIXED]
    policies += [(f"{k}:{eps:g}", {"X": 32}, {"X": exit_rule(k, eps)}) for k, values in TEXT_EXITS.items() for eps in values]
    for name, loops, exits in policies:
        m = ev.evaluate(params, sets["val"], loops, exits=exits, compact=compact if exits else None)
        bpb = text_metrics({"loss": m["loss"]}, bpt)["bits_per_byte"]
        rows.append({"difficulty": "val", "policy": name, "model": "text_ponder", "bits_per_byte": bpb,
                     "mean_loops": m["mean_loops"]["X"], "cap": loops["X"]})
        log(f"  text {name}: bpb {bpb:.4f} @ {m['mean_loops']['X']:.2f} loops")
    return {"rows": rows, "trained": str(cfg.model.circuit("X").distribution())}


def markdown(name: str, result: dict) -> str:
    rows = result["rows"]
    if name == "text":
        body = [[r["policy"], f"{r['bits_per_byte']:.4f}", f"{r['mean_loops']:.2f}"] for r in rows]
        return (f"### text (configs/adaptive/text_ponder.yaml, loops {result['trained']}; val bits per byte)\n\n"
                + format_table(["policy", "bits/byte", "mean loops"], body, markdown=True))
    head = ["seed", "difficulty", "policy (chosen on val)", "test acc %", "mean loops", "MFLOP/token",
            "us/token", "FLOPs ratio", "time ratio", "Spearman", "bar"]
    body = []
    for e in result["selected"]:
        f0 = e["best_fixed"]
        body.append([e["seed"], e["difficulty"], f"best fixed: {f0['policy']}", f"{100 * f0['test_accuracy']:.1f}",
                     f"{f0['test_mean_loops']:.1f}", f"{f0['test_flops'] / 1e6:.2f}", f"{1e6 * f0['test_seconds']:.0f}",
                     "1", "1", "-", ""])
        for f in e["families"].values():
            rho = f["test_spearman"]
            body.append(["", "", f["policy"], f"{100 * f['test_accuracy']:.1f}", f"{f['test_mean_loops']:.1f}",
                         f"{f['test_flops'] / 1e6:.2f}", f"{1e6 * f['test_seconds']:.0f}", f"{f['flops_ratio']:.2f}",
                         f"{f['time_ratio']:.2f}" + (f" ({f['recorded_time_ratio']:.2f})" if "recorded_time_ratio" in f
                                                     else ""), "-" if rho is None else f"{rho:.2f}",
                         ("yes" if passes(f) else "no") if e["difficulty"] == "2x" else ""])
    b = result["bar"]
    verdict = ("the bar holds at 2x on every seed" if b["holds"] else "the bar does not hold at 2x on every seed") + (
        " (" + "; ".join(f"seed {s}: {', '.join(v) or 'none'}" for s, v in b["passing"].items()) + ")")
    paired = any("recorded_time_ratio" in f for e in result["selected"] for f in e["families"].values())
    note = ("\n\nAt 2x the time ratio is timed in alternation with the best fixed count (the first timing's in "
            "brackets)" if paired else "")
    return (f"### {name}: per seed and difficulty, the best fixed count and each family's setting chosen on val, "
            f"on test\n\n" + format_table(head, body, markdown=True) + "\n\n" + verdict + note)


def pareto(name: str, result: dict) -> bytes:
    """PNG: test accuracy vs executed FLOPs per token at each difficulty (the first seed scored), one marker per
    family."""
    from matplotlib.figure import Figure

    first = min(r["seed"] for r in result["rows"])
    rows = [r for r in result["rows"] if r["split"] == "test" and r["seed"] == first]
    splits = list(dict.fromkeys(r["difficulty"] for r in rows))
    fig = Figure(figsize=(4.2 * len(splits), 3.8))
    styles = {"fixed": ("o-", "k"), "auto": ("P", "C5"), "latent_diff": ("s", "C0"), "kl": ("^", "C1"),
              "entropy_diff": ("v", "C2"), "context_diff": ("h", "C6"), "context_diff/fine": ("H", "C7"),
              "learned": ("D", "C3"), "router": ("*", "C4"), "halting model": ("x", "C3")}
    for i, split in enumerate(splits):
        ax = fig.add_subplot(1, len(splits), i + 1)
        for fam, (marker, colour) in styles.items():
            pts = sorted((r["flops_per_token"] / 1e6, 100 * r["accuracy"]) for r in rows
                         if r["difficulty"] == split and r["family"] == fam)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker, color=colour, label=fam, ms=5)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter("{x:g}")
        ax.set(xlabel="executed MFLOP per token", ylabel="exact match (%)", title=f"{name}: {split} (test, seed {first})",
               ylim=(-3, 103))
    fig.axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def rows_replaced(record: Path, names: list[str], models: tuple[str, ...], seeds: int | Collection[int]) -> str | None:
    """Which models and seeds of the tasks ``names`` the record at ``record`` (an --out's adaptive.json) holds that a
    run of ``models`` over ``seeds`` (a count N: seeds 0..N-1) would not score again, as "halting (seeds 0, 1) of
    prefix_parity"; None when none (or no readable record). The run replaces the record: ``--models looped`` into the
    --out of a full run (the rescoring --models is for, where the runs are) dropped its halting and router rows with
    no word (#27 pass 26), as think_longer.py's --first-seed dropped seeds (both read by `_common.rows_dropped`).
    exit_oracle.py's rows (of the looped model, without a model field) are read so too."""
    try:
        tasks = jsontext.loads(record.read_text(encoding="utf-8"))["tasks"] if record.is_file() else {}
        scored = range(seeds) if isinstance(seeds, int) else seeds
        return C.rows_dropped(tasks, [n for n in names if n != "text"],
                              lambda r: r.get("model", "looped") in models and int(r["seed"]) in scored,
                              lambda r: r.get("model", "looped"))
    except (OSError, ValueError, TypeError, KeyError):
        return None  # damaged: nothing in it to lose


_ABSENT = object()  # a record's task without variant_loops (written before the field)


def loops_of(name: str, variant_loops: object) -> str:
    """How a record's ``variant_loops`` (the overrides task ``name``'s variants trained with) reads in a line:
    "--variant-loops recipe" | "--variant-loops config" (a record written before the field, 2026-12-05, trained them
    with their configs'), else "variant_loops VALUE, which no --variant-loops value writes" (null, a string, other
    overrides: a record edited or written by another version was called "--variant-loops config", and a config run
    into its --out was refused for replacing config rows with its own; #27 pass 32)."""
    if variant_loops is _ABSENT:
        return "--variant-loops config"
    match = next((v for v in VARIANT_LOOPS if recipe_loops(name, v) == variant_loops), None)
    return (f"--variant-loops {match}" if match
            else f"variant_loops {C.dumps(variant_loops)}, which no --variant-loops value writes")


def variants_replaced(record: Path, loops: dict[str, list[str]]) -> str | None:
    """Which tasks' halting and router rows the record at ``record`` (an --out's adaptive.json) holds of models trained
    with other loops than ``loops`` (task -> the variant_loops a run or join writes for it), as "halting and router
    (--variant-loops recipe) of maze3"; None when none (or no readable record). Their rows carry the same model names,
    so `rows_replaced` took them for the rows the run scores again, and a --variant-loops config run into the
    --out of a recipe run (both default to bench_runs/adaptive) replaced them with no word (#27 pass 31); the runs
    differ (``*_per_difficulty``) and stay."""
    try:
        tasks = jsontext.loads(record.read_text(encoding="utf-8"))["tasks"] if record.is_file() else {}
        held = []
        for name, mine in loops.items():
            if name not in tasks or name == "text":
                continue
            theirs = tasks[name].get("variant_loops", _ABSENT)
            models = sorted({r["model"] for r in tasks[name]["rows"] if r.get("model") in ("halting", "router")})
            if models and ([] if theirs is _ABSENT else theirs) != mine:
                held.append(f"{' and '.join(models)} ({loops_of(name, theirs)}) of {name}")
        return "; ".join(held) or None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None  # damaged: nothing in it to lose


ROW_FIELDS = (("seed", "a whole number >= 0", lambda v: C.whole_number(v, 0)),
              ("difficulty", "a split's name", lambda v: isinstance(v, str)),
              ("split", "val or test", lambda v: v in SPLITS),
              ("model", "a model's name", lambda v: v in MODELS),
              ("policy", "a policy's name", lambda v: isinstance(v, str)),
              ("family", "a family's name", lambda v: isinstance(v, str)),
              ("accuracy", "a number in [0, 1]", lambda v: C.is_number(v) and 0 <= v <= 1),
              ("mean_loops", "a number >= 0", lambda v: C.is_number(v) and v >= 0),
              ("flops_per_token", "a number > 0", lambda v: C.is_number(v) and v > 0),
              ("seconds_per_token", "a number > 0", lambda v: C.is_number(v) and v > 0),
              ("cap", "a whole number >= 1", lambda v: C.whole_number(v, 1)),
              ("depth_spearman", "a number in [-1, 1] or null",
               lambda v: v is None or C.is_number(v) and -1 <= v <= 1))
# what every record of one --merge must share per task (the settings its rows were scored under)
MUST_MATCH = ("cap", "train_loops", "variant_loops", "models", "steps", "paired_rounds")


def read_record(path: Path) -> dict:
    """The adaptive.json record at ``path`` (``--merge``), its rows checked: OSError when it cannot be read; TypeError
    or ValueError saying what in it no run of this script writes (a NaN, a string for a number, an accuracy past 1)."""
    doc = jsontext.loads(path.read_text(encoding="utf-8"), parse_constant=C.no_json_constant)
    if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), dict) or not doc["tasks"]:
        raise TypeError("the top level is not a JSON object with tasks")
    for name, result in doc["tasks"].items():
        if name == "text":
            raise ValueError("it holds --tasks text (one model of one seed), which has no seeds to join")
        if not isinstance(result, dict) or not isinstance(result.get("rows"), list) or not result["rows"]:
            raise TypeError(f"{name}: no rows")
        for i, row in enumerate(result["rows"]):
            if not isinstance(row, dict):
                raise TypeError(f"{name}: row {i} is not a JSON object")
            bad = next(((f, why) for f, why, ok in ROW_FIELDS if not ok(row.get(f))), None)
            if bad:
                raise ValueError(f"{name}: row {i} has {bad[0]} {row.get(bad[0])!r}, where a run of this script writes "
                                 f"{bad[1]}")
        twice = C.repeated_row(result["rows"], lambda r: (f"seed {r['seed']}", r["model"], r["policy"],
                                                          r["difficulty"], r["split"]))
        if twice:  # (a join counted both in the selection; #27 pass 29)
            raise ValueError(f"{name}: {twice}, where a run of this script scores each once")
        check_paired(name, result)
    if doc.get("compact") not in COMPACT:  # (a join then said "--compact None")
        raise ValueError(f"it has compact {doc.get('compact')!r}, where a run of this script writes one of "
                         f"{', '.join(COMPACT)}")
    return doc


def _timings(value: object) -> bool:
    """Whether a paired entry's ``seconds`` / ``fixed_seconds`` is what `paired_times` writes: a list of numbers > 0."""
    return isinstance(value, list) and bool(value) and all(C.is_number(v) and v > 0 for v in value)


def check_paired(name: str, result: dict) -> None:
    """TypeError or ValueError naming what in task ``name``'s ``paired`` timings or ``paired_rounds`` no run of this
    script writes (`run_task`): a string or list for the section or a seed's entry was an AttributeError traceback in
    ``--merge`` and ``paired_time.py``, and a time ratio of 0 or below passed the bar (#27 pass 35). A record written
    before adaptive.py paired its timings has neither."""
    paired, rounds = result.get("paired"), result.get("paired_rounds")
    if paired is None and rounds is None:
        return
    if not C.whole_number(rounds, 1):
        raise ValueError(f"{name}: it has paired_rounds {rounds!r}, where a run of this script writes a whole number "
                         f">= 1 (with its paired timings)")
    if not isinstance(paired, dict):
        raise TypeError(f"{name}: its paired timings are a {type(paired).__name__}, where a run of this script "
                        f"writes a JSON object of seeds")
    seeds = {str(r["seed"]) for r in result["rows"]}
    for seed, families in paired.items():
        if seed not in seeds:
            raise ValueError(f"{name}: it has paired timings of seed {seed!r}, which its rows do not score")
        if not isinstance(families, dict):
            raise TypeError(f"{name}: seed {seed}'s paired timings are not a JSON object of families")
        for fam, e in families.items():
            where = f"{name}: seed {seed}'s paired timing of {fam!r}"
            if fam not in NON_FIXED:
                raise ValueError(f"{where}: not a family this script times ({', '.join(NON_FIXED)})")
            if not isinstance(e, dict):
                raise TypeError(f"{where} is not a JSON object")
            bad = next((f for f in ("policy", "fixed") if not isinstance(e.get(f), str)), None)
            bad = bad or next((f for f in ("seconds", "fixed_seconds")
                               if not _timings(e.get(f)) or len(e[f]) != rounds), None)
            if bad:
                raise ValueError(f"{where} has {bad} {e.get(bad)!r}, where a run of this script writes "
                                 + ("a policy's name" if bad in ("policy", "fixed")
                                    else f"paired_rounds ({rounds}) numbers > 0"))
            ratio = min(e["seconds"]) / min(e["fixed_seconds"])
            if not C.is_number(e.get("time_ratio")) or abs(e["time_ratio"] - ratio) > 1e-9 * ratio:
                raise ValueError(f"{where} has time_ratio {e.get('time_ratio')!r}, where its seconds give {ratio:.6g} "
                                 f"(the fastest round over the fixed count's fastest)")


def _scored(rows: list[dict], seed: int) -> set[tuple]:
    """What seed ``seed`` of ``rows`` was scored at: (model, policy, difficulty, held-out set)."""
    return {(r["model"], r["policy"], r["difficulty"], r["split"]) for r in rows if r["seed"] == seed}


def merge(docs: dict[str, dict]) -> dict:
    """One record from ``docs`` (name -> adaptive.json document), each scoring disjoint seeds of the same tasks with
    the same settings: a bench run split over processes or sessions (``--first-seed``), e.g. seeds 0-1 in one and
    seed 2 in another. Rows and wall times are joined and each record's ``environment`` is kept under its name; the
    selection and the bar are those of the joined rows (each seed's rows, Spearman included, are its own); the depth
    summary's means are weighted by seeds, its maxima taken over all. Raises ValueError naming the record and the
    field that disagree."""
    if len(docs) < 2:
        raise ValueError("give two records or more to join")
    (first_src, first), *rest = docs.items()
    for src, doc in rest:
        if doc.get("compact") != first.get("compact"):
            raise ValueError(f"{src} was scored with --compact {doc.get('compact')}, {first_src} with --compact "
                             f"{first.get('compact')}: their FLOPs and times do not compare; join records of one")
        if set(doc["tasks"]) != set(first["tasks"]):  # (in any order: --tasks maze3,prefix_parity is the same run)
            raise ValueError(f"{src} scores --tasks {','.join(doc['tasks'])}, {first_src} --tasks "
                             f"{','.join(first['tasks'])}; join records of the same tasks")
    tasks: dict[str, dict] = {}
    for name in first["tasks"]:
        parts = [(src, d["tasks"][name]) for src, d in docs.items()]
        base_seed = min(r["seed"] for r in first["tasks"][name]["rows"])
        base = _scored(first["tasks"][name]["rows"], base_seed)
        seen: dict[int, str] = {}
        for src, part in parts:
            for key in MUST_MATCH:
                if part.get(key) != first["tasks"][name].get(key):
                    raise ValueError(f"{name}: {src} has {key} {part.get(key)!r}, {first_src} has "
                                     f"{first['tasks'][name].get(key)!r}; join records of the same settings")
            for seed in sorted({r["seed"] for r in part["rows"]}):
                if seed in seen:
                    raise ValueError(f"{name}: seed {seed} is in both {seen[seed]} and {src}; join records of disjoint "
                                     f"seeds")
                seen[seed] = src
                mine = _scored(part["rows"], seed)
                if mine != base:  # a policy one seed alone has could decide the bar for it
                    odd = min(mine ^ base, key=str)
                    has, lacks = f"{src} (seed {seed})", f"{first_src} (seed {base_seed})"
                    if odd in base:
                        has, lacks = lacks, has
                    raise ValueError(f"{name}: {has} scores {odd[0]} {odd[1]} on {odd[2]} ({odd[3]}) and {lacks} does "
                                     f"not; every seed must be scored with the same policies (records of other "
                                     f"settings or versions of this script do not join)")
        rows = sorted((r for _, part in parts for r in part["rows"]), key=lambda r: r["seed"])
        weights = [len({r["seed"] for r in part["rows"]}) for _, part in parts]
        paired = {seed: v for _, part in parts for seed, v in (part.get("paired") or {}).items()}
        selected = select(rows, paired)
        merged = {k: first["tasks"][name].get(k) for k in MUST_MATCH}
        merged |= {"rows": rows, "selected": selected, "bar": bar(selected, len(seen)), "paired": paired,
                   "seeds": len(seen),
                   "first_seed": min(seen), "wall_s": sum(part.get("wall_s", 0.0) for _, part in parts)}
        splits = [s for s in first["tasks"][name].get("depth", {}) if all(s in p.get("depth", {}) for _, p in parts)]
        merged["depth"] = {s: {"mean": float(np.average([p["depth"][s]["mean"] for _, p in parts], weights=weights)),
                               "max": max(p["depth"][s]["max"] for _, p in parts)} for s in splits}
        tasks[name] = merged
    return {"tasks": tasks, "compact": first.get("compact"),
            "wall_s": sum(d.get("wall_s", 0.0) for d in docs.values()), "merged_from": list(docs),
            "environment": {src: d.get("environment") for src, d in docs.items()}}


def main() -> int:
    p = C.ArgumentParser(description=C.about(__doc__))
    p.add_argument("--tasks", default="prefix_parity,maze3", help=f"comma-separated: {', '.join([*TASKS, 'text'])}")
    p.add_argument("--out", type=C.out_folder, default="bench_runs/adaptive", help="run directories and results")
    p.add_argument("--examples", type=int, help="eval examples per held-out set of a task (default 256, "
                   "think_longer's)")
    p.add_argument("--seeds", type=int, help="seeds 0..N-1 of every task's models (default 3; >= 1)")
    p.add_argument("--first-seed", type=int, help="with --seeds N, seeds K..K+N-1 instead of 0..N-1: a run split "
                   "over processes or sessions, each part into its own --out, then joined with --merge")
    p.add_argument("--merge", nargs="+", type=Path, metavar="RECORD", help="train and score nothing: join "
                   "adaptive.json records of the same tasks and settings and disjoint seeds into --out's record, "
                   "tables and bar (the rows of every seed together; nothing is rescored)")
    p.add_argument("--steps", type=int, help="training steps of every model, >= 1 (default: think_longer's / the "
                   "config's; a smaller number is a smoke run of the pipeline, not results)")
    p.add_argument("--models",
                   help="comma-separated models to train and score per seed: looped (always), halting, router, "
                        "router_config (the router trained with its config's loops whatever --variant-loops says; "
                        "default looped,halting,router)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--variant-loops", choices=VARIANT_LOOPS, help="the loops the halting and router models train "
                   "with: recipe (default: the looped model's per-difficulty entry), config (their configs' own, "
                   "uniform(8, 16)), full (the router alone: the per-difficulty entry and the looped model's loss at "
                   "each of its last 4 iterations, read at the bank's last 4 rounds), own (full, read at each "
                   "token's own last 4 rounds) or sense (the router alone: recipe, reading how much the states move)")
    p.add_argument("--compact", choices=tuple(COMPACT), default="auto",
                   help="how policies whose tokens stop at different iterations run: auto (default, the library's: "
                        "masked below 4,096 tokens a batch), on (compacted: only the running tokens), off (masked)")
    args = p.parse_args()
    # every flag before any training: --seeds 0 crashed after nothing trained (an empty concatenate), --examples 0
    # was the library's traceback, --steps 0 trained each model its default steps
    C.at_least(p, args, {"--seeds": 1, "--examples": 1, "--steps": 1, "--first-seed": 0})
    C.at_most(p, args, {"--seeds": C.SEEDS, "--examples": C.EXAMPLES, "--steps": C.STEPS})
    if args.merge:
        return merge_main(p, args)
    names = args.tasks.split(",")
    unknown = [n for n in names if n not in (*TASKS, "text")]  # all of them: a typo in the last was refused
    if unknown:  # after the others had trained (hours)
        p.error(f"unknown task {unknown[0]!r} in --tasks; choose from {', '.join([*TASKS, 'text'])}")
    C.once(p, "--tasks", names)  # trained once, scored and reported twice
    models = DEFAULT_MODELS if args.models is None else tuple(args.models.split(","))
    if [m for m in models if m not in MODELS] or "looped" not in models:
        p.error(f"--models {args.models}: give a comma-separated list of {', '.join(MODELS)} that includes looped "
                f"(the best fixed count every policy is compared with is the looped model's)")
    C.once(p, "--models", list(models))
    given = [f for f in ("--seeds", "--first-seed", "--examples", "--models", "--variant-loops")
             if getattr(args, f[2:].replace("-", "_")) is not None]
    if names == ["text"] and given:  # one model of one seed, scored on its config's val windows: accepted and ignored
        p.error(f"--tasks text reads none of {' and '.join(given)} (one model, scored on the val windows of "
                f"configs/adaptive/text_ponder.yaml); drop {'them' if len(given) > 1 else 'it'}")
    if args.variant_loops and not {"halting", "router"} & set(models):
        p.error(f"--variant-loops sets how the halting and router models train, and --models {','.join(models)} "
                f"trains neither" + (" (router_config trains with its config's loops whatever it says)"
                                     if "router_config" in models else "")
                + "; drop it, or add halting or router to --models")
    if args.variant_loops in WINDOWED and "halting" in models:
        p.error(f"--variant-loops {args.variant_loops} trains the router with the looped model's loss at each of its "
                "last iterations, which a halting head replaces with its own; drop halting from --models (e.g. "
                "--models looped,router)")
    if args.variant_loops in ROUTER_ONLY and "halting" in models:
        p.error(f"--variant-loops {args.variant_loops} sets the router's inputs, and a halting model has no router; "
                "drop halting from --models (e.g. --models looped,router)")
    same = [n for n in names if n != "text" and recipe_loops(n, "full") == recipe_loops(n, "recipe")]
    if args.variant_loops in WINDOWED and same:  # full trained the recipe's router again, as a "_full" run and record
        # whose variant_loops equal the recipe's (#27 pass 41); own's window would be refused with no loss to read
        p.error(f"--variant-loops {args.variant_loops} adds the looped model's loss at each of its last iterations, "
                f"which the recipe of {', '.join(same)} does not use, so its router would train as --variant-loops "
                f"recipe trains it; drop {'it' if len(same) == 1 else 'them'} from --tasks, or use --variant-loops "
                f"recipe")
    if args.variant_loops == "config" and {"router", "router_config"} <= set(models):
        p.error("--models router,router_config with --variant-loops config trains one router twice (router_config is "
                "the router with its config's loops); drop router_config, or --variant-loops config")
    args.seeds = 3 if args.seeds is None else args.seeds
    first_seed = args.first_seed or 0
    if first_seed + args.seeds > C.SEEDS[0]:
        p.error(f"--first-seed {first_seed} with --seeds {args.seeds}: seeds up to {C.SEEDS[0] - 1} only")
    seeds = range(first_seed, first_seed + args.seeds)
    args.examples = 256 if args.examples is None else args.examples
    out = Path(args.out)
    C.tasks_replaced(p, out / "adaptive.json", names)
    kept = rows_replaced(out / "adaptive.json", names, models, seeds)
    if kept:
        p.error(f"--out {out} holds an adaptive.json with rows of {kept}, which this run (--models "
                f"{','.join(models)}, seeds {seeds[0]}..{seeds[-1]}) does not score, and its record replaces that one; "
                f"move {out / 'adaptive.json'} aside (then join the two with --merge), or choose another --out")
    loops = args.variant_loops or "recipe"
    held = variants_replaced(out / "adaptive.json", {n: recipe_loops(n, loops) for n in names if n != "text"})
    if held:
        p.error(f"--out {out} holds an adaptive.json with rows of {held}, models other than the ones this run "
                f"(--variant-loops {loops}) scores under those names, and its record replaces that one; move "
                f"{out / 'adaptive.json'} aside (the runs in --out stay, and are reused), or choose another --out")
    # a run --out holds trained past --steps was scored as it is, under a record of --steps (#27 pass 30)
    C.trained_past(p, planned(names, out, args.examples, seeds, args.steps, models, loops),
                   f"--steps {args.steps}" if args.steps is not None else "each task's full steps, without --steps")
    out.mkdir(parents=True, exist_ok=True)
    results, t0 = {}, time.time()
    for name in names:
        t = time.time()
        compact = COMPACT[args.compact]
        results[name] = (run_text(out, args.steps, compact) if name == "text"
                         else run_task(name, out, args.examples, args.seeds, args.steps, compact, models, first_seed,
                                       loops))
        results[name]["wall_s"] = time.time() - t
        if name != "text":
            C.write_out(out / f"adaptive_{name}.png", pareto(name, results[name]), "not drawn (the tables follow)")
    doc = {"tasks": results, "compact": args.compact, "wall_s": time.time() - t0}
    C.report(out, "adaptive", doc, "\n\n".join(markdown(n, r) for n, r in results.items()), args.json)
    return 0


def merge_main(p: C.ArgumentParser, args) -> int:  # noqa: ANN001
    """``--merge A B ... --out C``: C's adaptive.{json,md} and plots from the joined records (`merge`)."""
    given = [f for f in ("--tasks", "--seeds", "--first-seed", "--models", "--examples", "--steps", "--compact",
                         "--variant-loops")
             if f[2:].replace("-", "_") in p.given]  # at its default value too (`--compact auto`)
    if given:  # the records say what they scored; these were accepted and ignored
        p.error(f"--merge reads none of {' and '.join(given)} (the records say what they scored); drop "
                f"{'them' if len(given) > 1 else 'it'}")
    out = Path(args.out)
    docs = C.merge_records(p, args.merge, out / "adaptive.json", read_record)
    try:
        doc = merge(docs)
        text = "\n\n".join(markdown(n, r) for n, r in doc["tasks"].items())
    except ValueError as e:
        p.error(f"--merge: {e}")
    except (KeyError, TypeError, IndexError, ZeroDivisionError) as e:
        p.error(f"--merge: a record is not a result of this script ({type(e).__name__}: {e})")
    # --out's own record is replaced: one holding seeds (or models) the joined record lacks, e.g. the full run the
    # parts were meant to join, was lost with no word, which a scoring run into that --out refuses (#27 pass 29)
    models = tuple({m for t in doc["tasks"].values() for m in t["models"]})
    C.tasks_replaced(p, out / "adaptive.json", list(doc["tasks"]))
    kept = rows_replaced(out / "adaptive.json", list(doc["tasks"]), models,
                         {r["seed"] for t in doc["tasks"].values() for r in t["rows"]})
    if kept:
        p.error(f"--out {out} holds an adaptive.json with rows of {kept}, which the joined record does not hold, and "
                f"the joined record replaces that one; add it to --merge, move it aside, or choose another --out")
    held = variants_replaced(out / "adaptive.json", {n: t["variant_loops"] for n, t in doc["tasks"].items()})
    if held:
        p.error(f"--out {out} holds an adaptive.json with rows of {held}, models other than the joined record's under "
                f"those names, and the joined record replaces that one; move it aside, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    for name, result in doc["tasks"].items():
        C.write_out(out / f"adaptive_{name}.png", pareto(name, result), "not drawn (the tables follow)")
    C.report(out, "adaptive", doc, text, args.json)
    return 0


if __name__ == "__main__":
    C.run_main(main)
