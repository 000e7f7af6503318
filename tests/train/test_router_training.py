"""A router trained briefly on a task keeps routing tokens through its circuit. The defect this catches: a
router whose estimator pushed every token to the exit at round 0 (both bench runs collapsed that way), which
`test_router_learns_through_the_selection` did not see (its gradient was non-zero all the same)."""

import pytest

from loopformer.config import load_config
from loopformer.data.sources import build_data
from loopformer.evaluation.evaluator import evaluator_for
from loopformer.runs.restore import restore_params
from loopformer.train.trainer import train


@pytest.mark.slow
def test_a_briefly_trained_router_does_not_exit_every_token_at_round_zero(tmp_path):
    cfg = load_config("configs/adaptive/parity_router.yaml", [
        f"run.dir={tmp_path}", "train.steps=300", "train.warmup_steps=30", "train.eval_every=0",
        "train.checkpoint_every=300", "train.log_every=100", "data.eval_examples=64"])
    train(cfg)
    data = build_data(cfg)
    model, params, _ = restore_params(cfg, data=data)
    batches = data.eval_sets(["train"], 64, 64)["train"]
    m = evaluator_for(model).evaluate(params, batches, {"X": 12})
    # every token exiting at round 0 runs X 0 times; a router that routes runs it for several rounds
    assert m["mean_loops"]["X"] >= 2.0, m["mean_loops"]
