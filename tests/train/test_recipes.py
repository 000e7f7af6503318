"""The think-longer recipes: progressive loss, the loss at each iteration of a window, loop counts per
difficulty, the difficulty curriculum.

Each test checks numbers against a reference: a traced gradient depth equals the static one, alpha 0 is
the plain objective, a window's states are the runs to n - j with their own gradient depth and its loss the
mean of their losses, per-difficulty counts equal running each example alone at its count, and a
curriculum's stream is a function of (seed, index) that follows its stages.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from loopformer.cli.eval import auto_rules
from loopformer.cli.loopspec import split_auto
from loopformer.config import LoopDistribution, load_config
from loopformer.data import pipeline
from loopformer.data.sources import build_data
from loopformer.data.tasks import make_task
from loopformer.errors import ConfigError, PlanError
from loopformer.evaluation.evaluator import evaluator_for
from loopformer.metrics import answer_sums
from loopformer.model.loop import iterate, iterate_window
from loopformer.model.plan import CircuitReport, Diagnostics, difficulty_rules, make_plan
from loopformer.model.transformer import forward_batch
from loopformer.runs.restore import make_model
from loopformer.train.losses import iteration_terms, settle_terms
from loopformer.train.optim import make_optimizer
from loopformer.train.step import StepSettings, _Objective, init_state, make_train_step, progressive_plan
from loopformer.variants.exits import latent_change, latent_change_sq
from tests.conftest import TASK_DEFAULTS, tiny_config

X = "model.stages.0.circuits.X"
Y = "model.stages.0.circuits.Y"


def _step(consts, h):
    w, e = consts
    return jnp.tanh(h @ w + e)


def _consts(width=8):
    kw, ke = jax.random.split(jax.random.key(0))
    return jax.random.normal(kw, (width, width)) / np.sqrt(width), jax.random.normal(ke, (3, width))


# ----------------------------------------------------------------------------- progressive loss


@pytest.mark.parametrize(("n", "g"), [(7, 1), (7, 3), (2, 3), (5, 4)])
def test_a_traced_gradient_depth_equals_the_static_one(n, g):
    """iterate(k=4, grad=g) is iterate(k=min(g, 4)): same state, same gradients (weights and h0)."""
    consts, h0 = _consts(), jax.random.normal(jax.random.key(1), (3, 8))

    def loss(c, h, k, grad):
        return jnp.sum(iterate(_step, c, h, jnp.int32(n), k, grad=grad) ** 2)

    ref = jax.value_and_grad(loss, argnums=(0, 1))(consts, h0, min(g, 4), None)
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)(consts, h0, 4, jnp.int32(g))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_gradient_depth_per_token_is_each_tokens_own_truncation():
    """Per-token counts and depths: each row's value and h0-gradient equal a scalar run at its (n, g)."""
    consts, h0 = _consts(), jax.random.normal(jax.random.key(1), (3, 8))
    n, g = jnp.array([6, 2, 5], jnp.int32), jnp.array([2, 2, 4], jnp.int32)
    got = jax.jacrev(lambda h: iterate(_step, consts, h, n, 4, bound=8, grad=g))(h0)  # [3, 8, 3, 8]
    for r in range(3):
        ref = jax.jacrev(lambda h, r=r: iterate(_step, consts, h, n[r], 4, grad=g[r])[r])(h0)
        np.testing.assert_allclose(got[r], ref, rtol=1e-5, atol=1e-6)


def test_progressive_draws_cover_the_bansal_ranges():
    """n_free ~ U{0..n-1}, g ~ U{1..min(n - n_free, k)}: the partial count n_free + g lies in 1..n, every
    reachable pair is drawn, and counts per token are drawn per token."""
    plan = make_plan(["X"], {"X": 6}, backprop={"X": 3})
    pairs = set()
    for s in range(400):
        p = progressive_plan(plan, ("X",), jax.random.key(s))
        total, g = int(p.loops["X"]), int(p.grads["X"])
        pairs.add((total - g, g))
    expected = {(f, g) for f in range(6) for g in range(1, min(6 - f, 3) + 1)}
    assert pairs == expected
    per_token = make_plan(["X"], {"X": jnp.full((4, 5), 6, jnp.int32)}, backprop={"X": 3})
    p = progressive_plan(per_token, ("X",), jax.random.key(0))
    assert p.loops["X"].shape == (4, 5) and len(np.unique(np.asarray(p.grads["X"]))) > 1


