"""Analytic FLOPs against XLA's own count, and the training-FLOP rules for truncated loops."""

import jax
import numpy as np
import pytest
from flax import nnx

from loopformer.config import load_config
from loopformer.flops import FlopCounter
from loopformer.model.plan import make_plan
from loopformer.model.transformer import build_model


def test_flops_match_xla_cost_analysis():
    """Analytic forward FLOPs (attention counted without the causal saving, as XLA computes it) agree
    with XLA's own count for a model whose loops run once and stacks have depth 1 (XLA counts a loop
    body once)."""
    cfg = load_config("configs/quickstart.yaml", [
        "model.d_model=128", "model.heads=4", "model.prelude=1", "model.coda=1", "model.tie_embeddings=false",
        "model.stages=[{circuits: [{name: X, width: 64, heads: 2, loops: 'fixed(1)', eval_loops: 1}, "
        "{name: Y, width: 64, heads: 2, io: project, inject: concat, loops: 'fixed(1)', "
        "eval_loops: 1}]}]"]).model
    graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(cfg, 64, 0)))
    tokens = jax.ShapeDtypeStruct((2, 16), np.int32)
    plan = make_plan(["X", "Y"], {"X": 1, "Y": 1})
    fwd = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t, plan)[0])
    xla = fwd.lower(params, tokens).compile().cost_analysis()["flops"]
    ours = FlopCounter(cfg, 64, 16, causal=False).forward() * 2 * 16
    assert 0.95 * xla <= ours <= xla, (ours, xla)  # XLA also counts elementwise work (norms, softmax)


def test_train_flops_counting():
    cfg = load_config("configs/quickstart.yaml", [
        "model.d_model=64", "eval.sweep_circuits=[]",
        "model.stages=[{circuits: [{name: X, width: 64, heads: 2, loops: 'fixed(1)', backprop: 4}]}]"]).model
    c = FlopCounter(cfg, 64, 32)
    per_x = c.forward({"X": 1}) - c.forward({"X": 0})
    assert c.forward({"X": 8}) - c.forward({"X": 0}) == pytest.approx(8 * per_x)  # linear in loops
    outside = c.train({"X": 0})  # 3 x forward of everything outside the loop
    assert outside == pytest.approx(3 * c.forward({"X": 0}))
    # Useful work (MFU): n forward + 2 min(n, k) backward iterations.
    assert c.train({"X": 8}) - outside == pytest.approx((8 + 2 * 4) * per_x)
    assert c.train({"X": 2}) - outside == pytest.approx(3 * 2 * per_x)
    # Executed (HFU): the gradient scan always runs k masked iterations, each recomputed once.
    assert c.train({"X": 2}, hardware=True) - outside == pytest.approx((4 + 3 * 4) * per_x)
    assert c.train({"X": 8}, hardware=True) - outside == pytest.approx((8 + 3 * 4) * per_x)
    steps = c.train(np.asarray([[8], [2]]))
    assert steps.shape == (2,) and steps[0] == pytest.approx(c.train({"X": 8}))
    fwd = c.forward(np.asarray([[8], [2]]))  # per step too (the gate stage's MFU counts the forward only)
    assert fwd.shape == (2,) and fwd[1] == pytest.approx(c.forward({"X": 2}))
    with pytest.raises(KeyError, match="unknown circuits"):
        c.forward({"Z": 1})


def test_readout_flops_match_xla_for_the_coda_and_head():
    """One read of the logits (coda + head): the analytic count agrees with XLA's count of that program
    (coda depth 1: XLA counts a scanned stack's body once)."""
    cfg = load_config("configs/quickstart.yaml", ["model.d_model=128", "model.heads=4", "model.coda=1",
                                                  "model.tie_embeddings=false", "model.stages=[]",
                                                  "eval.sweep_circuits=[]", "train.iteration_loss=0"]).model
    graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(cfg, 64, 0)))
    model = nnx.merge(graphdef, params)
    pos = jax.ShapeDtypeStruct((2, 16), np.int32)
    x = jax.ShapeDtypeStruct((2, 16, 128), np.float32)

    def readout(m, x, pos):
        from loopformer.model.layers import run_stack

        return m.embed.attend(m.final_norm(run_stack(m.coda, x, pos, None)))

    xla = jax.jit(readout, static_argnums=()).lower(model, x, pos).compile().cost_analysis()["flops"]
    ours = FlopCounter(cfg, 64, 16, causal=False).readout() * 2 * 16
    assert 0.95 * xla <= ours <= xla, (ours, xla)


def test_routing_flops_match_xla_for_the_writes_and_scores():
    """One round of a routed stage outside its blocks (each circuit's write of its state and the router's
    scores of the normed stream, which every token gets at every round): the analytic count agrees with XLA's."""
    cfg = load_config("configs/adaptive/parity_router.yaml", [
        "model.stages.0.circuits=[{name: X, width: 64, heads: 4, window: 2}, "
        "{name: Y, width: 32, heads: 2, io: project, window: 2}]"]).model
    graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(cfg, 8, 0)))
    bank = nnx.merge(graphdef, params).stages[0]
    h = {"X": jax.ShapeDtypeStruct((2, 16, 64), np.float32), "Y": jax.ShapeDtypeStruct((2, 16, 32), np.float32)}
    x = jax.ShapeDtypeStruct((2, 16, 64), np.float32)

    def round_outside_blocks(bank, x, h):
        writes = [bank.circuits[n].emit(h[n]) for n in ("X", "Y")]
        stream = x + writes[0] + writes[1]  # X's slice is the whole stream here (width = d_model)
        return bank.router.score(bank.router.norm(stream))

    xla = jax.jit(round_outside_blocks).lower(bank, x, h).compile().cost_analysis()["flops"]
    ours = FlopCounter(cfg, 8, 16).routing() * 2 * 16
    assert 0.9 * xla <= ours <= xla, (ours, xla)  # XLA also counts the norms and the adds
    assert ours == 2 * 16 * (2 * 64 * 64 + 2 * 32 * 64 + 2 * 64 * 3)  # writes w x w (slice), w x d; 2 scores + exit
    assert FlopCounter(load_config("configs/quickstart.yaml").model, 8, 16).routing() == 0.0
