"""Ablation and sweeps against the model itself: a removed circuit equals a model built without it,
a sweep reuses one program, means and per-example correctness skip padding."""

import copy

import numpy as np
import pytest
from flax import nnx

from loopformer.evaluation.ablate import ablate, mean_fill
from loopformer.evaluation.evaluator import evaluator_for
from loopformer.evaluation.sweep import convergence, sweep
from loopformer.model.transformer import build_model
from tests.conftest import EXAMPLES


@pytest.fixture(scope="module")
def eval_sets(run):
    return run.eval_sets(["train", "hard"], EXAMPLES)


def test_ablation_equals_the_model_built_without_the_circuit(run, eval_sets):
    # X and Y run batched under one vmap; the model without Y has X's weights at the same paths.
    small_cfg = copy.deepcopy(run.info.cfg.model)
    small_cfg.stages[0].circuits = small_cfg.stages[0].circuits[:1]
    small = nnx.eval_shape(lambda: build_model(small_cfg, run.model.vocab_size, 0))
    params = copy.deepcopy(run.params)
    del params["stages"][0]["circuits"]["Y"]
    evaluator = evaluator_for(small)
    defaults = run.info.full_loops()
    for split, batches in eval_sets.items():
        ablated = run.evaluator.evaluate(run.params, batches, defaults, ablate=["Y"])
        without = evaluator.evaluate(params, batches, {"X": 2})
        full = run.evaluator.evaluate(run.params, batches, defaults)
        assert ablated["loss"] == pytest.approx(without["loss"], rel=1e-5), split
        assert ablated["accuracy"] == without["accuracy"]
        assert abs(ablated["loss"] - full["loss"]) > 1e-4  # Y matters in this model


def test_ablate_rows_and_mean_mode(run, eval_sets):
    zero = ablate(run, eval_sets, "zero")
    mean = ablate(run, eval_sets, "mean")
    assert [r["label"] for r in zero[:4]] == ["baseline", "-X", "-Y", "none"]
    by = {(r["split"], r["label"], r["mode"]): r for r in zero + mean}
    for split in eval_sets:
        base = by[split, "baseline", "zero"]
        assert base["delta_loss"] == 0 and base["kept"] == ["X", "Y"]
        assert by[split, "baseline", "mean"]["loss"] == base["loss"]
        assert by[split, "-X", "zero"]["delta_loss"] == pytest.approx(by[split, "-X", "zero"]["loss"] - base["loss"])
        assert by[split, "-X", "mean"]["loss"] != by[split, "-X", "zero"]["loss"]
    # The mean is taken over the batches without padding rows (the first of the two here).
    fill = mean_fill(run, eval_sets["train"])
    np.testing.assert_allclose(fill, run.evaluator.circuit_means(run.params, eval_sets["train"][:1],
                                                                 run.info.full_loops()))
    assert fill.shape == (2, 16) and float(np.abs(fill).max()) > 0


def test_a_sweep_compiles_one_program_for_any_count(run, eval_sets):
    # 8 settings, counts up to 1000, at most one compile (none if an earlier test built the
    # program for this batch shape: the evaluator is shared by every command in the process).
    before = run.evaluator.compiles
    rows = sweep(run, {"hard": eval_sets["hard"]}, {"X": [1, 2, 7, 1000], "Y": [1, 3]})
    assert run.evaluator.compiles - before <= 1
    sweep(run, {"hard": eval_sets["hard"]}, {"X": [5, 9], "Y": [2]})
    assert run.evaluator.compiles - before <= 1
    assert [(r["loops"]["X"], r["loops"]["Y"]) for r in rows][:3] == [(1, 1), (1, 3), (2, 1)]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert len({round(r["loss"], 6) for r in rows}) > 4  # the counts change the output
    conv = convergence(run, {"hard": eval_sets["hard"]}, {"X": 4})
    stats = conv["hard"]["X"]
    assert set(conv["hard"]) == {"X"} and len(stats["rel_change"]) == len(stats["state_norm"]) == 4
    assert all(0 <= v <= 2 for v in stats["rel_change"])


def test_mean_fill_ignores_padding(run):
    """A circuit's mean output for mean ablation averages real tokens only: appending padding (segment 0)
    to every row leaves it unchanged."""
    rng = np.random.default_rng(0)
    inputs = rng.integers(1, run.model.vocab_size, (4, 6)).astype(np.int32)
    batch = {"inputs": inputs, "targets": inputs, "mask": np.ones_like(inputs, np.float32),
             "segment_ids": np.ones_like(inputs)}
    padded = {k: np.pad(v, ((0, 0), (0, 5))) for k, v in batch.items()}  # segment 0: padding
    padded["inputs"][:, 6:] = rng.integers(1, run.model.vocab_size, (4, 5))  # whatever the padding holds
    loops = run.info.full_loops()
    np.testing.assert_allclose(run.evaluator.circuit_means(run.params, [padded], loops),
                               run.evaluator.circuit_means(run.params, [batch], loops), rtol=1e-5, atol=1e-6)