def _one_step(cfg, batch):
    source = build_data(cfg)
    model = make_model(cfg, source)
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    tx = make_optimizer(cfg.train)
    step = make_train_step(graphdef, tx, StepSettings.of(cfg))
    return step(init_state(params, tx), batch)


@pytest.mark.slow  # gradients of the two-circuit run, op by op (30-60 s on 2 cores): CI runs it with the slow tests
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_progressive_objective_mixes_the_full_and_partial_losses(tmp_path, run, alpha):
    """objective = (1 - alpha) * L(full counts) + alpha * L(partial run), the partial run being the model at
    `progressive_plan`'s counts with gradient through its last g iterations; alpha 0 is the plain loss."""
    graphdef = nnx.graphdef(run.model)
    batch = jax.tree.map(jnp.asarray, run.eval_sets(["train"], 8)["train"][0])
    plan = make_plan(["X", "Y"], {"X": 4, "Y": 3}, backprop={"X": 2, "Y": 1})
    key = next(k for k in map(jax.random.key, range(50)) if int(progressive_plan(plan, ("X",), k).loops["X"]) < 3)
    total = batch["mask"].sum()
    objective = _Objective(graphdef, plan, None, (jnp.int32(0), 1), total, 1, (alpha, ("X",), key))

    def ce(p, pl):
        return answer_sums(forward_batch(nnx.merge(graphdef, p), batch, pl)[0], batch, 1.0 / total)["loss_sum"]

    partial = progressive_plan(plan, ("X",), key)
    ref = lambda p: (1 - alpha) * ce(p, plan) + alpha * ce(p, partial)  # noqa: E731
    value, grads = jax.value_and_grad(lambda p: objective.loss(p, batch)[0])(run.params)
    ref_value, ref_grads = jax.value_and_grad(ref)(run.params)
    assert float(value) == pytest.approx(float(ref_value), rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    if alpha:
        assert abs(float(ce(run.params, partial)) - float(ce(run.params, plan))) > 1e-4  # the mix matters


@pytest.mark.slow  # two train steps to compile; CI runs it with the slow tests
def test_progressive_loss_logs_the_full_counts_metrics(tmp_path):
    """A train step with the progressive loss reports the same loss as one without (its metrics are the
    full counts'), plus progressive_loss. (Alpha 0 giving the plain objective and gradients is checked
    against the reference in the test above; the tiny config has train.progressive 0.)"""
    base = tiny_config(tmp_path, "p0", f"{X}.loops=uniform(3, 5)", f"{X}.backprop=2")
    assert base.train.progressive == 0.0
    batch = next(build_data(base).train_iterator(8, 0))
    _, m0 = _one_step(base, batch)
    _, mh = _one_step(tiny_config(tmp_path, "p2", f"{X}.loops=uniform(3, 5)", f"{X}.backprop=2",
                                  "train.progressive=0.5"), batch)
    assert float(mh["loss"]) == pytest.approx(float(m0["loss"]), rel=1e-6)
    assert "progressive_loss" in mh and "progressive_loss" not in m0


def test_progressive_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"train.progressive .* \[0, 1\]"):
        tiny_config(tmp_path, "a", "train.progressive=1.5")
    with pytest.raises(ConfigError, match="train.progressive_circuits: 'Z' is not a circuit"):
        tiny_config(tmp_path, "b", "train.progressive=0.5", "train.progressive_circuits=[Z]")
    with pytest.raises(ConfigError, match="no circuit loops"):
        tiny_config(tmp_path, "c", "train.progressive=0.5", f"{X}.loops=fixed(1)", f"{Y}.loops=fixed(1)")
    # no count varies: every circuit that loops (Bansal et al. truncate a fixed maximum count)
    assert tiny_config(tmp_path, "c", "train.progressive=0.5", f"{X}.loops=fixed(1)").progressive_circuits() == ["Y"]
    cfg = tiny_config(tmp_path, "d", "train.progressive=0.5")
    assert cfg.progressive_circuits() == ["X"]  # X varies (uniform(1, 3)), Y is fixed(2)


# ----------------------------------------------------------------------------- loss at each iteration of a window


