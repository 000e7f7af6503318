"""Gradient routing: a routed example's gradient reaches only its route (exactly zero elsewhere), the
per-group split adds up to the full gradient, and parameters no entry may update stay frozen."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from loopformer.config import load_config
from loopformer.data.sources import build_data
from loopformer.errors import ConfigError
from loopformer.model.loop import sample_loops
from loopformer.model.plan import Plan
from loopformer.model.transformer import forward_batch
from loopformer.runs.restore import make_model
from loopformer.train.optim import learning_rate_schedule, make_optimizer
from loopformer.train.routing import Routing, owner, routed_grads
from loopformer.train.step import StepSettings, init_state, make_train_step
from tests.conftest import TASK_DEFAULTS, TINY, train_until_crash

# The tiny config, bidirectional with a coda layer, on a mixture (entries set per test).
ROUTED = [*TINY, *TASK_DEFAULTS, "model.coda=1", "model.causal=false", "model.stages.0.circuits.X.backprop=2",
          "model.stages.0.circuits.Y.eval_loops=2", "data.task=mixture", "train.warmup_steps=0", "train.grad_clip=0"]


def mixture(parity: str = "", maze: str = "") -> str:
    return ("data.mixture=[{task: prefix_parity, train_difficulty: [1, 4], eval_splits: {train: [1, 4]}" + parity
            + "}, {task: maze, task_args: {rows: 2}, train_difficulty: [1, 3], eval_splits: {train: [1, 3]}" + maze + "}]")


def setup(*extra):
    cfg = load_config("configs/quickstart.yaml", [*ROUTED, *extra])
    data = build_data(cfg)
    model = make_model(cfg, data)
    graphdef, params = nnx.split(model)
    batch = {k: jnp.asarray(v) for k, v in next(data.train_iterator(8, 0)).items()}
    assert set(np.asarray(batch["task"]).tolist()) == {0, 1}  # both entries in the batch
    # trained-looking weights (writes nonzero), so every circuit changes the output
    params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype),
                          nnx.to_pure_dict(params))
    return cfg, graphdef, params, batch


def rows_fn(cfg, graphdef, batch, row_weight=None):
    """Per-row CE over answer tokens (the step's objective before normalisation) at step 0's loops."""
    dists = {c.name: c.distribution() for c in cfg.model.circuits()}
    plan = Plan(loops=sample_loops(dists, 0, jnp.zeros((), jnp.int32)), gates={"X": jnp.ones(()), "Y": jnp.ones(())},
                key=jax.random.key(0), backprop=(("X", 2), ("Y", 1)))

    def f(p):
        logits, _ = forward_batch(nnx.merge(graphdef, p), batch, plan)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        rows = jnp.sum(ce * batch["mask"], axis=-1)
        return rows * (1.0 if row_weight is None else row_weight), None
    return f


def gradient(cfg, graphdef, batch, routing=None):
    """``(params, row_weight [B]) ->`` the gradient of the weighted per-row CE, routed by ``routing`` (None:
    plain), jitted: one program for every weighting (eager dispatch, op by op, is slow on CPU)."""
    def grad(params, row_weight):
        f = rows_fn(cfg, graphdef, batch, row_weight)
        if routing is None:
            return jax.grad(lambda p: f(p)[0].sum())(params)
        return routed_grads(f, params, batch["task"], routing)[0]
    return jax.jit(grad)


def leaves_by_owner(tree):
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out.setdefault(owner(path), []).append(np.asarray(leaf))
    return out


def test_a_routed_example_gives_exactly_zero_gradient_outside_its_route():
    cfg, graphdef, params, batch = setup(mixture(", route: [X], route_shared: false", ", route: [Y]"))
    routed, plain_grad = gradient(cfg, graphdef, batch, Routing.of(cfg)), gradient(cfg, graphdef, batch)
    parity_only = jnp.asarray(batch["task"] == 0, jnp.float32)
    grads, g_parity = routed(params, jnp.ones_like(parity_only)), routed(params, parity_only)
    by = leaves_by_owner(g_parity)
    # parity examples (route X, not shared): Y and every shared leaf get exactly 0.0, X does not
    assert all(np.all(g == 0.0) for g in by["Y"] + by[None])
    assert all(np.any(g != 0.0) for g in by["X"] if g.size > 1)
    # the maze rows' gradient on Y and on the shared leaves is the plain gradient of the maze rows alone
    maze_only = 1.0 - parity_only
    full, ref = leaves_by_owner(grads), leaves_by_owner(plain_grad(params, maze_only))
    for key in ("Y", None):
        for a, b in zip(full[key], ref[key], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # and X's is the parity rows' alone
    plain_x = leaves_by_owner(plain_grad(params, parity_only))
    for a, b in zip(full["X"], plain_x["X"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_routes_that_list_everything_give_the_unrouted_gradient():
    cfg, graphdef, params, batch = setup(mixture(", route: [X, Y]", ", route: [Y, X], route_shared: true"))
    routing = Routing.of(cfg)
    assert len(routing.groups) == 2  # two groups, both covering every leaf
    ones = jnp.ones(batch["task"].shape, jnp.float32)
    routed, plain = gradient(cfg, graphdef, batch, routing)(params, ones), gradient(cfg, graphdef, batch)(params, ones)
    for a, b in zip(jax.tree.leaves(routed), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-6)


def test_the_step_leaves_unrouted_and_frozen_parameters_unchanged():
    """Parity -> X and maze -> Y, both without the shared parameters: after a step (AdamW with weight
    decay) every shared leaf is bit-identical (frozen: no entry may update it), X and Y moved."""
    cfg, graphdef, params, batch = setup(mixture(", route: [X], route_shared: false",
                                                 ", route: [Y], route_shared: false"), "train.weight_decay=0.5")
    routing = Routing.of(cfg)
    description = routing.describe(params)
    tx = make_optimizer(cfg.train)
    step = make_train_step(graphdef, tx, StepSettings(cfg.model, learning_rate_schedule(cfg.train), cfg.seed,
                                                      routing=routing))
    before = leaves_by_owner(params)  # the step donates its state
    new, metrics = step(init_state(params, tx), batch)
    after = leaves_by_owner(new["params"])
    assert all(np.array_equal(a, b) for a, b in zip(before[None], after[None], strict=True))
    assert all(not np.array_equal(a, b) for k in ("X", "Y") for a, b in zip(before[k], after[k], strict=True))
    assert bool(metrics["finite"])
    assert f"frozen (no entry may update them): {len(before[None])} leaves" in description


def test_one_group_routing_a_circuit_alone_moves_only_that_circuit():
    """Every example routed to X (no shared): with plain SGD, only X's leaves change."""
    cfg, graphdef, params, batch = setup(mixture(", route: [X], route_shared: false",
                                                 ", route: [X], route_shared: false"))
    tx = optax.sgd(0.1)
    step = make_train_step(graphdef, tx, StepSettings(cfg.model, lambda s: 0.1, cfg.seed, routing=Routing.of(cfg)))
    before = leaves_by_owner(params)
    new, _ = step(init_state(params, tx), batch)
    after = leaves_by_owner(new["params"])
    assert all(np.array_equal(a, b) for k in ("Y", None) for a, b in zip(before[k], after[k], strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(before["X"], after["X"], strict=True))


def test_no_route_is_no_routing():
    cfg = load_config("configs/quickstart.yaml", [*ROUTED, mixture()])
    assert Routing.of(cfg) is None


@pytest.mark.parametrize("extra, message", [
    ([mixture(", route: [Z]")], r"data.mixture.prefix_parity.route: 'Z' is not a circuit; circuits are X, Y"),
    ([mixture(", route: [], route_shared: false")], r"updates nothing"),
    ([mixture(", route: [X]"), "model.stages.0.circuits.X.halting.kind=ouro"], r"circuit X has a halting head"),
    ([mixture(", name: maze")], r"two entries are named 'maze'"),
    (["data.mixture=[]"], r"data.task=mixture needs data.mixture"),
    ([mixture(", weight: 0")], r"data.mixture.prefix_parity.weight must be a finite number > 0, got 0"),
    ([mixture(", weight: .inf")], r"weight must be a finite number > 0, got inf"),  # #27 pass 20: "must be > 0, got inf"
])
def test_bad_routes_and_mixtures(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/quickstart.yaml", [*ROUTED, *extra])


@pytest.mark.slow  # two short training runs (about 60 s on 2 cores)
def test_a_routed_mixture_run_resumes_bit_exactly_and_may_change_its_routes(tmp_path, capsys, monkeypatch):
    from loopformer.errors import CheckpointError
    from loopformer.runs.scalars import read_metrics
    from loopformer.train.trainer import train

    def cfg(name, *extra):
        return load_config("configs/quickstart.yaml", [
            *ROUTED, mixture(", route: [X], route_shared: false", ", route: [Y]"), f"run.dir={tmp_path}",
            f"run.name={name}", "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=2",
            "eval.sweep_loops=[]", *extra])

    def losses(run_dir):
        return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}

    straight = train(cfg("a", "train.steps=4"))
    assert "gradient routing: prefix_parity -> X; maze -> Y + shared" in capsys.readouterr().out
    train_until_crash(cfg("b", "train.steps=4"), 2, monkeypatch)  # a crash after the step-2 checkpoint
    resumed = train(cfg("b", "train.steps=4"))
    assert losses(straight.run_dir) == losses(resumed.run_dir)  # exact: the mixed stream resumed from its state
    # weights and routes may change on resume (logged); an entry's task may not
    more = train(cfg("b", "train.steps=6", "data.mixture.maze.weight=3", "data.mixture.maze.route=[X, Y]"))
    out = capsys.readouterr().out
    assert more.step == 6 and "data.mixture.maze.weight: 1.0 -> 3.0 from step 4" in out
    assert "data.mixture.maze.route: ['Y'] -> ['X', 'Y'] from step 4" in out
    with pytest.raises(CheckpointError, match=r"different task \(data.mixture.maze.task_args.rows: 2 -> 3\)"):
        train(cfg("b", "train.steps=8", "data.mixture.maze.task_args={rows: 3}"))
