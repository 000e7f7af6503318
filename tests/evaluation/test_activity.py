"""Per-token circuit activity against the model itself: the write norm is the circuit's write (linear in
its write kernel, 0 when gated off), the mean Δloss is the ablation's loss change, on-rates follow the
stated threshold."""

import dataclasses

import jax
import numpy as np
import pytest

from loopformer.evaluation.activity import ON_FRACTION, SplitActivity, _token_stats, activity, activity_rows
from tests.conftest import EXAMPLES


def test_mean_delta_loss_is_the_ablation_loss_change(run):
    eval_sets = run.eval_sets(["train", "hard"], EXAMPLES)
    rows, thresholds, examples = activity(run, eval_sets)
    assert [(r["split"], r["circuit"]) for r in rows] == [("train", "X"), ("train", "Y"), ("hard", "X"), ("hard", "Y")]
    for r in rows:
        batches = eval_sets[r["split"]]
        base = run.row(r["split"], batches)["loss"]  # mean CE per answer token
        removed = run.row(r["split"], batches, ablate=[r["circuit"]])["loss"]
        assert r["mean_ablation_delta_loss"] == pytest.approx(removed - base, rel=1e-4, abs=1e-6)
        assert r["mean_write_norm"] > 0 and 0 <= r["on_rate"] <= 1
    assert set(thresholds) == {"train", "hard"} and len(examples) == 4
    ex = examples[0]
    assert len(ex["tokens"]) == len(ex["write_norm"]["X"]) == len(ex["delta_loss"]["Y"]) == len(ex["answer"])


def test_write_norm_is_the_circuits_write(run):
    """||g * write(norm(h))||: doubling X's write kernel doubles X's norms and leaves Y's (same bank,
    same input) unchanged; a gated-off circuit writes 0."""
    batch = run.eval_sets(["train"], EXAMPLES)["train"][0]
    stats = _token_stats(run.evaluator.graphdef)
    plan = dataclasses.replace(run.evaluator.plan(run.info.full_loops()), collect_norms=True)
    _, norms = jax.device_get(stats(run.params, batch, plan))
    doubled = jax.tree_util.tree_map_with_path(
        lambda p, x: 2 * x if "circuits']['X']['write" in jax.tree_util.keystr(p) else x, run.params)
    _, norms2 = jax.device_get(stats(doubled, batch, plan))
    np.testing.assert_allclose(norms2["X"], 2 * norms["X"], rtol=1e-5)
    np.testing.assert_array_equal(norms2["Y"], norms["Y"])
    off = dataclasses.replace(run.evaluator.plan(run.info.full_loops(), ["Y"]), collect_norms=True)
    _, norms_off = jax.device_get(stats(run.params, batch, off))
    assert np.all(np.asarray(norms_off["Y"]) == 0.0)


def test_on_rate_threshold():
    """On: write norm above ON_FRACTION of the largest per-circuit median over real tokens."""
    valid = np.array([[True, True, True, False]])
    act = SplitActivity(valid=valid, answer=valid, inputs=np.zeros((1, 4), int),
                        norms={"X": np.array([[10.0, 10.0, 0.5, 99.0]]), "Y": np.array([[2.0, 0.9, 1.1, 99.0]])},
                        delta={"X": np.array([[1.0, 2.0, 3.0, 0.0]]), "Y": np.zeros((1, 4))})
    assert act.threshold() == pytest.approx(ON_FRACTION * 10.0)  # medians: X 10, Y 1.1
    x, y = activity_rows("s", act)
    assert x == {"split": "s", "circuit": "X", "on_rate": pytest.approx(2 / 3), "mean_write_norm": pytest.approx(20.5 / 3),
                 "mean_ablation_delta_loss": pytest.approx(2.0)}
    assert y["on_rate"] == pytest.approx(2 / 3) and y["mean_ablation_delta_loss"] == 0.0


def test_the_plot_of_one_circuit_whose_tokens_are_partly_on(run):
    """#27 pass 21: `activity` on a run of one routed circuit (some tokens skipped, so partly on) failed drawing the
    outline of the tokens on: matplotlib's contour needs 2 x 2 cells ("Input z must be at least a (2, 2) shaped
    array"). Those tokens are now marked one by one."""
    from loopformer.evaluation import plots

    example = {"split": "train", "index": 0, "write_norm": {"X": [0.0, 1.0, 0.0, 2.0]}, "answer": [0, 1, 1, 1],
               "delta_loss": {"X": [0.0, 0.1, -0.2, 0.3]}}
    png = plots.activity([example], {"train": 0.5}, run.info, 7)
    assert png.startswith(b"\x89PNG")
