"""The looped transformer: unrolled equivalence, gates, slices, weights by name, no recompiles."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from loopformer.config import CircuitConfig, ModelConfig, StageConfig
from loopformer.evaluation.evaluator import Evaluator
from loopformer.model.circuit import Context
from loopformer.model.describe import describe
from loopformer.model.layers import run_stack
from loopformer.model.plan import make_plan, resolve_loops
from loopformer.model.transformer import build_model

VOCAB = 17


def two_circuit_cfg(io="slice", inject="add", init="zeros", norm="pre", state_norm=False, **x_kw):
    x = CircuitConfig(name="X", depth=1, width=16, heads=2, io=io, inject=inject, init=init,
                      loops="uniform(2, 5)", eval_loops=3, backprop=2, state_norm=state_norm, **x_kw)
    y = CircuitConfig(name="Y", depth=2, width=16, heads=2, io=io, inject=inject, init=init,
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


@functools.partial(nnx.jit, static_argnames=("backprop", "trace_len"))
def _forward(model, toks, loops, gates, fills, segments, backprop=(), trace_len=0):
    plan = make_plan(model.circuit_names, loops, backprop=dict(backprop), trace_len=trace_len)
    plan = dataclasses.replace(plan, gates=gates, fills=fills)
    return model(toks, plan, segment_ids_BT=segments)


def forward(model, toks, loops=None, ablate=(), fill=None, train=False, trace_len=0, segments=None, cfg=None):
    """Jitted model call (eager op-by-op dispatch is ~100x slower on CPU) at ``loops`` (default: eval_loops)."""
    cfg = cfg or two_circuit_cfg()
    names = model.circuit_names
    full = resolve_loops({c.name: c.eval_loops for c in cfg.circuits() if c.name in names}, loops)
    gates = {n: jnp.asarray(0.0 if n in ablate else 1.0) for n in names}
    fills = None if fill is None else {n: jnp.asarray(fill[i]) for i, n in enumerate(names)}
    backprop = tuple((c.name, c.backprop) for c in cfg.circuits()) if train else ()
    return _forward(model, toks, {n: jnp.asarray(v) for n, v in full.items()}, gates, fills, segments,
                    backprop=backprop, trace_len=trace_len)


def tokens(b=2, t=12, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, VOCAB)


def shapes(model):
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): x.shape for p, x in flat}


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
        o = 0
        for name in stage.names:
            circuit = stage.circuits[name]
            w = circuit.write.kernel.value.shape[0]
            e = xn[..., o:o + w]
            h = jnp.zeros_like(e)
            blocks_gd, blocks_st = nnx.split(circuit.blocks)
            depth = jax.tree.leaves(blocks_st)[0].shape[0]
            for _ in range(dict(loops)[name]):
                h = h + e
                for layer in range(depth):
                    block = nnx.merge(blocks_gd, jax.tree.map(lambda a, layer=layer: a[layer], blocks_st))
                    h = block(h, pos, None)
                if hasattr(circuit, "loop_norm"):
                    h = circuit.loop_norm(h)
            update = update.at[..., o:o + w].add(circuit.write(circuit.out_norm(h)))
            o += w
        x = x + update
    x = run_stack(model.coda, x, pos, None)
    return model.embed.attend(model.final_norm(x))


@pytest.mark.parametrize("loops,state_norm", [({"X": 1, "Y": 1}, False), ({"X": 4, "Y": 2}, True),
                                              ({"X": 7, "Y": 3}, False)])
def test_loop_equals_python_unrolled(loops, state_norm):
    model = randomize_writes(build_model(two_circuit_cfg(state_norm=state_norm), VOCAB, seed=0))
    toks = tokens()
    got, _ = forward(model, toks, loops)
    want = unrolled_forward(model, toks, tuple(loops.items()))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    # The training path (fori + checkpointed scan) computes the same function.
    got_train, _ = forward(model, toks, loops, train=True)
    np.testing.assert_allclose(got_train, want, rtol=2e-4, atol=2e-4)


def test_loops_change_the_output():
    model = randomize_writes(build_model(two_circuit_cfg(), VOCAB, seed=0))
    a, _ = forward(model, tokens(), {"X": 2})
    b, _ = forward(model, tokens(), {"X": 5})
    assert float(jnp.abs(a - b).max()) > 1e-3


def test_weights_are_stored_by_circuit_name():
    params = shapes(build_model(two_circuit_cfg(), VOCAB, seed=0))
    assert params["stages/0/circuits/X/blocks/attn/qkv/kernel"] == (1, 16, 48)  # [depth, in, out]
    assert params["stages/0/circuits/Y/blocks/attn/qkv/kernel"] == (2, 16, 48)
    assert params["stages/0/circuits/X/write/kernel"] == (16, 16)
    assert not any("groups" in p for p in params)


@pytest.mark.parametrize("change", [dict(backprop=9), dict(init="noise"), dict(window=3), dict(loops="fixed(30)"),
                                    dict(eval_loops=50), dict(max_loops=7), dict(init_noise_std=0.1)])
def test_loop_schedule_and_behaviour_leave_weights_unchanged(change):
    """Paths and shapes depend on the architecture only: a circuit's schedule or behaviour never moves a weight."""
    base = shapes(build_model(two_circuit_cfg(), VOCAB, seed=0))
    cfg = two_circuit_cfg()
    cfg.stages[0].circuits[0] = dataclasses.replace(cfg.stages[0].circuits[0], **change)
    assert shapes(build_model(cfg, VOCAB, seed=0)) == base