@pytest.mark.parametrize("n", [1, 2, 6])
def test_a_window_holds_the_last_states_with_their_own_gradient_depth(n):
    """Row j of iterate_window(k=4, W=3) is h_{n-j}, carrying gradient through iterations n-3 .. n-j: the
    value and gradients (weights and h0) of iterate(n - j, k=4, grad=4 - j); rows with n - j < 1 are invalid."""
    consts, h0 = _consts(), jax.random.normal(jax.random.key(1), (3, 8))
    for j in range(3):
        def got(c, h, j=j):
            return jnp.sum(iterate_window(_step, c, h, jnp.int32(n), 4, 3)[1][j] ** 2)

        _, _, valid = iterate_window(_step, consts, h0, jnp.int32(n), 4, 3)
        assert bool(valid[j].all()) == (n - j >= 1) and valid.shape == (3, 3)
        if n - j < 1:
            continue

        def ref(c, h, j=j):
            return jnp.sum(iterate(_step, c, h, jnp.int32(n - j), 4, grad=jnp.int32(4 - j)) ** 2)

        for a, b in zip(jax.tree.leaves(jax.value_and_grad(got, argnums=(0, 1))(consts, h0)),
                        jax.tree.leaves(jax.value_and_grad(ref, argnums=(0, 1))(consts, h0)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_window_with_counts_per_token_is_each_tokens_own():
    """Per-token counts: each token's rows (values and h0-gradients) equal a scalar run at its own n."""
    consts, h0 = _consts(), jax.random.normal(jax.random.key(1), (3, 8))
    n = jnp.array([6, 1, 3], jnp.int32)
    states = jax.jacrev(lambda h: iterate_window(_step, consts, h, n, 4, 2, bound=8)[1])(h0)  # [2, 3, 8, 3, 8]
    _, values, valid = iterate_window(_step, consts, h0, n, 4, 2, bound=8)
    np.testing.assert_array_equal(valid, [[True, True, True], [True, False, True]])
    for r in range(3):
        ref_v = iterate_window(_step, consts, h0, n[r], 4, 2)[1][:, r]
        ref_g = jax.jacrev(lambda h, r=r: iterate_window(_step, consts, h, n[r], 4, 2)[1][:, r])(h0)
        for j in range(2 if int(n[r]) > 1 else 1):
            np.testing.assert_allclose(values[j, r], ref_v[j], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(states[j, r], ref_g[j], rtol=1e-5, atol=1e-6)


def test_iteration_loss_is_the_mean_ce_over_the_window(tmp_path, run):
    """The objective with a window of W on X (count 4) is the per-token mean of the CE at counts 4, 3, ... 4 - W + 1;
    W = 1 is the plain loss. Counts per token: rows before a token's first iteration do not count."""
    graphdef = nnx.graphdef(run.model)
    batch = jax.tree.map(jnp.asarray, run.eval_sets(["train"], 8)["train"][0])
    total = batch["mask"].sum()
    forward = jax.jit(lambda p, pl: forward_batch(nnx.merge(graphdef, p), batch, pl))

    def ce(n):
        plan = make_plan(["X", "Y"], {"X": n, "Y": 3})
        return float(answer_sums(forward(run.params, plan)[0], batch, 1.0 / total)["loss_sum"])

    losses = {n: ce(n) for n in (2, 3, 4)}
    assert len({round(v, 5) for v in losses.values()}) == 3  # the counts differ in loss: the mean is a real check
    for W, ref in ((1, losses[4]), (3, sum(losses.values()) / 3)):
        plan = make_plan(["X", "Y"], {"X": 4, "Y": 3}, backprop={"X": 3, "Y": 1}, windows={"X": W})
        objective = _Objective(graphdef, plan, None, (jnp.int32(0), 1), total, 1)
        value, sums = jax.jit(objective.loss)(run.params, batch)  # eager, it took ~30 s
        assert float(value) == pytest.approx(ref, rel=1e-5)
        assert float(sums["loss_sum"]) == pytest.approx(losses[4], rel=1e-6)  # the metrics stay the final count's
    # per token: a token at count 1 reads its one iteration only (the mean is over its valid rows)
    logits = jnp.stack([jnp.zeros((1, 2, 3)), jnp.log(jnp.array([[[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]]))])  # [W=2, 1, 2, V]
    b = {"targets": jnp.array([[0, 1]]), "mask": jnp.ones((1, 2))}
    got, _ = iteration_terms(Diagnostics(step_logits=logits), b, jnp.array([[1, 5]]), 1.0)
    uniform = np.log(3.0)
    assert float(got) == pytest.approx(uniform + (uniform - np.log(0.8)) / 2, rel=1e-5)


def test_iteration_loss_config_is_checked(tmp_path):
    assert tiny_config(tmp_path, "a", "train.iteration_loss=1").iteration_window() == ("X", 1)  # X varies
    assert tiny_config(tmp_path, "a").iteration_window() is None
    with pytest.raises(ConfigError, match=r"train.iteration_loss=3: .* backprop, 1\); use train.iteration_loss<=1 or "
                                         r"raise model\.stages\.0\.circuits\.X\.backprop$"):
        tiny_config(tmp_path, "b", "train.iteration_loss=3")
    with pytest.raises(ConfigError, match="circuits X, Y all loop; name one: train.iteration_loss_circuit=X"):
        tiny_config(tmp_path, "c", "train.iteration_loss=1", f"{X}.loops=fixed(3)")
    with pytest.raises(ConfigError, match="train.iteration_loss_circuit: 'Z' is not a circuit"):
        tiny_config(tmp_path, "d", "train.iteration_loss=1", "train.iteration_loss_circuit=Z")
    assert tiny_config(tmp_path, "e", "train.iteration_loss_circuit=X").iteration_window() is None  # off: 0
    with pytest.raises(ConfigError, match="but train.progressive is on"):
        tiny_config(tmp_path, "f", "train.iteration_loss=1", "train.progressive=0.5")
    with pytest.raises(ConfigError, match="must be an integer >= 0"):
        tiny_config(tmp_path, "g", "train.iteration_loss=-1")


def test_iteration_loss_on_a_routed_stage_reads_its_rounds(tmp_path):
    """On a routed circuit the window is the bank's last W rounds: it must lie in the router's truncation
    (router.backprop; 0 is every round); the settling loss stays refused there, and a router in another stage too."""
    router = "configs/adaptive/maze3_router.yaml"
    on = ("train.iteration_loss=4", "train.iteration_loss_circuit=X")
    for backprop in (4, 0):
        cfg = load_config(router, [*on, f"model.stages.0.router.backprop={backprop}", f"run.dir={tmp_path}"])
        assert cfg.iteration_window() == ("X", 4)
    with pytest.raises(ConfigError, match=r"train.iteration_loss=4: the window must lie in the rounds with gradient "
                                         r"of circuit X's routed stage \(model.stages.0.router.backprop=2\); use "
                                         r"train.iteration_loss<=2, or raise model.stages.0.router.backprop"):
        load_config(router, [*on, "model.stages.0.router.backprop=2", f"run.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="train.settle reads .* but a stage has a router"):
        load_config(router, ["train.settle=1", "train.settle_loops=32", f"run.dir={tmp_path}"])
    # router.window=own reads each token's own rounds; a window nothing reads, or not a choice, is refused
    own = "model.stages.0.router.window=own"
    assert load_config(router, [*on, "model.stages.0.router.backprop=4", own, f"run.dir={tmp_path}"]
                       ).model.stages[0].router.rule().window == "own"
    with pytest.raises(ConfigError, match=r"model.stages.0.router.window=own chooses the rounds "
                                         r"train.iteration_loss reads on this stage, but train.iteration_loss is off; "
                                         r"drop it, or set train.iteration_loss"):
        load_config(router, [own, f"run.dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"model.stages.0.router.window: 'last' is not one of bank, own"):
        load_config(router, [*on, "model.stages.0.router.window=last", f"run.dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"router.window"):  # a stage without a router: nothing reads it
        load_config("configs/quickstart.yaml", ["train.iteration_loss=2", own, f"run.dir={tmp_path}"])


# ----------------------------------------------------------------------------- settling loss


def test_the_settling_change_is_latent_diffs_squared_with_a_gradient_at_rest():
    """latent_change_sq = latent_change^2 (what latent_diff / context_diff test), and where the state does not
    change its gradient is 0, not NaN (the norm's is undefined there)."""
    h_prev, h = jax.random.normal(jax.random.key(0), (2, 3, 8))
    np.testing.assert_allclose(latent_change_sq(h_prev, h), latent_change(h_prev, h) ** 2, rtol=1e-5)
    g = jax.grad(lambda a: latent_change_sq(a, h).sum())(h)
    assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) == 0.0


def test_settle_terms_are_the_weighted_mean_over_real_tokens():
    """weight * mean over the real tokens (segment_ids > 0, prompt included) / micro-batches, by hand."""
    change = jnp.array([[0.1, 0.3, 5.0], [0.2, 0.0, 0.4]])
    diag = Diagnostics(circuits={"X": CircuitReport(settle=change)})
    batch = {"segment_ids": jnp.array([[1, 1, 0], [1, 1, 1]]), "mask": jnp.array([[0, 1, 0], [0, 0, 1]])}
    term, logs = settle_terms(diag, "X", batch, 2.0, 4)
    mean = (0.1 + 0.3 + 0.2 + 0.0 + 0.4) / 5
    assert float(logs["settle"]) == pytest.approx(mean / 4, rel=1e-6)
    assert float(term) == pytest.approx(2.0 * mean / 4, rel=1e-6)
    term, _ = settle_terms(diag, "X", {"mask": batch["mask"]}, 1.0, 1)  # no segment ids: every token is real
    assert float(term) == pytest.approx(float(change.mean()), rel=1e-6)


def test_the_settling_loss_adds_its_term_read_at_its_own_count(run):
    """With train.settle = (X, N, s), the objective is the plain CE + s * the mean over real tokens of X's squared
    state change over iteration N of a pass at count N (whichever count the step trains at); that change is the
    same whichever window keeps it, 0 at N = 1, and the metrics' loss is the step's own."""
    graphdef = nnx.graphdef(run.model)
    batch = jax.tree.map(jnp.asarray, run.eval_sets(["train"], 8)["train"][0])
    total = batch["mask"].sum()
    plan = make_plan(["X", "Y"], {"X": 2, "Y": 3}, backprop={"X": 3, "Y": 1})

    def objective(settle):
        obj = _Objective(graphdef, plan, None, (jnp.int32(0), 1), total, 1, settle=settle)
        value, sums = jax.jit(obj.loss)(run.params, batch)
        return float(value), sums

    def change(n, W):
        far = make_plan(["X", "Y"], {"X": n, "Y": 3}, backprop={"X": 3, "Y": 1}, windows={"X": W})
        return jax.jit(lambda p: forward_batch(nnx.merge(graphdef, p), batch, far)[1])(run.params).circuits["X"].settle

    plain, sums0 = objective(None)
    assert float(sums0["loss_sum"]) == pytest.approx(plain, rel=1e-6) and "settle" not in sums0
    value, sums = objective(("X", 5, 0.5))
    at5 = change(5, 2)
    real = batch["segment_ids"] > 0 if "segment_ids" in batch else jnp.ones(at5.shape, bool)
    mean = float(jnp.sum(jnp.where(real, at5, 0.0)) / real.sum())
    assert mean > 1e-6  # the run's X still moves at 5: the term is a real check
    assert value == pytest.approx(plain + 0.5 * mean, rel=1e-5)
    assert float(sums["settle"]) == pytest.approx(mean, rel=1e-5)
    assert float(sums["loss_sum"]) == pytest.approx(plain, rel=1e-6)  # the step's count (2), not N
    np.testing.assert_allclose(change(5, 3), at5, rtol=1e-5, atol=1e-8)
    assert float(jnp.abs(change(1, 2)).max()) == 0.0
    assert float(jnp.abs(change(4, 2) - at5).max()) > 1e-7  # read at N: another count changes it


def test_settle_config_is_checked(tmp_path):
    """train.settle reads the varying circuit at train.settle_loops (required), needs its backprop >= 2, and is
    refused where the iteration loss is (the progressive loss) and when not finite or < 0."""
    assert tiny_config(tmp_path, "a", "train.settle=0.1", "train.settle_loops=8",
                       f"{X}.backprop=2").settle_term() == ("X", 8, 0.1)
    assert tiny_config(tmp_path, "a").settle_term() is None
    with pytest.raises(ConfigError, match=r"train.settle=0.1 needs train.settle_loops.*e.g. twice its max_loops"):
        tiny_config(tmp_path, "b", "train.settle=0.1", f"{X}.backprop=2")
    with pytest.raises(ConfigError, match=r"train.settle compares circuit X's last two iterations.*backprop is 1\); "
                                         r"raise model\.stages\.0\.circuits\.X\.backprop to 2 or more"):
        tiny_config(tmp_path, "c", "train.settle=0.1", "train.settle_loops=8")
    with pytest.raises(ConfigError, match="train.settle reads .* but train.progressive is on.*; set train.settle=0"):
        tiny_config(tmp_path, "d", "train.settle=0.1", "train.settle_loops=8", f"{X}.backprop=2", "train.progressive=0.5")
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(ConfigError, match="train.settle .* must be a finite number >= 0"):
            tiny_config(tmp_path, "e", f"train.settle={bad}")
    for bad in ("1", "-2", "100000", "2.5"):
        with pytest.raises(ConfigError, match="train.settle_loops"):
            tiny_config(tmp_path, "g", f"train.settle_loops={bad}")
    with pytest.raises(ConfigError, match="train.settle: .*circuits X, Y all loop; name one: "
                                          "train.iteration_loss_circuit=X"):
        tiny_config(tmp_path, "f", "train.settle=0.1", "train.settle_loops=8", f"{X}.loops=fixed(3)", f"{X}.backprop=2")
    # #27 pass 28: the settle_loops it names is within the limit (twice a max_loops of 6000, 12000, was refused in turn)
    with pytest.raises(ConfigError, match=r"e.g. twice its max_loops \(train.settle_loops=10000\)$") as named:
        tiny_config(tmp_path, "h", "train.settle=0.1", f"{X}.backprop=2", f"{X}.max_loops=6000")
    fix = re.search(r"\((train.settle_loops=\d+)\)$", str(named.value)).group(1)
    assert tiny_config(tmp_path, "h", "train.settle=0.1", f"{X}.backprop=2", f"{X}.max_loops=6000",
                       fix).settle_term() == ("X", 10000, 0.1)


@pytest.mark.slow  # two train steps to compile; CI runs it with the slow tests
def test_the_settling_loss_trains_and_logs(tmp_path):
    """A train step with train.settle reports the same loss as one without and logs settle, with counts sampled
    or per difficulty."""
    for extra in ((f"{X}.backprop=2",), (f"{X}.loops=per_difficulty(1, 1)", f"{X}.backprop=2", f"{X}.max_loops=3")):
        base = tiny_config(tmp_path, "s0", *extra)
        batch = next(build_data(base).train_iterator(8, 0))
        _, m0 = _one_step(base, batch)
        _, ms = _one_step(tiny_config(tmp_path, "s1", *extra, "train.settle=2", "train.settle_loops=6"), batch)
        assert float(ms["loss"]) == pytest.approx(float(m0["loss"]), rel=1e-6)
        assert float(ms["objective"]) == pytest.approx(float(ms["loss"]) + 2 * float(ms["settle"]), rel=1e-5)
        assert float(ms["settle"]) > 0 and "settle" not in m0 and np.isfinite(float(ms["grad_norm"]))


@pytest.mark.slow  # two train steps to compile; CI runs it with the slow tests
def test_iteration_loss_trains_and_logs(tmp_path):
    """A train step with train.iteration_loss reports the same loss as one without (the metrics are the final
    count's) and logs iteration_loss, which is the objective; with counts per difficulty too."""
    for extra in ((f"{X}.backprop=2",), (f"{X}.loops=per_difficulty(1, 1)", f"{X}.backprop=2", f"{X}.max_loops=3")):
        base = tiny_config(tmp_path, "w0", *extra)
        batch = next(build_data(base).train_iterator(8, 0))
        _, m0 = _one_step(base, batch)
        _, mw = _one_step(tiny_config(tmp_path, "w2", *extra, "train.iteration_loss=2"), batch)
        assert float(mw["loss"]) == pytest.approx(float(m0["loss"]), rel=1e-6)
        assert float(mw["iteration_loss"]) == pytest.approx(float(mw["objective"]), rel=1e-6)
        assert "iteration_loss" not in m0 and np.isfinite(float(mw["grad_norm"]))


@pytest.mark.slow  # gradients of the two-circuit run, op by op: CI runs it with the slow tests
def test_iteration_loss_gradients_are_the_mean_of_each_iterations(tmp_path, run):
    """With X at count 4, backprop 2 and a window of 2, the objective and its gradients equal the mean of the
    CE at count 4 (gradient through iterations 3-4) and at count 3 (gradient through iteration 3 only)."""
    graphdef = nnx.graphdef(run.model)
    batch = jax.tree.map(jnp.asarray, run.eval_sets(["train"], 8)["train"][0])
    total = batch["mask"].sum()
    plan = make_plan(["X", "Y"], {"X": 4, "Y": 3}, backprop={"X": 2, "Y": 1}, windows={"X": 2})
    objective = _Objective(graphdef, plan, None, (jnp.int32(0), 1), total, 1)
    last = make_plan(["X", "Y"], {"X": 4, "Y": 3}, backprop={"X": 2, "Y": 1})
    before = dataclasses.replace(make_plan(["X", "Y"], {"X": 3, "Y": 3}, backprop={"X": 2, "Y": 1}),
                                 grads={"X": jnp.int32(1)})

    def ce(p, pl):
        return answer_sums(forward_batch(nnx.merge(graphdef, p), batch, pl)[0], batch, 1.0 / total)["loss_sum"]

    value, grads = jax.value_and_grad(lambda p: objective.loss(p, batch)[0])(run.params)
    ref_value, ref_grads = jax.value_and_grad(lambda p: (ce(p, last) + ce(p, before)) / 2)(run.params)
    assert float(value) == pytest.approx(float(ref_value), rel=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- loops per difficulty


def test_per_difficulty_distribution():
    d = LoopDistribution.parse("per_difficulty(1, 2)", cap=12)
    assert d.per_example and d.at(8) == 10 and d.at(30) == 32
    np.testing.assert_array_equal(d.counts(jnp.array([0, 1, 8, 30])), [2, 3, 10, 12])  # capped at 12
    np.testing.assert_array_equal(LoopDistribution.parse("per_difficulty(0.5, 0.5)").counts(jnp.array([1, 3, 4])),
                                  [1, 2, 2])  # 1, 2, round(2.5) = 2 (half to even, like at())
    with pytest.raises(ValueError, match="per_difficulty"):
        LoopDistribution.parse("per_difficulty(-1, 2)")


def test_per_difficulty_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"gives 6 loops at difficulty 2 .* raise max_loops to >= 6"):
        tiny_config(tmp_path, "a", f"{X}.loops=per_difficulty(2, 2)", f"{X}.max_loops=5")
    with pytest.raises(ConfigError, match="need a synthetic task"):
        tiny_config(tmp_path, "b", f"{X}.loops=per_difficulty(1, 1)", "data.task=text",
                    "data.paths=['asset:kjv_genesis_exodus.txt']", *TASK_DEFAULTS)


def test_per_difficulty_counts_equal_each_example_alone(tmp_path, run):
    """A batch evaluated with counts round(a * d + b) per example gives each example the logits it has
    when run alone at its own count, in one compiled program for the whole batch."""
    model, params = run.model, run.params
    batches = run.eval_sets(["train", "hard"], 8)
    batch = {k: np.concatenate([batches["train"][0][k], batches["hard"][0][k]]) for k in batches["train"][0]}
    diff = batch["difficulty"].max(-1)
    assert len(set(diff.tolist())) >= 2, "the batch mixes difficulties"
    a, b = 1.0, 1.0
    merged = nnx.merge(nnx.graphdef(model), nnx.state(model))
    nnx.update(merged, params)
    plan = make_plan(["X", "Y"], {"X": 99, "Y": 3}, by_difficulty={"X": (a, b, 50)})
    forward = nnx.jit(lambda m, b, p: forward_batch(m, b, p)[0])  # counts are traced: one program per shape
    logits = np.asarray(forward(merged, batch, plan))
    for r in range(len(diff)):
        alone = {k: v[r:r + 1] for k, v in batch.items()}
        ref = forward(merged, alone, make_plan(["X", "Y"], {"X": int(a * diff[r] + b), "Y": 3}))
        np.testing.assert_allclose(logits[r], np.asarray(ref)[0], rtol=1e-5, atol=1e-5)
    evaluator = evaluator_for(model)
    got = evaluator.evaluate(params, [batch], {"X": 99, "Y": 3}, by_difficulty={"X": (a, b, 50)})
    real = batch["segment_ids"] > 0
    assert got["mean_loops"]["X"] == pytest.approx(float((a * batch["difficulty"] + b)[real].mean()))
    with pytest.raises(PlanError, match="carry none"):
        forward_batch(merged, {k: v for k, v in batch.items() if k != "difficulty"}, plan)


def test_per_difficulty_trains_and_evaluates_by_its_rule(tmp_path):
    """A train step with per-difficulty counts logs the mean count per real token, and `difficulty_rules`
    / --loops X=auto pick the rule up (refused for a circuit trained without one)."""
    cfg = tiny_config(tmp_path, "pd", f"{X}.loops=per_difficulty(2, 1)", f"{X}.max_loops=5")
    batch = next(build_data(cfg).train_iterator(8, 0))
    _, metrics = _one_step(cfg, batch)
    real = batch["difficulty"] > 0
    assert float(metrics["loops/X"]) == pytest.approx(float((2 * batch["difficulty"] + 1)[real].mean()))
    assert difficulty_rules(cfg.model) == {"X": (2.0, 1.0, 10_000)}
    assert split_auto(["X=auto", "Y=4"], ["X", "Y"]) == (["Y=4"], ["X"])
    assert auto_rules(cfg.model, ["X"], {"Y": 4}) == {"X": (2.0, 1.0, 10_000)}
    with pytest.raises(PlanError, match=r"--loops Y=auto: circuit Y was trained with loops fixed\(2\)"):
        auto_rules(cfg.model, ["Y"], {})


# ----------------------------------------------------------------------------- curriculum


def test_examples_carry_their_difficulty():
    task = make_task("prefix_parity")
    ex = pipeline.example_at(task, 0, "train", 3, (2, 6), 8)
    n = int(ex["segment_ids"].sum())
    assert set(ex["difficulty"][:n].tolist()) == {n - 1} and not ex["difficulty"][n:].any()


def test_curriculum_follows_its_stages_and_resumes_exactly():
    task = make_task("prefix_parity")
    cur = pipeline.Curriculum(steps=(0, 2, 4), ranges=((1, 2), (1, 4), (1, 8)), global_batch=4)
    assert [cur.range_at(s) for s in (0, 1, 2, 3, 4, 100)] == [(1, 2)] * 2 + [(1, 4)] * 2 + [(1, 8)] * 2
    it = pipeline.train_iterator(task, (1, 8), 4, 0, curriculum=cur)
    batches = [next(it) for _ in range(6)]
    assert all(b["inputs"].shape == (4, 9) for b in batches)  # one shape: padded to the final hi
    for s, b in enumerate(batches):
        lo, hi = cur.range_at(s)
        d = b["difficulty"].max(-1)
        assert lo <= d.min() and d.max() <= hi
        ref = [pipeline.example_at(task, 0, "train", s * 4 + i, cur.range_at(s), 9) for i in range(4)]
        np.testing.assert_array_equal(b["inputs"], np.stack([r["inputs"] for r in ref]))
    it2 = pipeline.train_iterator(task, (1, 8), 4, 0, curriculum=cur)
    next(it2)
    state = it2.get_state()
    fresh = pipeline.train_iterator(task, (1, 8), 4, 0, curriculum=cur)
    fresh.set_state(state)
    np.testing.assert_array_equal(next(fresh)["inputs"], batches[1]["inputs"])


def test_curriculum_config(tmp_path):
    cfg = tiny_config(tmp_path, "c", "data.curriculum=[{until: 2, difficulty: [1, 1]}]", "train.steps=3")
    it = build_data(cfg).train_iterator(8, 0)
    assert [int(next(it)["difficulty"].max()) for _ in range(3)][:2] == [1, 1]
    with pytest.raises(ConfigError, match=r"data.curriculum.1.until must be a step after the previous stage's \(5\)"):
        tiny_config(tmp_path, "d", "data.curriculum=[{until: 5, difficulty: [1, 1]}, {until: 3, difficulty: [1, 2]}]")
    with pytest.raises(ConfigError, match=r"data.curriculum.0.difficulty \[1, 9\] reaches above"):
        tiny_config(tmp_path, "e", "data.curriculum=[{until: 5, difficulty: [1, 9]}]")
