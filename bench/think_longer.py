"""The "think longer" benchmark: does a looped model trained on easy instances solve harder ones
when given more loops, and how does it compare with equal-parameter and equal-compute baselines?

For each task: train (1) a looped model (one circuit X, loop count sampled from the task's
distribution with mean m; m = 4 by default, 12 for prefix_parity and maze), (2) the same model with loops fixed
at 1 (equal parameters), (3) a non-looped model whose circuit has depth m = the looped model's mean
effective depth (equal training compute), all with the same steps and batch. Evaluate at the training
difficulty and at 2x and 4x harder instances; the looped model at loop counts 1 .. 8m. Each table
ends with the bar's verdict at 2x (gain of the best count >= m over m, margin over both baselines).

    python bench/think_longer.py [--quick] [--json] [--tasks maze,p_hop] [--seeds N] [--models looped] [--out DIR]
    python bench/think_longer.py --floor --tasks NAME   # what a setting gives away, before training on it
    python bench/think_longer.py --tasks NAME --seeds 2 --first-seed 1 --out B   # seeds 1-2 only, e.g. in a second session
    python bench/think_longer.py --merge A/think_longer.json B/think_longer.json --out C   # seeds 0-2, one verdict

Honest selection: every difficulty has two held-out sets from the same generator, "val" and "test"
(different examples). The loop count reported for a difficulty is the one with the best validation
accuracy (ties: the fewest loops), scored on test ("selected"); beside it, a fixed rule chosen before any
run: the training mean scaled by the difficulty, m * hi / hi_train ("rule": m, 2m and 4m at train, 2x and
4x). The sweep tables show test accuracy at every count. Each difficulty also reports what it gives away
without a model ("floor": a constant answer's test accuracy and the share of fixed answer positions).

Prints Markdown tables (and with --json one JSON document on stdout, everything else on stderr):
{"tasks": {NAME: {"train_loops": int, "loops": str, "recipe": {...}, "verdict": {...},
                  "rows": [{"difficulty", "split", "model", "loops", "accuracy", "seed", "wall_s", "tokens_seen"}],
                  "selected": [{"seed", "model", "difficulty", "loops", "val_accuracy", "test_accuracy"}],
                  "rule": [{"seed", "model", "difficulty", "loops", "test_accuracy"}],
                  "floor": {DIFFICULTY: {"constant_accuracy", "fixed_positions"}}}}}
("split": "val" | "test"). With --seeds N every model is trained N times (seeds 0..N-1); tables show the
mean (min–max), the verdict the mean and the minimum over seeds. --models trains a subset (e.g. only the
looped model over more seeds: the gain is then reported, the bar not judged). --ablate trains, beside the
looped model, one model per recipe entry with that entry switched off ("looped-no-NAME").
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import sys
import time
from collections.abc import Collection
from pathlib import Path

import numpy as np

from loopformer import jsontext
from loopformer.config import Config, LoopDistribution, load_config
from loopformer.data.pipeline import eval_batches
from loopformer.data.sources import build_data
from loopformer.data.tasks import make_task
from loopformer.evaluation.evaluator import evaluator_for
from loopformer.evaluation.tables import format_table
from loopformer.runs.layout import RunDir, not_a_file
from loopformer.runs.restore import restore_params
from loopformer.train.trainer import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BASE = Path(__file__).resolve().parent.parent / "configs" / "bench" / "think_longer.yaml"
X = "model.stages.0.circuits.X"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One task of the suite: data, difficulties, and the looped model's loop schedule."""

    task_args: dict
    train: list[int]  # [lo, hi] training difficulty
    splits: dict[str, list[int]]  # "train" / "2x" / "4x" -> [lo, hi]
    loops: str = "uniform(2, 6)"  # training loop-count distribution of circuit X
    train_loops: int = 4  # its mean: the eval default, the equal-compute depth, the sweep's unit
    overrides: tuple[str, ...] = ()  # any other config changes (all three models)
    steps: tuple[int, int] = (120, 1500)  # training steps per model: --quick, full
    task: str | None = None  # the task it runs (default: the setting's own name)
    # The looped model's training recipe (docs/recipes.md), name -> overrides; the baselines train without
    # it (each entry needs loops that vary). Declared before the setting's first run with it.
    recipe: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def rule(self, split: str) -> int:
        """The fixed rule's count at ``split``: the training mean scaled by the hardest difficulty,
        round(m * hi / hi_train) (m, 2m, 4m at train, 2x, 4x)."""
        return max(1, round(self.train_loops * self.splits[split][1] / self.train[1]))

    def counts(self, quick: bool = False) -> list[int]:
        """Loop counts of the looped model's sweep: 1 .. 8x the training mean. ``quick`` leaves out 3x
        and 6x, which with 8x cost most of the sweep (its time grows with the count)."""
        m = self.train_loops
        return sorted({1, 2, 4, m // 2 or 1, m, 3 * m // 2, 2 * m, 4 * m, 8 * m} | (set() if quick else {3 * m, 6 * m}))


def maze_recipe(rows: int) -> tuple[str, ...]:
    """The maze settings' overrides: the prefix_parity recipe with bidirectional attention, per-room
    prelude/coda, and X's window rows + 2, which reaches the neighbouring columns (a room's same-row
    neighbours are rows + 1 tokens away)."""
    return (f"{X}.window={rows + 2}", "model.window=1", "model.causal=false", f"{X}.state_norm=true",
            "model.norm=pre", f"{X}.backprop=4", "train.lr=2e-3")


# Each follows a published setting scaled to a 2-core CPU (see docs/think_longer.md).
TASKS = {
    # DeepThinking's prefix sums (aligned labels, exact match), as in configs/quickstart.yaml: local
    # attention everywhere, so the loop is the only way information crosses the string; truncated
    # backprop (last 4 of n ~ U{8..16} iterations) plays the part of their progressive loss.
    # Recipe (#24, declared before its first run here; chosen on the quickstart's seeds, docs/recipes.md):
    # loops per difficulty, 2n + 4 for an n-bit string (6..20, mean 13; the baselines keep the mean 12).
    "prefix_parity": Setting({}, [1, 8], {"train": [1, 8], "2x": [16, 16], "4x": [32, 32]},
                             loops="uniform(8, 16)", train_loops=12, steps=(120, 1500),
                             overrides=(f"{X}.window=2", "model.window=2", f"{X}.state_norm=true", "model.norm=pre",
                                        f"{X}.backprop=4", "train.lr=2e-3"),
                             recipe=(("per_difficulty", (f"{X}.loops=per_difficulty(2, 4)", f"{X}.max_loops=20")),)),
    # DeepThinking's mazes as graph reachability: 2-row strip mazes (a spanning tree with one passage
    # closed), bidirectional local attention (a path may run right to left; window 4 reaches the
    # neighbouring columns), otherwise the prefix_parity recipe. d columns: train 1-8, 2x 16, 4x 32.
    "maze": (MAZE := Setting({"rows": 2}, [1, 8], {"train": [1, 8], "2x": [16, 16], "4x": [32, 32]},
                             loops="uniform(8, 16)", train_loops=12, steps=(120, 1500),
                             overrides=maze_recipe(2))),
    # The same mazes entered from the left wall: the start is in the first column and keeps at least
    # half the rooms, so the passages to the farthest reachable room grow with the columns: 55 % of
    # the 2x mazes need more than the training mean of 12 (16 % with a start anywhere). Everything
    # else is the maze setting; the setting was fixed before its first run.
    "maze_entrance": dataclasses.replace(MAZE, task_args={"rows": 2, "entrance": True}, task="maze"),
    # ... and with an exit: the start's region also holds a room of the last column, so it spans all d
    # columns and every maze needs >= d - 1 loops (X moves reachability at most one column per loop):
    # every 2x maze needs more than 12. Declared after maze_entrance's run (2x: 84.0 % at 12 loops,
    # gain +16.0; its 2x mazes span 7-13 columns), before its own first run; the recipe is unchanged.
    # Its run found a shortcut: the rooms cut off are few, and the model solves 4x mazes with 4-12
    # loops by labelling that pocket NO and the rest YES (docs/think_longer.md), so it is not in the suite.
    "maze_exit": dataclasses.replace(MAZE, task_args={"rows": 2, "entrance": True, "exit": True}, task="maze"),
    # 3-row mazes entered from the left wall (the maze_entrance rule), declared after the three 2-row
    # designs' runs and before its own first run: in 2-row strips the start's region spans too few
    # columns (55 % of the 2x mazes need more than 12 steps); with 3 rows the passages wind more, so
    # the generator alone (before any model saw it) gives 84 % of the 2x mazes > 12 steps and 29 % > 16,
    # while 95 % of training mazes need <= 12. The maze recipe for 3 rows (X's window 5).
    # Recipe (#24), declared 2026-12-04 before its first run with it: loops per difficulty 2d + 4 for d
    # columns (6..20 in training, 36 at 2x, 68 at 4x), the prefix_parity recipe; the generator's steps per
    # maze (Task.depth) reach 14 in training, 25 at 2x and 44 at 4x, all within the rule.
    # Added to the recipe 2026-12-04 17:10 UTC, before its first run with it (the record before it,
    # think_longer_maze3_recipe_3seeds_cpu, left seed 0 at 82.8 % at 2x): the loss at each of X's last 4
    # iterations (train.iteration_loss, as the quickstart, where it made the failing seed extrapolate).
    "maze3": dataclasses.replace(MAZE, task_args={"rows": 3, "entrance": True}, task="maze",
                                 overrides=maze_recipe(3),
                                 recipe=(("per_difficulty", (f"{X}.loops=per_difficulty(2, 4)", f"{X}.max_loops=20")),
                                         ("iteration_loss", ("train.iteration_loss=4",
                                                             "train.iteration_loss_circuit=X")))),
    # Global-lookup tasks (full attention, loops U{2..6}). None learned its task in 1,500 steps
    # (docs/think_longer.md); the suite gives them 1,000 so that it fits in an hour on 2 cores.
    "pointer_chase": Setting({"num_nodes": 20, "num_symbols": 20, "edge_tokens": True}, [1, 4],
                             {"train": [1, 4], "2x": [8, 8], "4x": [16, 16]}, steps=(60, 1000)),
    "p_hop": Setting({"length": 48, "alphabet": 4}, [1, 4], {"train": [1, 4], "2x": [8, 8], "4x": [16, 16]},
                     steps=(60, 1000)),
    # Addition as the anchors measure it (Fan et al., McLeish et al.): trained on up to 8 digits, tested at
    # 16 (2x) and 32 (4x). With RoPE and U{2..6} loops it learned nothing in 1,000 steps (the suite's run).
    # Declared 2026-12-04 before its first run, after one pilot (seed 99, 1,000 steps, 29 % on the training
    # lengths and still learning): abacus places with a random offset up to 32 for every model (McLeish et
    # al.'s embedding; a position scheme, not a loop recipe, so the baselines get it too), 2,500 steps, loops
    # U{6..11} (mean 8; the baselines' unit) and for the looped model loops per difficulty d + 4 (5..12).
    "addition": Setting({}, [1, 8], {"train": [1, 8], "2x": [16, 16], "4x": [32, 32]}, loops="uniform(6, 11)",
                        train_loops=8, steps=(60, 2500), overrides=("model.position=abacus", "model.position_offset=32"),
                        recipe=(("per_difficulty", (f"{X}.loops=per_difficulty(1, 4)", f"{X}.max_loops=12")),)),
}
# The addition setting with four times the steps (10,000), declared 2026-12-04 before its first run, for the
# one GPU session that had a machine: at 2,500 steps the looped model had not learned the training lengths
# (16.4 %, flat in loop count) while equal_params reached 75.4 %. Nothing else changes.
TASKS["addition_long"] = dataclasses.replace(TASKS["addition"], steps=(60, 10000), task="addition")
# Addition with every answer digit asked for in one pass (labels at answer slots, as parity's are), declared
# 2026-12-04 before its first run, after addition_long showed the next-token form never needs the loop (the
# carry into a place follows from the previous answer digit, docs/think_longer.md). Everything else is the
# addition setting: abacus places with offsets up to 32 for every model, 2,500 steps, U{6..11}, the looped
# model's loops per difficulty d + 4.
TASKS["addition_aligned"] = dataclasses.replace(TASKS["addition"], task_args={"aligned": True}, task="addition")
# Addition whose difficulty is the carry chain, declared 2026-12-04 before its first run, after addition_aligned
# showed that random pairs' chains stay short (at most 5) and that its 2x failure was reading unseen places:
# every operand has 32 digits (every place is seen in training), an example of difficulty d has its longest
# carry chain exactly d (`data.task_args.width`), trained on chains 1-8, tested at 16 and 32. Abacus places
# without offsets (no place is new at test time); 2,500 steps; the parity recipe for the looped model (loops
# per difficulty 2d + 4, max_loops 20; the baselines' unit is U{8..16}'s mean, 12).
TASKS["addition_chain"] = Setting({"aligned": True, "width": 32}, [1, 8], {"train": [1, 8], "2x": [16, 16], "4x": [32, 32]},
                                  loops="uniform(8, 16)", train_loops=12, steps=(60, 2500), task="addition",
                                  overrides=("model.position=abacus",),
                                  recipe=(("per_difficulty", (f"{X}.loops=per_difficulty(2, 4)", f"{X}.max_loops=20")),))
# Addition whose carries must travel, declared 2026-12-05 before its first run, after addition_chain (seed 0) showed
# neither model reading 32-digit operands in 2,500 steps and its 4x split fixed by the chain: the paired form (one
# token per place holding both digits, the answer's digits labelled at their places, `data.task_args.paired`), so
# reading is local as in prefix_parity, and `runs`: an example of difficulty d holds a run of d places summing to 9
# after a place that generates a carry (answer digits 0) and one after a place that does not (9s), in random order
# with two random places (2d + 6 places), so a run's digits depend on a place d + 1 back and look alike from
# inside. Trained on runs of 1-8, tested at 16 and 32. The prefix_parity model (window 2 everywhere, state norm,
# truncated backprop, lr 2e-3, 1,500 steps, RoPE) and maze3's recipe for the looped model: loops per difficulty
# 2d + 4 and the loss at each of X's last 4 iterations.
TASKS["addition_runs"] = dataclasses.replace(
    TASKS["prefix_parity"], task_args={"paired": True, "runs": True}, task="addition",
    recipe=(("per_difficulty", (f"{X}.loops=per_difficulty(2, 4)", f"{X}.max_loops=20")),
            ("iteration_loss", ("train.iteration_loss=4", "train.iteration_loss_circuit=X"))))
# Addition as the anchors write it (separate operands, next-token answers), declared 2026-12-05 before its first
# run, after two pilots (seed 99 looped and seed 0 equal_params, the addition setting with model.position=coupled
# instead of abacus + offsets, unpadded operands): places 1..d of the sum right 94-100 % of the time at 12 and 16
# digits (abacus: about chance past place 8 in the same budget), but the final carry digit, a place no operand
# has, at 12-14 %. So: position coupling (Cho et al. 2024: RoPE over each digit's place, `model.position=coupled`)
# for every model, and operands zero-padded to the sum's length as Cho et al. and Fan et al. write them
# (`data.task_args.pad`). Everything else is the addition setting (2,500 steps, U{6..11}, the looped model's
# loops d + 4): trained on 1-8 digits, tested at 16 and 32.
TASKS["addition_coupled"] = dataclasses.replace(TASKS["addition"], task_args={"pad": True},
                                                overrides=("model.position=coupled",), task="addition")
# Addition as the anchors write it, every answer digit in one pass, declared 2026-12-05 before its first run, after
# addition_coupled showed coupled positions reading places 3..d+1 of 16-digit sums right 99-100 % of the time but the
# first digits failing (their queries, at `=` and the first answer digit, pick places out of keys at place distances
# never seen): the aligned form (a slot per answer digit, each at its own place, so every query reads its own place
# and the one below, as Fan et al.'s full-output form does) with coupled positions and padded operands. Everything
# else is the addition setting (2,500 steps, U{6..11}, the looped model's loops d + 4): trained on 1-8 digits,
# tested at 16 and 32.
TASKS["addition_aligned_coupled"] = dataclasses.replace(TASKS["addition"], task_args={"aligned": True, "pad": True},
                                                        overrides=("model.position=coupled",), task="addition")
# Addition as the anchors write it, every answer digit in one pass, with attention local in digit places, declared
# 2026-12-06 05:56 UTC before its first run (no pilot), after addition_aligned_coupled (seed 0: 27.0 % looped, 78.5 %
# one loop at 2x) and addition_coupled (places 3.. right at 16 digits, the first places wrong): there every query still
# meets keys at place distances never seen in training (up to 16 at 2x, against 8). `model.place_window=1` for every
# model (a position scheme, like coupling): a token attends only to tokens at most one digit place from its own, so
# an answer slot at place i sees a_{i-1..i+1}, b_{i-1..i+1} and the slots before it at places i - 1 and i, the same
# keys at the same distances at every length; the carry must then cross places one per attention layer, so a chain
# of k places needs about k layers (the looped model's loops d + 4 give d + 6 layers). Everything else is
# addition_aligned_coupled (coupled positions, padded operands, 2,500 steps, U{6..11}, loops d + 4 for the looped
# model); trained on 1-8 digits, tested at 16 and 32.
TASKS["addition_place_window"] = dataclasses.replace(TASKS["addition_aligned_coupled"],
                                                     overrides=("model.position=coupled", "model.place_window=1"))
# Addition whose carries travel, written as the anchors write it, declared 2026-12-06 06:31 UTC before its first run,
# after addition_place_window's seed 0 (every model near 100 % at 2x: the one-loop model 98.0 %, so random pairs'
# short carry chains leave the loop nothing to do once reading is local): addition_runs' examples (runs of places
# summing to 9 as the difficulty, trained on runs of 1-8, tested at 16 and 32) with separate operands, padded, every
# answer digit at its slot (`data.task_args: {aligned, pad, runs}`), and addition_place_window's reading (coupled
# positions, attention within one digit place) in place of the token window, for every model. The rest is
# addition_runs: the prefix_parity model (state norm, gradient through X's last 4 iterations, lr 2e-3, 1,500 steps,
# U{8..16}) and the looped model's recipe, loops per difficulty 2d + 4 and the loss at each of X's last 4 iterations.
TASKS["addition_runs_coupled"] = dataclasses.replace(
    TASKS["addition_runs"], task_args={"aligned": True, "pad": True, "runs": True},
    overrides=(f"{X}.state_norm=true", "model.norm=pre", f"{X}.backprop=4", "train.lr=2e-3", "model.position=coupled",
               "model.place_window=1"))
# What `python bench/think_longer.py` runs: one setting per task of the issue (and pointer chasing).
# The graph task is maze3, whose steps grow fastest with the maze of the designs without a known
# shortcut (chosen when it was declared, before its first run); maze, maze_entrance and maze_exit,
# the 2-row designs, are kept to reproduce their results (--tasks).
# prefix_parity with the loss at each of X's last 4 iterations added to its recipe (train.iteration_loss, as the
# quickstart and maze3 have it). Declared 2026-12-06 16:20 UTC, before its first run, after prefix_parity's looped
# model trained under jax 0.10.2 failed to extrapolate on seed 0 (10.2 % at 2x; docs/adaptive.md) where the record
# trained under another install solved 100 % on every seed: is the recipe with the iteration loss robust to that?
TASKS["prefix_parity_iteration_loss"] = dataclasses.replace(
    TASKS["prefix_parity"], task="prefix_parity",
    recipe=(*TASKS["prefix_parity"].recipe,
            ("iteration_loss", ("train.iteration_loss=4", "train.iteration_loss_circuit=X"))))

# prefix_parity with the settling loss added to its recipe (train.settle=1 at train.settle_loops=40, twice X's
# max_loops: X's state must be at rest over iteration 40 of a second pass on the training batch). Declared
# 2026-12-06 18:16 UTC, before its first run, after a diagnosis of the three jax 0.10.2 looped models
# (/work/bench_runs/settle_probe.py, not a record): seed 1's X cycles already on training strings (the squared
# relative change over iteration 20 is 0.1 at position 2, the mean 2e-2, at 20, 36, 40 and 72 loops alike), where
# seed 2's comes to rest (1e-14) and context_diff saves compute. The weight makes such a cycle cost about as much as
# the converged CE (~0.01-0.02); a 200-step pilot (training loss only, no evaluation) showed the term below 5e-5
# while nothing cycles, so it changes nothing then.
TASKS["prefix_parity_settle"] = dataclasses.replace(
    TASKS["prefix_parity"], task="prefix_parity",
    recipe=(*TASKS["prefix_parity"].recipe, ("settle", ("train.settle=1", "train.settle_loops=40"))))

# maze3 with the settling loss added to its recipe (train.settle=1 at train.settle_loops=40, twice X's max_loops, as
# prefix_parity_settle has it). Declared 2026-12-07 02:40 UTC, before its first run, after the maze3 context_diff
# record (bench/results/adaptive_context_diff_maze3_1core_cpu): at 2x a maze needs 15.6 of the generator's steps on
# average (at most 24) and the best fixed counts chosen on val were 36-96, but context_diff, which on the
# bidirectional model waits for a whole maze's states to settle, stopped at 34-54 loops per token, near those counts:
# the states keep moving after the answer is found. On parity the settling loss brought them to rest and context_diff
# to 0.49-0.59x the best fixed count's FLOPs. A 40-step probe (training only, seed 99, one core) measured its step
# at 1.8x maze3's (0.93 against 0.52 s).
TASKS["maze3_settle"] = dataclasses.replace(
    TASKS["maze3"], task="maze",
    recipe=(*TASKS["maze3"].recipe, ("settle", ("train.settle=1", "train.settle_loops=40"))))

# prefix_parity trained twice as long (3,000 steps; the learning-rate schedule spans them), nothing else changed.
# Declared 2026-12-06 18:36 UTC, before its first run, after nine parity runs under jax 0.10.2 (three recipes, three
# seeds each: the records think_longer_prefix_parity_{jax0102,iteration_loss,settle}_3seeds_cpu) in which the five
# that met the bar solved 100 % of the training lengths' test strings and the four that did not solved 95.3-99.6 %.
TASKS["prefix_parity_long"] = dataclasses.replace(TASKS["prefix_parity"], task="prefix_parity", steps=(120, 3000))

SUITE = ("prefix_parity", "maze3", "pointer_chase", "p_hop", "addition")


def task_of(name: str) -> str:
    """The task a setting runs (several settings may run one task with different arguments)."""
    return TASKS[name].task or name


MODELS = ("looped", "equal_params", "equal_compute")
BASELINE_STYLE = {"equal_params": "--", "equal_compute": ":"}  # MODELS[1:], as plot draws them


def baselines_run(acc: dict) -> list[str]:
    """The baseline models that have accuracies in ``acc`` (keyed (model, difficulty, loops))."""
    return [b for b in MODELS[1:] if any(k[0] == b for k in acc)]


def models(setting: Setting, ablate: bool = False) -> dict[str, list[str]]:
    """Config overrides of the three models: looped (with the setting's recipe), equal parameters (loops
    fixed at 1) and equal training compute (a non-looped circuit of depth = the looped model's mean
    effective depth); with ``ablate`` also "looped-no-NAME" per recipe entry: the looped model without it."""
    once = [f"{X}.loops=fixed(1)", f"{X}.eval_loops=1", f"{X}.backprop=1"]
    looped = [f"{X}.loops={setting.loops}", f"{X}.eval_loops={setting.train_loops}"]
    out = {
        "looped": [*looped, *(o for _, entry in setting.recipe for o in entry)],
        "equal_params": once,
        "equal_compute": [f"{X}.depth={setting.train_loops}", *once],
    }
    if ablate:
        out |= {f"looped-no-{name}": [*looped, *(o for other, entry in setting.recipe if other != name for o in entry)]
                for name, _ in setting.recipe}
    return out


def is_looped(model_name: str) -> bool:
    """The looped model and its ablations: swept over loop counts (the baselines run once)."""
    return model_name.startswith("looped")


def config(name: str, model_name: str, steps: int, out: Path, examples: int, seed: int = 0) -> Config:
    """The run config of one model of one task: the base config, the task's setting, the model's
    overrides. ``seed`` sets initialisation, data order and the eval sets (seed 0: the base run)."""
    setting = TASKS[name]
    return load_config(BASE, [
        f"seed={seed}", f"run.dir={out}", f"run.name={name}-{model_name}" + (f"-seed{seed}" if seed else ""),
        f"data.task={task_of(name)}",
        f"data.task_args={json.dumps(setting.task_args)}", f"data.train_difficulty={setting.train}",
        f"data.eval_splits={json.dumps(setting.splits)}", f"train.steps={steps}", f"data.eval_examples={examples}",
        *setting.overrides, *models(setting, ablate=True)[model_name]])


WALL_RECORD = "think_longer_train_wall.json"


def train_timed(cfg: Config) -> float:
    """Train (or resume) one run; returns the wall seconds its training has taken in all. The total is
    kept in the run directory, so a rerun over finished runs reports their training time, not 0, and a
    run stopped part way and resumed reports both parts (the steps after its last checkpoint count twice:
    they were trained twice)."""
    record = cfg.run_dir / WALL_RECORD
    spent = C.read_wall(record)
    done = RunDir(cfg.run_dir).trained_to() or 0
    t0 = time.time()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            train(cfg)
    finally:  # a training stopped part way (Ctrl-C, SIGTERM, an error) counts too: its resume adds to it
        # this call trained (or nothing was recorded); no run folder: it stopped before it began
        if (done < cfg.train.steps or not record.is_file()) and cfg.run_dir.is_dir():
            spent += time.time() - t0
            C.write_wall(record, spent, cfg.train.steps)
    return spent


SPLITS = ("val", "test")  # held-out sets per difficulty: loop counts are chosen on val, reported on test


def run_task(name: str, quick: bool, out: Path, examples: int, seeds: int = 1,
             model_names: tuple[str, ...] = MODELS, first_seed: int = 0) -> dict:
    """Train and evaluate ``model_names`` over seeds ``first_seed .. first_seed + seeds - 1``: rows of test and
    validation accuracy at every count (looped models) or at 1 (baselines), the selection on val and the fixed
    rule."""
    setting = TASKS[name]
    steps = setting.steps[0 if quick else 1]
    rows, solved_at, floors = [], {split: [] for split in setting.splits}, {split: [] for split in setting.splits}
    for seed, model_name in itertools.product(range(first_seed, first_seed + seeds), model_names):
        cfg = config(name, model_name, steps, out, examples, seed)
        wall = train_timed(cfg)
        data = build_data(cfg)
        model, params, step = restore_params(cfg, data=data)
        task = data.task
        evaluator = evaluator_for(model)
        counts = setting.counts(quick) if is_looped(model_name) else [1]
        tokens_seen = step * cfg.data.batch_size * task.seq_len(setting.train[1])
        for split, (lo, hi) in setting.splits.items():
            sets = {h: eval_batches(task, f"{split}/{h}", (lo, hi), examples, 256, cfg.seed) for h in SPLITS}
            if model_name == model_names[0]:  # the examples depend on the seed, not on the model
                floors[split].append(answer_floor(sets["val"], sets["test"]))
            for held_out, batches in sets.items():
                first = np.full(examples, np.inf)  # the smallest count that solves each example
                for n in counts:
                    correct = evaluator.correct(params, batches, {"X": n})
                    first = np.where(correct & (first == np.inf), n, first)
                    rows.append({"difficulty": split, "split": held_out, "model": model_name, "loops": n,
                                 "accuracy": float(correct.mean()), "seed": seed, "wall_s": wall,
                                 "tokens_seen": tokens_seen})
                if model_name == "looped" and held_out == "test":
                    depths = [task.depth(x) for b in batches for x, m in zip(b["inputs"], b["mask"], strict=True)
                              if m.sum()]
                    if None not in depths:
                        solved_at[split] += list(zip(depths, first.tolist(), strict=True))
        print(f"[{name}] {model_name} seed {seed}: trained {steps} steps in {wall:.0f}s", file=sys.stderr)
        # the rows so far, rewritten after every model: a run stopped part-way keeps what it measured
        C.write_out(out / f"{name}.rows.partial.json", C.dumps({"task": name, "steps": steps, "rows": rows}),
                    "in its runs, which a rerun with this --out scores again")
    return {"train_loops": setting.train_loops, "loops": setting.loops, "loop_range": loop_range(setting.loops),
            "recipe": {k: list(v) for k, v in setting.recipe}, "steps": steps, "seeds": seeds, "rows": rows,
            "selected": select(rows), "rule": fixed_rule(rows, setting),
            "depth": {s: depth_summary(pairs, setting.train_loops) for s, pairs in solved_at.items() if pairs},
            # the (depth, smallest solving count; None: never) pairs themselves, so that records of disjoint seeds
            # join into the same summary (`merge`)
            "depth_pairs": {s: [[d, None if f == np.inf else f] for d, f in pairs] for s, pairs in solved_at.items()
                            if pairs},
            "floor": {s: {k: float(np.mean([f[k] for f in fs])) for k in fs[0]} for s, fs in floors.items() if fs}}


MUST_MATCH = ("train_loops", "loops", "recipe", "steps")  # a record's settings: records to join agree on them


def read_record(path: Path) -> dict:
    """The think_longer.json record at ``path`` (``--merge``, ``--replot``), its rows checked: OSError when it cannot
    be read; TypeError or ValueError saying what in it no run of this script writes (a NaN, a string for a number, an
    accuracy past 1, a document nested past Python's limit), where a row with a NaN accuracy was joined into a verdict
    and a deeply nested file was a RecursionError traceback (#27 pass 24)."""
    doc = jsontext.loads(path.read_text(encoding="utf-8"), parse_constant=C.no_json_constant)
    if not isinstance(doc, dict):
        raise TypeError("the top level is not a JSON object")
    tasks = doc["tasks"]
    if not isinstance(tasks, dict) or not all(isinstance(r, dict) and isinstance(r.get("rows"), list)
                                              for r in tasks.values()):
        raise TypeError("no tasks with rows")
    for name, result in tasks.items():
        for i, row in enumerate(result["rows"]):
            if not isinstance(row, dict):
                raise TypeError(f"{name}: row {i} is not a JSON object")
            bad = next(((field, why) for field, why, ok in (
                ("model", "a model's name", isinstance(row.get("model"), str)),
                ("difficulty", "a split's name", isinstance(row.get("difficulty"), str)),
                ("split", "val or test", row.get("split", "test") in SPLITS),
                ("loops", "a whole number >= 1", C.whole_number(row.get("loops"), 1)),
                ("seed", "a whole number >= 0", C.whole_number(row.get("seed", 0), 0)),
                ("accuracy", "a number in [0, 1]", C.is_number(row.get("accuracy")) and 0 <= row["accuracy"] <= 1))
                if not ok), None)
            if bad:
                raise ValueError(f"{name}: row {i} has {bad[0]} {row.get(bad[0])!r}, where a run of this script writes "
                                 f"{bad[1]}")
        twice = C.repeated_row(result["rows"], lambda r: (f"seed {r.get('seed', 0)}", r["model"], r["difficulty"],
                                                          r.get("split", "test"), f"{r['loops']} loops"))
        if twice:  # (a join averaged both into the seed's mean; #27 pass 29)
            raise ValueError(f"{name}: {twice}, where a run of this script scores each once")
    return doc


def _scored(rows: list[dict], seed: int) -> set[tuple]:
    """What seed ``seed`` of ``rows`` was scored at: (model, difficulty, held-out set, loops)."""
    return {(r["model"], r["difficulty"], r.get("split", "test"), r["loops"]) for r in rows if r.get("seed", 0) == seed}


def merge(docs: dict[str, dict]) -> dict:
    """One document from ``docs`` (name -> think_longer.json document), each scoring disjoint seeds of the same
    settings: a bench run split over sessions (``--first-seed``), e.g. seed 0 in one and seeds 1-2 in another.
    Rows, fixed-rule rows and wall times are joined, and each record's ``environment`` is kept under its name; what
    each split gives away is averaged over all seeds; the
    depth summary is recomputed from the records' depth pairs (records without them: its means are weighted by
    seeds, its median slack, which does not join, is dropped); the selection and the verdict are those of the
    joined rows. Raises ValueError naming the record and the field that disagree."""
    if len(docs) < 2:
        raise ValueError("give two records or more to join")
    quick = {bool(d.get("quick")) for d in docs.values()}
    if len(quick) > 1:
        raise ValueError("the records mix --quick runs with full runs; join records of one kind")
    for src, doc in docs.items():
        # a record sharing no task with the others is not a part of their run: the join wrote one document of both,
        # its "seeds" the larger count (#27 pass 24's leftover); tasks of one record only beside shared ones join
        others = {n for other, d in docs.items() if other != src for n in d["tasks"]}
        if not others & set(doc["tasks"]):
            raise ValueError(f"{src} scores {', '.join(doc['tasks'])} and the other records "
                             f"{', '.join(sorted(others))}: no task in common; --merge joins disjoint seeds of the "
                             f"same task (keep the records apart)")
    tasks: dict[str, dict] = {}
    for name in dict.fromkeys(n for d in docs.values() for n in d["tasks"]):
        parts = [(src, d["tasks"][name]) for src, d in docs.items() if name in d["tasks"]]
        first_src, first = parts[0]
        base_seed = min(r.get("seed", 0) for r in first["rows"])  # what every seed must be scored at: the first's
        base = _scored(first["rows"], base_seed)
        seen: dict[int, str] = {}
        for src, part in parts:
            for key in MUST_MATCH:
                if part.get(key) != first.get(key):
                    raise ValueError(f"{name}: {src} has {key} {part.get(key)!r}, {first_src} has {first.get(key)!r}; "
                                     f"join records of the same settings")
            models = sorted({r["model"] for r in part["rows"]})
            if models != sorted({r["model"] for r in first["rows"]}):
                raise ValueError(f"{name}: {src} scores the models {','.join(models)}, {first_src} others; every seed "
                                 f"needs the same models for the bar (--models)")
            for seed in sorted({r.get("seed", 0) for r in part["rows"]}):
                if seed in seen:
                    raise ValueError(f"{name}: seed {seed} is in both {seen[seed]} and {src}; join records of "
                                     f"disjoint seeds")
                seen[seed] = src
                # every seed scored at the same difficulties and loop counts: a cell or a difficulty that one record
                # alone holds was shown as the mean "over N seeds" and could decide the verdict (#27 pass 24)
                mine = _scored(part["rows"], seed)
                if mine != base:
                    odd = min(mine ^ base, key=str)
                    model, difficulty, held_out, n = odd
                    has, lacks = f"{src} (seed {seed})", f"{first_src} (seed {base_seed})"
                    if odd in base:
                        has, lacks = lacks, has
                    raise ValueError(f"{name}: {has} scores {model} on {difficulty} ({held_out}) at {n} "
                                     f"loop{'s' * (n != 1)} and {lacks} does not; every seed must be scored at the "
                                     f"same difficulties and loop counts (records of other settings, or of another "
                                     f"version of them, do not join)")
        rows = sorted((r for _, part in parts for r in part["rows"]), key=lambda r: r.get("seed", 0))
        weights = [len({r.get("seed", 0) for r in part["rows"]}) for _, part in parts]
        merged = {k: first[k] for k in (*MUST_MATCH, "loop_range") if k in first}
        merged |= {"seeds": len(seen), "rows": rows, "selected": select(rows),
                   "rule": sorted((r for _, part in parts for r in part.get("rule", [])), key=lambda r: r["seed"])}
        depth = merge_depth([part for _, part in parts], weights, first["train_loops"])
        if depth:
            merged["depth"] = depth
        if all("depth_pairs" in part for _, part in parts):
            merged["depth_pairs"] = {s: [p for _, part in parts for p in part["depth_pairs"].get(s, [])]
                                     for s in depth}
        splits = [s for s in first.get("floor", {}) if all(s in part.get("floor", {}) for _, part in parts)]
        if splits:
            merged["floor"] = {s: {k: float(np.average([part["floor"][s][k] for _, part in parts], weights=weights))
                                   for k in first["floor"][s]} for s in splits}
        tasks[name] = merged
    # each record's install (`C.environment`), under its name: a trained model depends on it, and the joined record
    # carried none (#27 pass 26: seeds of two installs joined with no trace of either)
    return {"tasks": tasks, "quick": quick.pop(), "seeds": max(t["seeds"] for t in tasks.values()),
            "wall_s": sum(d.get("wall_s", 0.0) for d in docs.values()), "merged_from": list(docs),
            "environment": {src: d.get("environment") for src, d in docs.items()}}


def merge_depth(parts: list[dict], weights: list[int], m: int) -> dict:
    """The depth summary of the joined ``parts`` (task results; ``weights``: their seed counts): recomputed from
    their depth pairs where every part has them; otherwise joined from the summaries, each seed's examples
    counted once (means weighted by seeds, the max and the slack range over all), the median slack dropped."""
    splits = [s for s in parts[0].get("depth", {}) if all(s in p.get("depth", {}) for p in parts)]
    if all("depth_pairs" in p for p in parts):
        return {s: depth_summary([(d, np.inf if f is None else f) for p in parts for d, f in p["depth_pairs"][s]], m)
                for s in splits if all(s in p["depth_pairs"] for p in parts)}
    out = {}
    for s in splits:
        ds = [p["depth"][s] for p in parts]
        ranges = [d["slack_range"] for d in ds if d["slack_range"] is not None]
        out[s] = {k: float(np.average([d[k] for d in ds], weights=weights))
                  for k in ("mean", "within_train_loops", "unsolved")}
        out[s] |= {"max": max(d["max"] for d in ds), "median_slack": None,
                   "slack_range": [min(r[0] for r in ranges), max(r[1] for r in ranges)] if ranges else None}
    return out


def select(rows: list[dict]) -> list[dict]:
    """Per (seed, model, difficulty): the loop count with the best validation accuracy (ties: the fewest
    loops) and its test accuracy. Rows without validation (records from before the split) select nothing."""
    val, test = {}, {}
    for r in rows:
        key = (r.get("seed", 0), r["model"], r["difficulty"])
        (val if r.get("split") == "val" else test).setdefault(key, {})[r["loops"]] = r["accuracy"]
    chosen = []
    for key, by_count in val.items():
        n = min(by_count, key=lambda c: (-by_count[c], c))
        seed, model, difficulty = key
        chosen.append({"seed": seed, "model": model, "difficulty": difficulty, "loops": n,
                       "val_accuracy": by_count[n], "test_accuracy": test[key][n]})
    return chosen


def fixed_rule(rows: list[dict], setting: Setting) -> list[dict]:
    """The looped models' test accuracy at `Setting.rule`'s count, per (seed, model, difficulty)."""
    return [{"seed": r.get("seed", 0), "model": r["model"], "difficulty": r["difficulty"], "loops": r["loops"],
             "test_accuracy": r["accuracy"]}
            for r in rows if is_looped(r["model"]) and r.get("split", "test") == "test"
            and r["loops"] == setting.rule(r["difficulty"])]


def depth_summary(pairs: list[tuple[int, float]], m: int) -> dict:
    """How the looped model's loops relate to the steps each instance needs: from (depth, smallest
    solving count or inf) per example, the depth distribution, the share within m steps, and for the
    solved examples the slack (smallest solving count - depth) of the swept counts."""
    depth, first = np.array([p[0] for p in pairs], float), np.array([p[1] for p in pairs], float)
    solved = np.isfinite(first)
    slack = first[solved] - depth[solved]
    return {"mean": float(depth.mean()), "max": int(depth.max()), "within_train_loops": float((depth <= m).mean()),
            "median_slack": float(np.median(slack)) if solved.any() else None,
            "slack_range": [float(slack.min()), float(slack.max())] if solved.any() else None,
            "unsolved": float(1 - solved.mean())}


def answer_floor(val: list[dict], test: list[dict]) -> dict:
    """What a split gives away without any model: from its validation batches, the most common target at
    each answer position, scored on its test batches by exact match ("constant_accuracy"), and the share
    of answer positions whose target is the same in every validation example ("fixed_positions"). A split
    whose answers are nearly fixed (addition_chain's 4x: a carry chain as long as the width leaves one
    free digit) measures nothing, however well a model scores on it."""
    targets = np.concatenate([b["targets"] for b in val])
    mask = np.concatenate([b["mask"] for b in val]) > 0
    T = targets.shape[1]
    majority = np.full(T, -1)
    fixed = []
    for t in range(T):
        seen = targets[mask[:, t], t]
        if seen.size:
            values, counts = np.unique(seen, return_counts=True)
            majority[t] = values[counts.argmax()]
            fixed.append(len(values) == 1)
    correct = [np.all((b["targets"] == majority[: b["targets"].shape[1]]) | (b["mask"] <= 0), axis=1)
               for b in test]
    real = [b["mask"].sum(1) > 0 for b in test]  # padding rows of a last batch are no examples
    hits = np.concatenate([c[r] for c, r in zip(correct, real, strict=True)])
    return {"constant_accuracy": float(hits.mean()) if hits.size else 0.0,
            "fixed_positions": float(np.mean(fixed)) if fixed else 0.0}


# A split that a constant answer solves this often is flagged. Fixed positions alone are no flag: a 3-row maze
# at 32 columns fixes 62 % of its answer cells (the design's walls) and a constant answer solves 1.6 % of it.
GIVEAWAY = 0.2


def setting_floor(name: str, examples: int, seeds: int) -> dict:
    """`answer_floor` of each difficulty of setting ``name`` (mean over seeds 0..seeds-1), from its generator
    alone: what a new setting gives away, checked before a model is trained on it (``--floor``)."""
    setting = TASKS[name]
    task = make_task(task_of(name), **setting.task_args)
    out = {}
    for split, (lo, hi) in setting.splits.items():
        fs = [answer_floor(*(eval_batches(task, f"{split}/{h}", (lo, hi), examples, 256, seed) for h in SPLITS))
              for seed in range(seeds)]
        out[split] = {k: float(np.mean([f[k] for f in fs])) for k in fs[0]}
    return out


def loop_range(loops: str) -> list[int]:
    """The loop counts a training distribution typically draws: [lo, hi]."""
    return list(LoopDistribution.parse(loops).typical_range())


def test_rows(rows: list[dict]) -> list[dict]:
    """The rows scored on the test sets (records from before the val/test split count as test)."""
    return [r for r in rows if r.get("split", "test") == "test"]


def accuracies(rows: list[dict]) -> tuple[dict, dict]:
    """Mean test accuracy and (min, max) over seeds, keyed by (model, difficulty, loops)."""
    by_key: dict[tuple, list[float]] = {}
    for r in test_rows(rows):
        by_key.setdefault((r["model"], r["difficulty"], r["loops"]), []).append(r["accuracy"])
    return ({k: sum(v) / len(v) for k, v in by_key.items()}, {k: (min(v), max(v)) for k, v in by_key.items()})


# The bar (#24): at the count selected on validation, every seed's test accuracy reaches the target,
# at least MARGIN points above the better baseline (its mean over seeds).
TARGETS = {"prefix_parity": {"2x": 0.95, "4x": 0.90}, "maze3": {"2x": 0.90}, "addition": {"2x": 0.90},
           "addition_runs": {"2x": 0.90}, "addition_coupled": {"2x": 0.90},
           "addition_aligned_coupled": {"2x": 0.90}, "addition_place_window": {"2x": 0.90},
           "addition_runs_coupled": {"2x": 0.90}, "prefix_parity_iteration_loss": {"2x": 0.95, "4x": 0.90},
           "prefix_parity_settle": {"2x": 0.95, "4x": 0.90}, "maze3_settle": {"2x": 0.90},
           "prefix_parity_long": {"2x": 0.95, "4x": 0.90}}
MARGIN = 30.0


def verdict(result: dict, name: str = "") -> dict:
    """The bar at 2x on test accuracies averaged over seeds (gain of the best larger count over the
    training count, margin over the better baseline, in points) and, with a validation split, the
    selected counts' test accuracy per difficulty (mean and min over seeds) against ``TARGETS[name]``."""
    acc = accuracies(result["rows"])[0]
    m = result["train_loops"]
    at_train = acc[("looped", "2x", m)]
    best_n, best = max(((n, a) for (mod, d, n), a in acc.items() if mod == "looped" and d == "2x" and n >= m),
                       key=lambda t: t[1])
    ran = baselines_run(acc)
    gain = 100 * (best - at_train)
    margin = 100 * (best - max(acc[(b, "2x", 1)] for b in ran)) if len(ran) == len(MODELS[1:]) else None  # both only
    out = {"best_loops": best_n, "gain_points": gain, "margin_points": margin,
           "holds": gain >= 20 and margin is not None and margin > 0}
    chosen = [r for r in result.get("selected", []) if r["model"] == "looped"]
    if chosen:
        selected = {}
        for d in dict.fromkeys(r["difficulty"] for r in chosen):
            test = [r["test_accuracy"] for r in chosen if r["difficulty"] == d]
            baseline = max((acc[(b, d, 1)] for b in ran), default=None)
            selected[d] = {"mean": float(np.mean(test)), "min": float(min(test)), "seeds": len(test),
                           "baseline": baseline,
                           "min_margin_points": None if baseline is None else 100 * (min(test) - baseline)}
        out["selected"] = selected
        targets = TARGETS.get(name, {})
        if targets:
            out["targets"] = targets
            # judged against both baselines only, as the margin above: one model of the two is not "the better"
            out["meets_targets"] = None if len(ran) < len(MODELS[1:]) else all(
                d in selected and selected[d]["min"] >= t and selected[d]["min_margin_points"] is not None
                and selected[d]["min_margin_points"] >= MARGIN for d, t in targets.items())
    return out


def markdown(name: str, result: dict) -> str:
    rows = result["rows"]
    splits = list(dict.fromkeys(r["difficulty"] for r in rows))
    looped = [r for r in rows if r["model"] == "looped"]
    counts = list(dict.fromkeys(r["loops"] for r in looped))
    acc, spread = accuracies(rows)
    seeds = result.get("seeds", 1)

    def cell(key: tuple) -> str:  # mean, and with several seeds the range
        lo, hi = spread[key]
        return f"{100 * acc[key]:.1f}" + (f" ({100 * lo:.0f}–{100 * hi:.0f})" if seeds > 1 else "")

    title = f"### {name} (loops {result['loops']}, mean {result['train_loops']}"
    title += f"; mean (min–max) over {seeds} seeds)" if seeds > 1 else ")"
    cells = [["looped", f"{n}" + (" (train mean)" if n == result["train_loops"] else "")]
             + [cell(("looped", s, n)) for s in splits] for n in counts]
    cells += [[m, "1"] + [cell((m, s, 1)) for s in splits] for m in baselines_run(acc)]
    lines = [title, ""]
    if result.get("recipe"):  # the looped model's recipe replaces the loops above where it sets them
        lines += ["Looped model's recipe: " + "; ".join(f"{k}: " + ", ".join(f"`{o}`" for o in v)
                                                     for k, v in result["recipe"].items()), ""]
    lines += [format_table(["model", "loops", *splits], cells, markdown=True)]
    if result.get("depth"):
        lines += ["", "Steps each instance needs (`Task.depth`) against the looped model's loops:", ""]
    for split, d in result.get("depth", {}).items():
        slack = "" if d["median_slack"] is None else (
            f"; solved first at depth {d['median_slack']:+.0f} loops (median over solved examples, swept counts; "
            f"range {d['slack_range'][0]:+.0f} .. {d['slack_range'][1]:+.0f})")
        lines.append(f"- {split}: mean {d['mean']:.1f}, max {d['max']}, {100 * d['within_train_loops']:.0f} % within "
                     f"the training mean {result['train_loops']}{slack}; never solved: {100 * d['unsolved']:.1f} %")
    if result.get("floor"):
        lines += ["", "What each split gives away without a model (the validation answers' most common digit at each "
                      "position, scored on test; the share of answer positions fixed in every validation example):", ""]
    for split, f in result.get("floor", {}).items():
        flag = (" **a constant answer solves this split this often: it measures little**"
                if f["constant_accuracy"] >= GIVEAWAY else "")
        lines.append(f"- {split}: constant answer {100 * f['constant_accuracy']:.1f} %, fixed positions "
                     f"{100 * f['fixed_positions']:.0f} %{flag}")
    v = verdict(result, name)
    against = ("baselines not run: the bar is not judged" if v["margin_points"] is None else
               f"{v['margin_points']:+.1f} over the better baseline: the bar {'holds' if v['holds'] else 'does not hold'}")
    lines += ["", f"2x: best {v['best_loops']} loops, {v['gain_points']:+.1f} points over the training count, {against}."]
    if result.get("selected"):
        lines += ["", selection_table(result)]
    if "meets_targets" in v:
        want = ", ".join(f"{d} >= {100 * t:.0f} %" for d, t in v["targets"].items())
        got = ", ".join(f"{d} min {100 * v['selected'][d]['min']:.1f} %" for d in v["targets"] if d in v["selected"])
        judged = ("not judged: " + " and ".join(b for b in MODELS[1:] if b not in baselines_run(acc)) + " not run"
                  if v["meets_targets"] is None else "met" if v["meets_targets"] else "not met")
        lines += ["", f"Target (every seed, selected on val, scored on test: {want}, >= {MARGIN:.0f} points over the "
                      f"better baseline): {judged} ({got})."]
    return "\n".join(lines)


def selection_table(result: dict) -> str:
    """Per model and difficulty: each seed's count chosen on val and its test accuracy, their mean and
    min, and the fixed rule's test accuracy (mean over seeds)."""
    chosen, rule = result["selected"], result.get("rule", [])
    seeds = sorted({r["seed"] for r in chosen})
    cells = []
    for model, d in dict.fromkeys((r["model"], r["difficulty"]) for r in chosen):
        mine = {r["seed"]: r for r in chosen if r["model"] == model and r["difficulty"] == d}
        test = [mine[s]["test_accuracy"] for s in seeds if s in mine]
        by_rule = [r for r in rule if r["model"] == model and r["difficulty"] == d]
        cells.append([model, d, *(f"{100 * mine[s]['test_accuracy']:.1f} @{mine[s]['loops']}" if s in mine else "-"
                                  for s in seeds),
                      f"{100 * np.mean(test):.1f}", f"{100 * min(test):.1f}",
                      f"{100 * np.mean([r['test_accuracy'] for r in by_rule]):.1f} @{by_rule[0]['loops']}"
                      if by_rule else "-"])
    head = ["model", "difficulty", *(f"seed {s}" for s in seeds), "mean", "min", "rule m*hi/hi_train"]
    return ("Test accuracy (%) at the loop count chosen on the validation set (@count), per seed:\n\n"
            + format_table(head, cells, markdown=True))


def plot(name: str, result: dict) -> bytes:
    """PNG: the looped model's accuracy vs loop count per difficulty (solid), each baseline's accuracy
    as a flat dashed / dotted line in the same colour, the training loop range shaded."""
    from matplotlib.figure import Figure

    rows = result["rows"]
    splits = list(dict.fromkeys(r["difficulty"] for r in rows))
    acc = accuracies(rows)[0]
    ran = baselines_run(acc)
    fig = Figure(figsize=(8.0, 4.0))
    ax = fig.add_subplot()
    lo, hi = result["loop_range"]
    ax.axvspan(lo, hi, color="0.9", zorder=0, label=f"training loops {result['loops']}")
    for i, split in enumerate(splits):
        colour = f"C{i}"
        pts = sorted((n, 100 * a) for (mod, d, n), a in acc.items() if mod == "looped" and d == split)
        ax.plot(*zip(*pts, strict=True), "o-", color=colour, label=f"looped, {split}")
        for model in ran:
            ax.axhline(100 * acc[(model, split, 1)], color=colour, ls=BASELINE_STYLE[model], lw=1.2)
    m = result["train_loops"]
    labels = {"equal_params": "equal params (1 loop), colour = difficulty",
              "equal_compute": f"equal compute (depth {m}, 1 loop)"}
    for model in ran:  # legend entries only for the baselines drawn
        ax.plot([], [], "k" + BASELINE_STYLE[model], lw=1.2, label=labels[model])
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter("{x:g}")
    ax.set(xlabel="loop count of X at evaluation", ylabel="exact match (%)", ylim=(-3, 103),
           title=f"think longer: {name} ({result['steps']} steps per model)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: no curve hidden
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def seeds_replaced(record: Path, names: list[str], seeds: Collection[int]) -> str | None:
    """Which seeds of ``names`` the record at ``record`` (an --out's think_longer.json) holds that a run of ``seeds``
    would not score again, as "seed 0 of prefix_parity"; None when none (or no readable record). The run replaces the
    record: a second session's --first-seed into the first's --out replaced the first's record with no word (#27 pass
    24; its runs stay, and only scoring them all again wrote it back)."""
    try:
        tasks = read_record(record)["tasks"] if record.is_file() else {}
    except (OSError, ValueError, TypeError, KeyError):
        return None  # damaged: nothing in it to lose
    return C.rows_dropped(tasks, names, lambda r: r.get("seed", 0) in seeds)


def main() -> int:
    p = C.ArgumentParser(description=C.about(__doc__))
    p.add_argument("--quick", action="store_true", help="small budgets (120 training steps per model, 60 for the "
                   "global-lookup tasks; 64 eval examples; no 3x and 6x loop counts): a smoke run of the whole "
                   "suite, not its results")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--tasks", default=",".join(SUITE), help=f"comma-separated settings (default: {','.join(SUITE)}); "
                   "any of " + ",".join(TASKS))
    p.add_argument("--out", type=C.out_folder, default="bench_runs/think_longer", help="run directories and results")
    p.add_argument("--replot", action="store_true", help="redraw the tables and plots from --out's "
                   "think_longer.json without training")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated models to train and evaluate "
                   f"(default: all of {','.join(MODELS)})")
    p.add_argument("--seeds", type=int, default=1, help="train every model with seeds 0..N-1; tables and the "
                   "verdict use the mean over seeds (default 1: seed 0 only)")
    p.add_argument("--floor", action="store_true", help="train nothing: print what each difficulty of --tasks gives "
                   "away without a model (a constant answer's test accuracy, the share of fixed answer positions), "
                   "to check a setting before its first run")
    p.add_argument("--first-seed", type=int, default=0, help="with --seeds N, train seeds K..K+N-1 instead of "
                   "0..N-1: a run split over sessions, each part scored on its own, then joined with --merge")
    p.add_argument("--merge", nargs="+", type=Path, metavar="RECORD", help="train nothing: join "
                   "think_longer.json records of the same settings and disjoint seeds into --out's record, tables and "
                   "verdict (the rows of every seed together; nothing is rescored)")
    p.add_argument("--ablate", action="store_true", help="also train the looped model once per entry of its task's "
                   "recipe with that entry switched off (models looped-no-NAME), every seed")
    args = p.parse_args()
    C.at_least(p, args, {"--seeds": 1, "--first-seed": 0})
    C.at_most(p, args, {"--seeds": C.SEEDS})  # --floor drew every seed's examples: 1e20 hung
    if args.first_seed + args.seeds > C.SEEDS[0]:
        p.error(f"--first-seed {args.first_seed} with --seeds {args.seeds}: seeds up to {C.SEEDS[0] - 1} only")
    # flags the chosen mode does not read were accepted and ignored (--floor trains and writes nothing, --replot
    # redraws --out's results as they are)
    unread = {"--floor": ("--replot", "--ablate", "--models", "--out", "--first-seed", "--merge"),
              "--replot": ("--ablate", "--quick", "--models", "--seeds", "--tasks", "--first-seed", "--merge"),
              "--merge": ("--ablate", "--quick", "--models", "--seeds", "--tasks", "--first-seed")}
    def dest(flag: str) -> str:  # --first-seed -> first_seed
        return flag[2:].replace("-", "_")

    for mode, flags in unread.items():
        # (as strings: argparse passes a string default through the flag's type, --out's Path, get_default does not)
        # at its default value too (`--merge ... --tasks prefix_parity,...`): p.given holds every flag that was given
        given = [f for f in flags if dest(f) in p.given or str(getattr(args, dest(f))) != str(p.get_default(dest(f)))] \
            if getattr(args, dest(mode)) else []
        if given:
            p.error(f"{mode} reads none of {' and '.join(given)}; drop {'them' if len(given) > 1 else 'it'}, or drop {mode}")
    examples = 64 if args.quick else 256
    model_names = tuple(args.models.split(","))
    if not model_names or not set(model_names) <= set(MODELS) or "looped" not in model_names:
        p.error(f"--models {args.models}: choose from {','.join(MODELS)}, including looped (the sweep)")
    names = args.tasks.split(",")
    unknown = [n for n in names if n not in TASKS]  # all of them before any training: a typo in the last one was
    if unknown:  # refused after the others had trained (hours), and their results were not written
        p.error(f"unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")
    for flag, given in (("--models", model_names), ("--tasks", names)):
        C.once(p, flag, given)  # a model given twice was trained and counted twice: its seeds counted double
    out = Path(args.out)
    results = {}
    t0 = time.time()
    if args.floor:
        floors = {n: setting_floor(n, examples, args.seeds) for n in names}
        cells = [[n, split, f"{100 * f['constant_accuracy']:.1f}", f"{100 * f['fixed_positions']:.0f}",
                  "yes" if f["constant_accuracy"] >= GIVEAWAY else ""]
                 for n, by_split in floors.items() for split, f in by_split.items()]
        table = format_table(["task", "difficulty", "constant answer %", "fixed positions %", "flagged"], cells,
                             markdown=True)
        print(table, file=sys.stderr if args.json else sys.stdout)
        if args.json:
            print(C.dumps({"floor": floors, "examples": examples, "seeds": args.seeds}))
        return 0
    if args.merge:
        docs = C.merge_records(p, args.merge, out / "think_longer.json", read_record)
        try:
            doc = merge(docs)
            results = doc["tasks"]
            for name, result in results.items():
                result["verdict"] = verdict(result, name)
                markdown(name, result)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            p.error(f"--merge: {e}" if isinstance(e, ValueError) else
                    f"--merge: a record is not a result of this script ({type(e).__name__}: {e})")
        # --out's own record is replaced: one holding seeds the joined record lacks was lost with no word, which a
        # training run into that --out refuses (#27 pass 29)
        C.tasks_replaced(p, out / "think_longer.json", list(results))
        kept = seeds_replaced(out / "think_longer.json", list(results),
                              {r.get("seed", 0) for result in results.values() for r in result["rows"]})
        if kept:
            p.error(f"--out {out} holds a think_longer.json with {kept}, which the joined record does not hold, and "
                    f"the joined record replaces that one; add it to --merge, move it aside, or choose another --out")
    elif args.replot:
        saved = out / "think_longer.json"
        if not_a_file(saved):
            p.error(f"--replot: {saved} {not_a_file(saved)}; run the benchmark with --out {out} first")
        try:  # a file cut short or of another shape was a traceback (JSONDecodeError, KeyError, TypeError)
            doc = read_record(saved)
            results = doc["tasks"]
            for name, result in results.items():  # files written before loop_range was recorded lack it
                result.setdefault("loop_range", loop_range(result["loops"]))
                result["verdict"] = verdict(result, name)
                markdown(name, result)  # reads every field the tables need
        except OSError as e:
            p.error(f"--replot: cannot read {saved} ({e.strerror or e})")
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            p.error(f"--replot: {saved} is not a result of this script ({type(e).__name__}: {e}); run the benchmark "
                    f"with --out {out} again")
    else:
        C.tasks_replaced(p, out / "think_longer.json", names)
        kept = seeds_replaced(out / "think_longer.json", names, range(args.first_seed, args.first_seed + args.seeds))
        if kept:
            p.error(f"--out {out} holds a think_longer.json with {kept}, which this run (seeds {args.first_seed}.."
                    f"{args.first_seed + args.seeds - 1}) does not score, and its record replaces that one; move "
                    f"{out / 'think_longer.json'} aside (then join the two with --merge), or choose another --out")
        trained = {name: model_names + (tuple(m for m in models(TASKS[name], ablate=True) if m.startswith("looped-no-"))
                                        if args.ablate else ()) for name in names}
        # a run --out holds trained past these steps was scored as it is, under a record of them (#27 pass 30)
        C.trained_past(p, [config(name, m, TASKS[name].steps[0 if args.quick else 1], out, examples, seed)
                           for name, ms in trained.items() for m in ms
                           for seed in range(args.first_seed, args.first_seed + args.seeds)],
                       "--quick" if args.quick else "the full steps, without --quick")
        for name in names:
            results[name] = run_task(name, args.quick, out, examples, args.seeds, trained[name], args.first_seed)
            results[name]["verdict"] = verdict(results[name], name)
        doc = {"tasks": results, "quick": args.quick, "seeds": args.seeds, "first_seed": args.first_seed,
               "wall_s": time.time() - t0, "environment": C.environment()}
    text = "\n\n".join(markdown(n, r) for n, r in results.items())
    if args.json:  # printed first: a write that fails (a full disk) is one line, and the results are above it
        print(text, file=sys.stderr)
        print(C.dumps(doc), flush=True)
    else:
        print(text, flush=True)
    # each file whole (a temporary file renamed into place): written in place, a full disk tore the earlier record
    # (--replot's own, --merge's --out) and was a traceback after the training (#27 pass 24)
    C.write_out(out / "think_longer.json", C.dumps(doc, indent=1), "printed above")
    C.write_out(out / "think_longer.md", text + "\n", "printed above")
    for name, result in results.items():
        C.write_out(out / f"think_longer_{name}.png", plot(name, result), "not drawn (the tables are printed above)")
    if not args.json:
        print(f"\nwall time {doc['wall_s']:.0f}s; results in {out}/think_longer.{{md,json}}")
    return 0


if __name__ == "__main__":
    C.run_main(main)  # a setting a run refuses (an --out that is a file): its one line, no traceback
