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
    with pytest.raises(ConfigError, match="halting.gate_k must be > 0"):
        tiny_config(tmp_path, "d", *HEAD, f"{X}.halting.gate_k=0")
    assert tiny_config(tmp_path, "e", *HEAD, "train.stage=gate").train.stage == "gate"
