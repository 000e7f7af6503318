"""The looped transformer: unrolled equivalence, gates, slices, parameter counts, no recompiles."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from loopformer.analysis.evaluate import Evaluator
from loopformer.config import CircuitConfig, ModelConfig, StageConfig
from loopformer.model.layers import run_stack
from loopformer.model.transformer import build_model

VOCAB = 17


def two_circuit_cfg(mode="slice", inject="add", init="zeros", norm="pre", state_norm=False, **x_kw):
    x = CircuitConfig(name="X", depth=1, width=16, heads=2, read=mode, write=mode, inject=inject, init=init,
                      loops="uniform(2, 5)", eval_loops=3, backprop=2, state_norm=state_norm, **x_kw)
    y = CircuitConfig(name="Y", depth=2, width=16, heads=2, read=mode, write=mode, inject=inject, init=init,
                      loops="fixed(2)", eval_loops=2, backprop=2, state_norm=state_norm)
    return ModelConfig(d_model=32, heads=2, prelude=1, coda=1, norm=norm, stages=[StageConfig([x, y])])


def randomize_writes(model, seed=1):
    """At init, writes are zero and blocks near-identity; give every kernel O(1/sqrt(fan_in)) values
    so circuits change the output and more loops change it more."""
    key = jax.random.key(seed)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and path[-1] == "kernel":
            key, sub = jax.random.split(key)
            var.value = jax.random.normal(sub, var.value.shape) / np.sqrt(var.value.shape[-2])
    return model


@functools.partial(nnx.jit, static_argnames=("train", "trace_len"))
def forward(model, toks, loops=None, gates=None, fill=None, train=False, trace_len=0):
    """Jitted model call (eager op-by-op dispatch is ~100x slower on CPU)."""
    return model(toks, loops=loops, gates=gates, fill=fill, train=train, trace_len=trace_len)


def tokens(b=2, t=12, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, VOCAB)


def group_module(group, index):
    """The modules of circuit ``index`` of a stacked group, as plain (unstacked) nnx modules."""
    def take(module):
        gd, st = nnx.split(module)
        return nnx.merge(gd, jax.tree.map(lambda a: a[index], st))
    return {name: take(getattr(group, name)) for name in ("blocks", "out_norm", "write", "loop_norm")
            if hasattr(group, name)} | ({"adapter": take(group.adapter)} if hasattr(group, "adapter") else {})


@functools.partial(nnx.jit, static_argnames=("loops",))
def unrolled_forward(model, toks, loops):
    """Reference forward pass with every loop written as a Python for-loop, block by block."""
    B, T = toks.shape
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    x = model.embed(toks)
    x = run_stack(model.prelude, x, pos, None)
    for stage in model.stages:
        xn = stage.norm(x)
        update = jnp.zeros_like(x)
        for group in stage.groups:
            for i, name in enumerate(group.names):
                mods = group_module(group, i)
                o, w = group.offsets[i], group.width
                e = xn[..., o:o + w]
                h = jnp.zeros_like(e)
                blocks_gd, blocks_st = nnx.split(mods["blocks"])
                for _ in range(dict(loops)[name]):
                    h = h + e
                    for layer in range(group.depth):
                        block = nnx.merge(blocks_gd, jax.tree.map(lambda a, layer=layer: a[layer], blocks_st))
                        h = block(h, pos, None)
                    if "loop_norm" in mods:
                        h = mods["loop_norm"](h)
                out = mods["write"](mods["out_norm"](h))
                update = update.at[..., o:o + w].add(out)
        x = x + update
    x = run_stack(model.coda, x, pos, None)
    return model.embed.attend(model.final_norm(x))


@pytest.mark.parametrize("loops,state_norm", [({"X": 1, "Y": 1}, False), ({"X": 4, "Y": 2}, True),
                                              ({"X": 7, "Y": 3}, False)])
def test_loop_equals_python_unrolled(loops, state_norm):
    model = randomize_writes(build_model(two_circuit_cfg(state_norm=state_norm), VOCAB, seed=0))
    toks = tokens()
    got, _ = forward(model, toks, loops=model.loop_vector(loops))
    want = unrolled_forward(model, toks, tuple(loops.items()))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    # The training path (fori + checkpointed scan) computes the same function.
    got_train, _ = forward(model, toks, loops=model.loop_vector(loops), train=True)
    np.testing.assert_allclose(got_train, want, rtol=2e-4, atol=2e-4)


def test_loops_change_the_output():
    model = randomize_writes(build_model(two_circuit_cfg(), VOCAB, seed=0))
    a, _ = forward(model, tokens(), loops=model.loop_vector({"X": 2}))
    b, _ = forward(model, tokens(), loops=model.loop_vector({"X": 5}))
    assert float(jnp.abs(a - b).max()) > 1e-3


def test_param_count_independent_of_loop_counts():
    base = build_model(two_circuit_cfg(), VOCAB, seed=0).param_counts()
    cfg = two_circuit_cfg()
    cfg.stages[0].circuits[0].loops = "poisson_lognormal(30, 0.5)"
    cfg.stages[0].circuits[0].eval_loops = 50
    assert build_model(cfg, VOCAB, seed=0).param_counts() == base
    # Y (two blocks) has twice X's block parameters plus the same read/write/norm parameters.
    assert base["Y"] > base["X"]


def test_gate_zero_equals_model_without_circuit():
    cfg = two_circuit_cfg(mode="project")
    full = randomize_writes(build_model(cfg, VOCAB, seed=0))
    only_x_cfg = two_circuit_cfg(mode="project")
    only_x_cfg.stages[0].circuits = only_x_cfg.stages[0].circuits[:1]
    only_x = build_model(only_x_cfg, VOCAB, seed=5)
    # Copy every shared weight and X's weights into the model built without Y.
    full_params = nnx.to_pure_dict(nnx.state(full))
    small = nnx.to_pure_dict(nnx.state(only_x))
    small = jax.tree.map(lambda a: a, small)
    for key in small:
        if key != "stages":
            small[key] = full_params[key]
    small["stages"][0]["norm"] = full_params["stages"][0]["norm"]
    small["stages"][0]["groups"][0] = full_params["stages"][0]["groups"][0]  # X's group
    nnx.update(only_x, small)
    toks = tokens()
    gated, _ = forward(full, toks, gates=full.gate_vector(["Y"]))
    ungated, _ = forward(full, toks)
    without, _ = forward(only_x, toks)
    np.testing.assert_allclose(gated, without, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(gated - ungated).max()) > 1e-3


def test_fill_replaces_a_gated_circuit():
    model = randomize_writes(build_model(two_circuit_cfg(mode="project"), VOCAB, seed=0))
    toks = tokens()
    fill = jnp.zeros((2, 32)).at[1].set(0.5)
    a, _ = forward(model, toks, gates=model.gate_vector(["Y"]), fill=fill)
    b, _ = forward(model, toks, gates=model.gate_vector(["Y"]))
    assert float(jnp.abs(a - b).max()) > 1e-3


def test_slice_circuits_touch_only_their_slice():
    model = randomize_writes(build_model(two_circuit_cfg(), VOCAB, seed=0))
    stage = model.stages[0]
    x = jax.random.normal(jax.random.key(2), (2, 12, 32))
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    loops = model.loop_vector()
    for gates, cols in (([1.0, 0.0], slice(0, 16)), ([0.0, 1.0], slice(16, 32))):
        y, _ = stage(x, pos, None, loops, jnp.asarray(gates), None, train=False, key=jax.random.key(0))
        delta = np.abs(np.asarray(y - x))
        outside = np.ones(32, bool)
        outside[cols] = False
        assert delta[..., cols].max() > 1e-4
        assert delta[..., outside].max() == 0.0


@pytest.mark.parametrize("inject,init,norm", [("concat", "noise", "sandwich"), ("none", "input", "pre")])
def test_other_modes_run_and_are_finite(inject, init, norm):
    model = randomize_writes(build_model(two_circuit_cfg(inject=inject, init=init, norm=norm), VOCAB, seed=0))
    logits, aux = forward(model, tokens(), loops=model.loop_vector({"X": 40}), trace_len=4)
    assert logits.shape == (2, 12, VOCAB) and bool(jnp.all(jnp.isfinite(logits)))
    assert aux["trace/X"].shape == (4, 3)


def test_eval_loop_counts_and_gates_do_not_recompile():
    model = build_model(two_circuit_cfg(), VOCAB, seed=0)
    params = nnx.to_pure_dict(nnx.state(model))
    toks = np.asarray(tokens())
    batch = {"inputs": toks, "targets": toks, "mask": np.ones_like(toks, np.float32)}
    ev = Evaluator(model)
    for loops, ablate in [({}, ()), ({"X": 1}, ()), ({"X": 64, "Y": 9}, ()), ({"X": 1000}, ("Y",))]:
        ev.evaluate(params, [batch], loops, ablate)
    assert ev.compiles == 1


def test_describe_uses_circuit_notation():
    model = build_model(two_circuit_cfg(), VOCAB, seed=0)
    text = model.describe()
    assert "(X1)^3 ⊕ (Y1∘Y2)^2" in text
    counts = model.param_counts()
    assert f"{sum(counts.values()):,}" in text
    assert "effective depth at these loops: 6 blocks" in text  # 1 + max(1*3, 2*2) + 1


def test_stacked_group_runs_same_shape_circuits_batched():
    x = CircuitConfig(name="A", width=8, heads=2, eval_loops=2)
    y = CircuitConfig(name="B", width=8, heads=2, eval_loops=5)
    z = CircuitConfig(name="C", width=16, heads=2, eval_loops=1)
    cfg = ModelConfig(d_model=32, heads=2, prelude=0, coda=0, stages=[StageConfig([x, y, z])])
    model = build_model(cfg, VOCAB, seed=0)
    groups = model.stages[0].groups
    assert [g.names for g in groups] == [["A", "B"], ["C"]]
    assert groups[0].blocks.attn.qkv.kernel.value.shape[:2] == (2, 1)  # [circuit, depth, ...]
    logits, _ = forward(randomize_writes(model), tokens())
    assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("n", [1, 3, 6])
def test_windowed_circuit_reach_grows_with_loops(n):
    """A depth-1 circuit with window 2 moves information one position per iteration; prelude and coda
    with window 1 see only their own token. So a changed token at p changes outputs at p .. p + n."""
    x = CircuitConfig(name="X", depth=1, width=32, heads=2, window=2, loops="fixed(4)", eval_loops=4)
    cfg = ModelConfig(d_model=32, heads=2, prelude=1, coda=1, window=1, stages=[StageConfig([x])])
    model = randomize_writes(build_model(cfg, VOCAB, seed=0))
    a = tokens(b=1, t=16)
    b = a.at[0, 4].set((a[0, 4] + 1) % VOCAB)
    la, _ = forward(model, a, loops=model.loop_vector({"X": n}))
    lb, _ = forward(model, b, loops=model.loop_vector({"X": n}))
    changed = np.asarray(jnp.abs(la - lb).max(-1)[0] > 0)  # beyond the reach: bit-identical
    np.testing.assert_array_equal(np.flatnonzero(changed), np.arange(4, min(16, 4 + n + 1)))


@pytest.mark.parametrize("n", [1, 3])
def test_bidirectional_window_reaches_both_ways(n):
    """``causal: false`` with window 2: a changed token at p changes outputs at p - n .. p + n after
    n loops, and nothing else (the window reaches one token each way per iteration)."""
    x = CircuitConfig(name="X", depth=1, width=32, heads=2, window=2, loops="fixed(4)", eval_loops=4)
    cfg = ModelConfig(d_model=32, heads=2, prelude=1, coda=1, window=1, causal=False, stages=[StageConfig([x])])
    model = randomize_writes(build_model(cfg, VOCAB, seed=0))
    a = jnp.maximum(tokens(b=1, t=16), 1)  # no PAD: every token is real
    b = a.at[0, 8].set(a[0, 8] % (VOCAB - 1) + 1)
    la, _ = forward(model, a, loops=model.loop_vector({"X": n}))
    lb, _ = forward(model, b, loops=model.loop_vector({"X": n}))
    changed = np.asarray(jnp.abs(la - lb).max(-1)[0] > 0)
    np.testing.assert_array_equal(np.flatnonzero(changed), np.arange(8 - n, 8 + n + 1))


def test_bidirectional_ignores_right_padding():
    """Bidirectional attention sees the tokens after a position, but never padding: the outputs at
    real tokens do not depend on how much PAD follows (or on what the padded positions hold)."""
    x = CircuitConfig(name="X", depth=1, width=32, heads=2, window=0, loops="fixed(3)", eval_loops=3)
    cfg = ModelConfig(d_model=32, heads=2, prelude=1, coda=1, causal=False, stages=[StageConfig([x])])
    model = randomize_writes(build_model(cfg, VOCAB, seed=0))
    real = jnp.maximum(tokens(b=1, t=7), 1)
    short, _ = forward(model, jnp.pad(real, ((0, 0), (0, 3))))
    long, _ = forward(model, jnp.pad(real, ((0, 0), (0, 9))))
    np.testing.assert_allclose(np.asarray(short[0, :7]), np.asarray(long[0, :7]), rtol=1e-5, atol=1e-5)
    full, _ = forward(model, jnp.concatenate([real, jnp.maximum(tokens(b=1, t=3, seed=4), 1)], axis=1))
    assert float(jnp.abs(full[0, :7] - short[0, :7]).max()) > 1e-3  # real tokens there would matter