def test_per_example_correctness_matches_the_accuracy(run, eval_sets):
    """Evaluator.correct: one bool per real example (the padding rows of the last batch dropped),
    whose mean is evaluate()'s exact-match accuracy, at every loop count."""
    for n in (1, 4):
        for split in ("train", "hard"):
            loops = run.info.full_loops({"X": n})
            correct = run.evaluator.correct(run.params, eval_sets[split], loops)
            acc = run.evaluator.evaluate(run.params, eval_sets[split], loops)["accuracy"]
            assert correct.shape == (EXAMPLES,) and correct.dtype == bool
            assert correct.mean() == pytest.approx(acc)


def test_an_exit_histogram_comes_from_the_evaluation_pass(run, eval_sets):
    """evaluate(histogram=True) counts real tokens by iterations run in the pass that scores them: the same
    counts as the per-example pass, the same metrics as without it, summing to the real tokens."""
    from loopformer.variants.exits import exit_rule

    loops, exits = run.info.full_loops({"X": 8}), {"X": exit_rule("latent_diff", 0.05)}
    batches = eval_sets["hard"]
    with_hist = run.evaluator.evaluate(run.params, batches, loops, exits=exits, histogram=True)
    plain = run.evaluator.evaluate(run.params, batches, loops, exits=exits)
    hist = run.evaluator.examples(run.params, batches, loops, exits)["histogram"]
    assert with_hist["histogram"] == hist and "histogram" not in plain
    assert {k: v for k, v in with_hist.items() if k != "histogram"} == plain
    mean = sum(k * v for k, v in hist["X"].items()) / sum(hist["X"].values())
    assert mean == pytest.approx(plain["mean_loops"]["X"], rel=1e-6)


def test_per_example_pass_reports_the_executed_work_of_the_scoring_pass(run, eval_sets):
    from loopformer.variants.exits import exit_rule

    loops, exits = run.info.full_loops({"X": 8}), {"X": exit_rule("latent_diff", 0.05)}
    ex = run.evaluator.examples(run.params, eval_sets["hard"], loops, exits)
    m = run.evaluator.evaluate(run.params, eval_sets["hard"], loops, exits=exits)
    assert ex["computed_loops"] == pytest.approx(m["computed_loops"], rel=1e-6)


def test_per_example_pass_runs_compacted_when_asked(run, eval_sets):
    """examples(compact=True) (bench/adaptive.py --compact on): the same answers, loops and histogram as the
    masked pass, and fewer executed token-iterations of the one-block circuit X."""
    from loopformer.variants.exits import exit_rule

    loops, exits = run.info.full_loops({"X": 8}), {"X": exit_rule("latent_diff", 0.2)}
    batches = eval_sets["hard"]
    on, off = (run.evaluator.examples(run.params, batches, loops, exits, compact=c) for c in (True, False))
    np.testing.assert_array_equal(on["correct"], off["correct"])
    np.testing.assert_allclose(on["loops"]["X"], off["loops"]["X"])
    assert on["histogram"] == off["histogram"] and len(on["histogram"]["X"]) > 1  # tokens stop at different counts
    assert on["computed_loops"]["X"] < off["computed_loops"]["X"]


def test_a_rys_screen_below_one_batch_scores_that_many_examples():
    """#27 pass 40's leftover: `rys --screen 8` under an eval batch of 64 scored the whole batch; the examples past the
    screen are masked out, as the padding rows are, so the screen scores 8 on the program the full scan compiles."""
    from loopformer.evaluation import rys

    mask = np.ones((4, 3), np.float32)
    mask[3] = 0  # a padding row
    batches = [{"inputs": np.zeros((4, 3), np.int32), "mask": mask}, {"inputs": np.zeros((4, 3), np.int32), "mask": mask}]
    for n, counted, kept in ((2, 2, 1), (3, 3, 1), (4, 4, 2), (99, 6, 2)):
        out = rys.screen({"s": batches}, n)["s"]
        assert (rys.count_examples(out), len(out)) == (counted, kept)
        assert all(np.shape(b["mask"]) == (4, 3) for b in out)
    assert batches[0]["mask"][2].all()  # the caller's batch is not changed
