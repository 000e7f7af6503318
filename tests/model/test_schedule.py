"""Layer schedules: a stack runs any order of its layers, gathered inside one scan; one program for
every schedule of one length; the duplication made permanent (surgery) computes the same."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from loopformer.config import ModelConfig
from loopformer.errors import PlanError
from loopformer.evaluation.evaluator import Evaluator
from loopformer.model.plan import make_plan
from loopformer.model.schedule import duplication, longest, padded, ranges
from loopformer.model.transformer import build_model
from loopformer.surgery.duplicate import duplicated
from tests.model.test_model import randomize_writes, tokens

PLAIN = ModelConfig(d_model=32, heads=4, kv_heads=2, prelude=4, coda=0, stages=[], mlp="swiglu")


def plain(cfg=PLAIN, seed=0):
    return randomize_writes(build_model(cfg, 17, seed), seed=seed)


def logits(model, toks, schedules=None):
    return np.asarray(nnx.jit(lambda m, t, s: m(t, make_plan([], {}, schedules=s))[0])(model, toks, schedules or {}))


def test_duplication_orders():
    assert duplication(6, 2, 4, 1) == [0, 1, 2, 3, 2, 3, 4, 5]
    assert duplication(6, 0, 6, 2) == list(range(6)) * 3
    assert duplication(6, 3, 4, 0) == list(range(6))
    assert len(list(ranges(6))) == 21 and longest(6, [1, 3]) == 24
    assert padded([0, 1], 4).tolist() == [0, 1, -1, -1]
    with pytest.raises(PlanError, match="not inside"):
        duplication(6, 4, 4)


def test_identity_schedule_with_padding_is_the_plain_forward():
    model, toks = plain(), tokens()
    np.testing.assert_allclose(logits(model, toks, {"prelude": padded(range(4), 9)}), logits(model, toks), atol=1e-6)


@pytest.mark.parametrize("block,repeats", [((1, 3), 1), ((0, 4), 1), ((2, 3), 3)])
def test_a_schedule_equals_the_duplicated_model(block, repeats):
    """Running [0..j-1, (i..j-1) x r, j..] through the schedule = a model whose stack holds those copies."""
    model, toks = plain(), tokens()
    order = duplication(4, *block, repeats)
    cfg, params = duplicated(PLAIN, nnx.to_pure_dict(nnx.state(model)), "prelude", order)
    assert cfg.prelude == len(order)
    big = nnx.eval_shape(lambda: build_model(cfg, 17, 0))
    state = nnx.state(big)
    nnx.replace_by_pure_dict(state, jax_tree_unflatten(nnx.to_pure_dict(state), params))
    nnx.update(big, state)
    np.testing.assert_allclose(logits(model, toks, {"prelude": padded(order, 16)}), logits(big, toks), atol=2e-5)


def jax_tree_unflatten(abstract, flat):
    from loopformer.surgery.naming import fill

    return fill(abstract, flat)


def test_every_schedule_of_one_length_shares_one_program():
    model = plain()
    ev = Evaluator(nnx.graphdef(model), [], PLAIN.d_model)
    params = nnx.state(model)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 17, (4, 10)).astype(np.int32)
    batch = {"inputs": toks, "targets": toks, "mask": np.ones_like(toks, np.float32)}
    losses = {ev.evaluate(params, [batch], {}, schedules={"prelude": padded(duplication(4, i, j, 1), 8)})["loss"]
              for i, j in ranges(4)}
    assert ev.compiles == 1 and len(losses) > 1


def test_schedules_only_for_plain_stacks():
    with pytest.raises(PlanError, match="prelude and coda"):
        make_plan([], {}, schedules={"X": jnp.zeros(2, jnp.int32)})


def test_coda_schedule():
    cfg = dataclasses.replace(PLAIN, prelude=1, coda=3)
    model, toks = plain(cfg), tokens()
    a = logits(model, toks, {"coda": padded([0, 1, 1, 2], 4)})
    assert not np.allclose(a, logits(model, toks))