def test_param_count_by_circuit():
    counts = build_model(two_circuit_cfg(), VOCAB, seed=0).param_counts()
    assert counts["Y"] > counts["X"]  # two blocks against one, the same read/write/norms
    blocks = lambda w: 4 * w * w + 2 * 4 * w * w + 2 * w  # noqa: E731 attn qkv+out, MLP up+down, two norms
    assert counts["X"] == blocks(16) + 16 + 16 * 16  # + out_norm + write
    assert counts["Y"] == 2 * blocks(16) + 16 + 16 * 16


def test_gate_zero_equals_model_without_circuit():
    cfg = two_circuit_cfg(io="project")
    full = randomize_writes(build_model(cfg, VOCAB, seed=0))
    only_x_cfg = two_circuit_cfg(io="project")
    only_x_cfg.stages[0].circuits = only_x_cfg.stages[0].circuits[:1]
    only_x = build_model(only_x_cfg, VOCAB, seed=5)
    # Every weight of the smaller model has the same path in the full one (circuits are stored by name).
    full_params = nnx.to_pure_dict(nnx.state(full))
    small = nnx.to_pure_dict(nnx.state(only_x))
    small = jax.tree_util.tree_map_with_path(
        lambda p, _: functools.reduce(lambda d, k: d[k.key], p, full_params), small)
    nnx.update(only_x, small)
    toks = tokens()
    gated, _ = forward(full, toks, ablate=["Y"])
    ungated, _ = forward(full, toks)
    without, _ = forward(only_x, toks, cfg=only_x_cfg)
    np.testing.assert_allclose(gated, without, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(gated - ungated).max()) > 1e-3


def test_fill_replaces_a_gated_circuit():
    model = randomize_writes(build_model(two_circuit_cfg(io="project"), VOCAB, seed=0))
    toks = tokens()
    fill = jnp.zeros((2, 32)).at[1].set(0.5)
    a, _ = forward(model, toks, ablate=["Y"], fill=fill)
    b, _ = forward(model, toks, ablate=["Y"])
    assert float(jnp.abs(a - b).max()) > 1e-3


