"""Ouro stage II (train.stage=gate): only the halting head moves, on the per-step loss improvement."""

import jax
import numpy as np
import pytest
from flax import nnx

from loopformer.data.sources import build_data
from loopformer.errors import ConfigError
from loopformer.runs.restore import make_model
from loopformer.train.losses import gate_leaves
from loopformer.train.optim import make_optimizer
from loopformer.train.step import StepSettings, init_state, make_train_step
from tests.conftest import tiny_config

X = "model.stages.0.circuits.X"
HEAD = (f"{X}.halting.kind=ouro", f"{X}.loops=fixed(3)", f"{X}.max_loops=3")


def _steps(cfg, batch, n):
    model = make_model(cfg, build_data(cfg))
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    tx = make_optimizer(cfg.train)
    step = make_train_step(graphdef, tx, StepSettings.of(cfg))
    state, first = init_state(params, tx), None
    start = jax.tree.map(np.asarray, params)
    for _ in range(n):
        state, m = step(state, batch)
        first = first or jax.tree.map(np.asarray, m)
    return start, jax.tree.map(np.asarray, state["params"]), first, jax.tree.map(np.asarray, m)


def test_gate_stage_moves_only_the_halting_head_and_lowers_its_loss(tmp_path):
    cfg = tiny_config(tmp_path, "g", *HEAD, "train.stage=gate", "train.lr=0.05", "train.warmup_steps=0")
    batch = next(build_data(cfg).train_iterator(8, 0))
    start, end, first, last = _steps(cfg, batch, 8)
    gate = gate_leaves(start, "X")
    moved = {jax.tree_util.keystr(p): not np.array_equal(a, b) for (p, a), b, in
             zip(jax.tree_util.tree_flatten_with_path(start)[0], jax.tree.leaves(end), strict=True)}
    heads = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_flatten_with_path(gate)[0] if g]
    assert sorted(heads) == sorted(k for k in moved if "['halt']" in k) and len(heads) == 2
    assert all(moved[k] for k in heads)  # the head trains ...
    assert not any(v for k, v in moved.items() if k not in heads)  # ... and nothing else, weight decay included
    assert float(first["loss"]) == pytest.approx(float(last["loss"]), rel=1e-6)  # the LM's CE cannot change
    assert float(last["halting/gate_bce"]) < float(first["halting/gate_bce"])
    # the objective is the gate's BCE alone
    assert float(first["objective"]) == pytest.approx(float(first["halting/gate_bce"]), rel=1e-5)


def test_gate_stage_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="train.stage must be one of all, gate"):
        tiny_config(tmp_path, "a", "train.stage=head")
    with pytest.raises(ConfigError, match="train.stage=gate trains a halting head .* no circuit has one"):
        tiny_config(tmp_path, "b", "train.stage=gate")
    with pytest.raises(ConfigError, match="halting.kind=act reads its head as halting mass"):
        tiny_config(tmp_path, "c", *HEAD, f"{X}.halting.kind=act", "train.stage=gate")
    for bad in ("gate_k=0", "gate_k=inf", "gate_gamma=-1", "gate_gamma=nan"):
        with pytest.raises(ConfigError, match=f"halting.{bad.split('=')[0]} must be a finite number"):
            tiny_config(tmp_path, "d", *HEAD, f"{X}.halting.{bad}")
    assert tiny_config(tmp_path, "e", *HEAD, "train.stage=gate").train.stage == "gate"


def test_the_gate_stage_trains_on_from_a_checkpoint_and_logs(tmp_path):
    """Through the trainer: stage I, then a resume in the gate stage logs every step (its MFU counts the
    forward only) and saves; a fresh run cannot start in the gate stage (its LM would be random)."""
    from loopformer.runs.scalars import read_metrics
    from loopformer.train.trainer import train

    common = (*HEAD, "train.eval_every=0", "train.log_every=1", "train.checkpoint_every=2", "data.eval_examples=16",
              "eval.sweep_loops=[]")
    with pytest.raises(ConfigError, match="train.stage=gate trains the exit gate of a trained model, but .* has no "
                                          "checkpoint: train it first"):
        train(tiny_config(tmp_path, "fresh", *common, "train.steps=2", "train.stage=gate"))
    train(tiny_config(tmp_path, "g", *common, "train.steps=2"))
    train(tiny_config(tmp_path, "g", *common, "train.steps=4", "train.stage=gate"))
    rows = read_metrics(tmp_path / "g")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all("train/halting/gate_bce" in r and r["train/mfu"] > 0 for r in rows[2:])
    assert (tmp_path / "g" / "checkpoints" / "4").exists()