def test_slice_circuits_touch_only_their_slice():
    model = randomize_writes(build_model(two_circuit_cfg(), VOCAB, seed=0))
    stage = model.stages[0]
    x = jax.random.normal(jax.random.key(2), (2, 12, 32))
    ctx = Context(jnp.broadcast_to(jnp.arange(12), (2, 12)), None, None)
    for removed, cols in ((["Y"], slice(0, 16)), (["X"], slice(16, 32))):
        plan = make_plan(["X", "Y"], {"X": 3, "Y": 2}, ablate=removed)
        y = stage(x, ctx, plan)[0]
        delta = np.abs(np.asarray(y - x))
        outside = np.ones(32, bool)
        outside[cols] = False
        assert delta[..., cols].max() > 1e-4
        assert delta[..., outside].max() == 0.0


def same_weights(cfgs):
    """One randomised model per config, all with the first one's weights (the configs differ in behaviour only)."""
    models = [build_model(cfg, VOCAB, seed=0) for cfg in cfgs]
    randomize_writes(models[0])
    for m in models[1:]:
        nnx.update(m, nnx.state(models[0]))
    return models


def check_long_run_is_finite(model, cfg):
    logits, diag = forward(model, tokens(), {"X": 40}, trace_len=4, cfg=cfg)
    assert logits.shape == (2, 12, VOCAB) and bool(jnp.all(jnp.isfinite(logits)))
    assert diag.circuits["X"].trace.shape == (4, 3) and diag.circuits["X"].mean_out is None


def test_a_noise_start_of_spread_zero_is_the_zero_start():
    """init noise (concat injection, sandwich norm): h_0 ~ N(0, init_noise_std^2) gives the zero start's
    logits at spread 0 and other logits at spread 1 (Y gated off: only X's start differs); finite at 40 loops."""
    cfgs = [two_circuit_cfg(inject="concat", norm="sandwich", init=init, init_noise_std=std)
            for init, std in (("zeros", 1.0), ("noise", 0.0), ("noise", 1.0))]
    zeros, spread0, spread1 = (forward(m, tokens(), {"X": 2}, ablate=["Y"], cfg=c)[0]
                               for m, c in zip(same_weights(cfgs), cfgs, strict=True))
    np.testing.assert_allclose(spread0, zeros, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(spread1 - zeros).max()) > 1e-3
    check_long_run_is_finite(same_weights(cfgs[2:])[0], cfgs[2])


def test_no_injection_from_the_input_start():
    """inject none, init input: h_0 = e, h_i = stack(h_{i-1}). At one loop that is stack(e), the logits of
    add from zeros (stack(0 + e)); at three it is not (add puts e back every iteration); finite at 40 loops."""
    cfgs = [two_circuit_cfg(), two_circuit_cfg(inject="none", init="input")]
    add, none = same_weights(cfgs)
    for loops, same in (({"X": 1, "Y": 1}, True), ({"X": 3, "Y": 1}, False)):
        a, b = forward(add, tokens(), loops, cfg=cfgs[0])[0], forward(none, tokens(), loops, cfg=cfgs[1])[0]
        if same:
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
        else:
            assert float(jnp.abs(b - a).max()) > 1e-3
    check_long_run_is_finite(none, cfgs[1])


def test_eval_loop_counts_and_gates_do_not_recompile():
    model = build_model(two_circuit_cfg(), VOCAB, seed=0)
    params = nnx.to_pure_dict(nnx.state(model))
    toks = np.asarray(tokens())
    batch = {"inputs": toks, "targets": toks, "mask": np.ones_like(toks, np.float32)}
    ev = Evaluator(nnx.graphdef(model), model.circuit_names, 32)
    for loops, ablate in [({"X": 3, "Y": 2}, ()), ({"X": 1, "Y": 2}, ()), ({"X": 64, "Y": 9}, ()),
                          ({"X": 1000, "Y": 2}, ("Y",))]:
        ev.evaluate(params, [batch], loops, ablate)
    assert ev.compiles == 1


def test_describe_uses_circuit_notation():
    cfg = two_circuit_cfg()
    model = build_model(cfg, VOCAB, seed=0)
    counts = model.param_counts()
    text = describe(cfg, VOCAB, counts)
    assert "(X1)^3 ⊕ (Y1∘Y2)^2" in text
    assert f"{sum(counts.values()):,}" in text
    assert "effective depth at these loops: 6 blocks" in text  # 1 + max(1*3, 2*2) + 1


def test_describe_names_a_stages_router_and_a_circuits_halting_head():
    """#27 pass 17: `inspect` (and training's first lines) described a routed stage and a halting circuit as plain
    loops, and inspect's JSON left the router out."""
    from loopformer.config.schema import HaltingConfig, RouterConfig

    x = CircuitConfig(name="X", width=16, heads=2, loops="uniform(2, 5)", max_loops=5, eval_loops=3, backprop=2)
    routed = ModelConfig(d_model=16, heads=2, stages=[StageConfig([x], router=RouterConfig(
        kind="expert_choice", capacities=[1.0, 0.5], backprop=2))])
    text = describe(routed, VOCAB, build_model(routed, VOCAB, seed=0).param_counts())
    assert "stage 1: (X1)^3  router expert_choice (capacity 0.5, capacities [1.0, 0.5], aux 0.001, compute 0.0, " \
           "backprop 2, window bank, inputs [])" in text
    halting = dataclasses.replace(x, halting=HaltingConfig(kind="ouro"))
    cfg = ModelConfig(d_model=16, heads=2, stages=[StageConfig([halting])])
    assert "  halting ouro" in describe(cfg, VOCAB, build_model(cfg, VOCAB, seed=0).param_counts())


def same_shape_cfg():
    a = CircuitConfig(name="A", width=8, heads=2, eval_loops=2, backprop=2)
    b = CircuitConfig(name="B", width=8, heads=2, eval_loops=5, backprop=2)
    c = CircuitConfig(name="C", width=16, heads=2, eval_loops=1, backprop=2)
    return ModelConfig(d_model=32, heads=2, prelude=0, coda=0, stages=[StageConfig([a, b, c])])


def test_same_shape_circuits_run_batched_and_match_running_apart():
    cfg = same_shape_cfg()
    batched = randomize_writes(build_model(cfg, VOCAB, seed=0))
    apart = randomize_writes(build_model(cfg, VOCAB, seed=0, batch_circuits=False))
    plan = make_plan(batched.circuit_names, {"A": 2, "B": 5, "C": 1})
    assert batched.stages[0].groups(plan) == [["A", "B"], ["C"]]
    assert apart.stages[0].groups(plan) == [["A"], ["B"], ["C"]]
    for train in (False, True):
        a, _ = forward(batched, tokens(), {"A": 2, "B": 5, "C": 1}, train=train, cfg=cfg)
        b, _ = forward(apart, tokens(), {"A": 2, "B": 5, "C": 1}, train=train, cfg=cfg)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # A different truncation depth keeps circuits apart (the scan length is static).
    assert batched.stages[0].groups(dataclasses.replace(plan, backprop=(("A", 1), ("B", 2)))) == [["A"], ["B"], ["C"]]


def test_gradients_of_batched_circuits_equal_running_apart():
    cfg = same_shape_cfg()
    models = [randomize_writes(build_model(cfg, VOCAB, seed=0, batch_circuits=b)) for b in (True, False)]

    def grads(model):
        graphdef, params = nnx.split(model)

        def loss(p):
            plan = make_plan(model.circuit_names, {"A": 3, "B": 2, "C": 2}, backprop={"A": 2, "B": 2, "C": 2})
            return jnp.sum(nnx.merge(graphdef, p)(tokens(), plan)[0] ** 2)

        return nnx.to_pure_dict(jax.jit(jax.grad(loss))(params))

    ga, gb = (grads(m) for m in models)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(ga["stages"][0]["circuits"]["B"]["write"]["kernel"]).max()) > 0


@pytest.mark.parametrize("n", [1, 3, 6])
def test_windowed_circuit_reach_grows_with_loops(n):
    """A depth-1 circuit with window 2 moves information one position per iteration; prelude and coda
    with window 1 see only their own token. So a changed token at p changes outputs at p .. p + n."""
    x = CircuitConfig(name="X", depth=1, width=32, heads=2, window=2, loops="fixed(4)", eval_loops=4)
    cfg = ModelConfig(d_model=32, heads=2, prelude=1, coda=1, window=1, stages=[StageConfig([x])])
    model = randomize_writes(build_model(cfg, VOCAB, seed=0))
    a = tokens(b=1, t=16)
    b = a.at[0, 4].set((a[0, 4] + 1) % VOCAB)
    la, _ = forward(model, a, {"X": n}, cfg=cfg)
    lb, _ = forward(model, b, {"X": n}, cfg=cfg)
    changed = np.asarray(jnp.abs(la - lb).max(-1)[0] > 0)  # beyond the reach: bit-identical
    np.testing.assert_array_equal(np.flatnonzero(changed), np.arange(4, min(16, 4 + n + 1)))


@pytest.mark.parametrize("n", [1, 3])
def test_bidirectional_window_reaches_both_ways(n):
    """``causal: false`` with window 2: a changed token at p changes outputs at p - n .. p + n after
    n loops, and nothing else (the window reaches one token each way per iteration)."""
    x = CircuitConfig(name="X", depth=1, width=32, heads=2, window=2, loops="fixed(4)", eval_loops=4)
    cfg = ModelConfig(d_model=32, heads=2, prelude=1, coda=1, window=1, causal=False, stages=[StageConfig([x])])
    model = randomize_writes(build_model(cfg, VOCAB, seed=0))
    a = tokens(b=1, t=16)
    b = a.at[0, 8].set((a[0, 8] + 1) % VOCAB)
    la, _ = forward(model, a, {"X": n}, cfg=cfg)
    lb, _ = forward(model, b, {"X": n}, cfg=cfg)
    changed = np.asarray(jnp.abs(la - lb).max(-1)[0] > 0)
    np.testing.assert_array_equal(np.flatnonzero(changed), np.arange(8 - n, 8 + n + 1))


def test_bidirectional_ignores_padding_marked_in_the_batch():
    """Bidirectional attention sees the tokens after a position, but never padding (segment 0): the
    outputs at real tokens do not depend on how much padding follows or what it holds."""
    x = CircuitConfig(name="X", depth=1, width=32, heads=2, window=0, loops="fixed(3)", eval_loops=3)
    cfg = ModelConfig(d_model=32, heads=2, prelude=1, coda=1, causal=False, stages=[StageConfig([x])])
    model = randomize_writes(build_model(cfg, VOCAB, seed=0))
    real = tokens(b=1, t=7)

    def padded(extra, seed):
        toks = jnp.concatenate([real, tokens(b=1, t=extra, seed=seed)], axis=1)
        return forward(model, toks, cfg=cfg, segments=(jnp.arange(7 + extra) < 7)[None].astype(jnp.int32))[0]

    short, long = padded(3, 1), padded(9, 2)
    np.testing.assert_allclose(np.asarray(short[0, :7]), np.asarray(long[0, :7]), rtol=1e-5, atol=1e-5)
    unmarked, _ = forward(model, jnp.concatenate([real, tokens(b=1, t=3, seed=1)], axis=1), cfg=cfg)
    assert float(jnp.abs(unmarked[0, :7] - short[0, :7]).max()) > 1e-3  # real tokens there would matter


def test_plain_transformer_without_stages():
    cfg = ModelConfig(d_model=32, heads=2, prelude=2, coda=0, stages=[])
    model = build_model(cfg, VOCAB, seed=0)
    logits, diag = forward(model, tokens(), cfg=cfg)
    assert logits.shape == (2, 12, VOCAB) and diag.circuits == {}
    assert model.param_counts() == {"shared": sum(int(np.prod(s)) for s in shapes(model).values())}
