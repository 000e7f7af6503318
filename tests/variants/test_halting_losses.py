"""The halting kinds' exit distributions and loss terms against hand computations (one token, three steps):
the sign of Ouro's entropy term, PonderNet's KL weight, ACT's ponder cost N + R."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from loopformer.variants.halting import HALTINGS, gate_targets

SETTINGS = dict(beta=0.1, beta_final=0.01, prior=0.5, tau=0.01, eps=0.01, q=0.5, gate_k=50.0, gate_gamma=0.005)
LAMBDAS = [0.5, 0.2, 0.9]  # the head's lambda after steps 1, 2, 3
LOGITS = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [-1.0, 0.0, 3.0]]  # step t's logits over 3 classes
TARGET = 2


def _kind(name, **over):
    return HALTINGS.get(name)(**(SETTINGS | over))


def _ce(logits, target):
    z = np.asarray(logits, np.float64)
    return float(np.log(np.exp(z).sum()) - z[target])


def _inputs(n=3):
    lam = jnp.asarray(LAMBDAS, jnp.float32)[:, None, None]  # [L, B=1, T=1]
    step_logits = jnp.asarray(LOGITS, jnp.float32)[:, None, None, :]  # [L, 1, 1, V]
    batch = {"targets": jnp.full((1, 1), TARGET, jnp.int32), "mask": jnp.ones((1, 1), jnp.float32)}
    return lam, step_logits, batch, jnp.full((1, 1), n, jnp.int32)


def test_geometric_exit_distribution_by_hand():
    lam, _, _, n = _inputs()
    p, used, ponder = _kind("ouro").distribution(lam, n)
    want = [0.5, 0.5 * 0.2, 0.5 * 0.8]  # the last step takes what survived
    np.testing.assert_allclose(np.asarray(p)[:, 0, 0], want, rtol=1e-6)
    assert float(used[0, 0]) == pytest.approx(1 * 0.5 + 2 * 0.1 + 3 * 0.4)
    assert ponder is None
    p2, _, _ = _kind("ouro").distribution(lam, jnp.full((1, 1), 2, jnp.int32))  # horizon 2: step 2 takes the rest
    np.testing.assert_allclose(np.asarray(p2)[:, 0, 0], [0.5, 0.5, 0.0], rtol=1e-6)


@pytest.mark.parametrize("step", [0, 9])
def test_ouro_loss_is_expected_ce_minus_a_decaying_entropy_bonus(step):
    lam, logits, batch, n = _inputs()
    kind = _kind("ouro")
    p, used, ponder = kind.distribution(lam, n)
    loss, logs = kind.loss(p, used, ponder, logits, batch, n, jnp.asarray(step), 10, 1.0)
    pv = [0.5, 0.1, 0.4]
    expected_ce = sum(pt * _ce(z, TARGET) for pt, z in zip(pv, LOGITS, strict=True))
    entropy = -sum(pt * math.log(pt) for pt in pv)
    beta = 0.1 if step == 0 else 0.01  # linear from beta to beta_final over the run's steps
    assert float(loss) == pytest.approx(expected_ce - beta * entropy, rel=1e-5)
    assert float(logs["halting_entropy"]) == pytest.approx(entropy, rel=1e-5)
    # the entropy term rewards spreading the exit: a larger beta lowers the loss
    loss_more, _ = _kind("ouro", beta=0.5).loss(p, used, ponder, logits, batch, n, jnp.asarray(0), 10, 1.0)
    assert float(loss_more) < float(_kind("ouro").loss(p, used, ponder, logits, batch, n, jnp.asarray(0), 10, 1.0)[0])


def test_pondernet_loss_is_expected_ce_plus_beta_kl_to_a_truncated_geometric():
    lam, logits, batch, n = _inputs()
    kind = _kind("pondernet", beta=0.3, prior=0.4)
    p, used, ponder = kind.distribution(lam, n)
    loss, _ = kind.loss(p, used, ponder, logits, batch, n, jnp.asarray(0), 10, 2.0)
    pv = [0.5, 0.1, 0.4]
    q = [0.4, 0.4 * 0.6, 0.4 * 0.36]
    q = [v / sum(q) for v in q]
    kl = sum(a * math.log(a / b) for a, b in zip(pv, q, strict=True))
    expected_ce = sum(pt * _ce(z, TARGET) for pt, z in zip(pv, LOGITS, strict=True))
    assert float(loss) == pytest.approx(2.0 * (expected_ce + 0.3 * kl), rel=1e-5)  # scale 2 multiplies all of it


def test_act_ponder_cost_is_n_plus_remainder():
    """lambdas 0.3, 0.5, 0.4 (eps 0.01): the cumulative sum 0.3, 0.8, 1.2 first reaches 0.99 at step 3, so N = 3,
    R = 1 - 0.8 = 0.2, p = (0.3, 0.5, 0.2), ponder 3.2; the loss term is tau * (N + R)."""
    kind = _kind("act", tau=0.05)
    lam = jnp.asarray([0.3, 0.5, 0.4], jnp.float32)[:, None, None]
    n = jnp.full((1, 1), 3, jnp.int32)
    p, used, ponder = kind.distribution(lam, n)
    np.testing.assert_allclose(np.asarray(p)[:, 0, 0], [0.3, 0.5, 0.2], rtol=1e-6)
    assert float(ponder[0, 0]) == pytest.approx(3.2, rel=1e-6)
    batch = {"targets": jnp.zeros((1, 1), jnp.int32), "mask": jnp.ones((1, 1), jnp.float32)}
    loss, logs = kind.loss(p, used, ponder, None, batch, n, jnp.asarray(0), 10, 1.0)
    assert float(loss) == pytest.approx(0.05 * 3.2, rel=1e-6)
    # halting early: 0.995 at step 1 stops there (N = 1, R = 1)
    p1, _, ponder1 = kind.distribution(jnp.asarray([0.995, 0.5, 0.4], jnp.float32)[:, None, None], n)
    np.testing.assert_allclose(np.asarray(p1)[:, 0, 0], [1.0, 0.0, 0.0], rtol=1e-6)
    assert float(ponder1[0, 0]) == pytest.approx(2.0, rel=1e-6)


# --- Ouro stage II: the head's BCE against the per-step loss improvement -------------------------------------


def test_gate_targets_pair_each_step_with_the_improvement_it_decides():
    """Row t - 1 holds w_t = sigmoid(k (max(0, CE_t - CE_{t+1}) - gamma)) for t < n; the last row and rows
    from n on count for nothing."""
    ce = jnp.asarray([1.0, 0.5, 0.499, 0.6, 0.1], jnp.float32)[:, None]
    w, rows = gate_targets(ce, jnp.full((1,), 4, jnp.int32), 50.0, 0.005)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    want = [sig(50 * (0.5 - 0.005)), sig(50 * (0.001 - 0.005)), sig(50 * (0.0 - 0.005)), 0.0, 0.0]
    np.testing.assert_allclose(np.asarray(w)[:, 0], want, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(rows)[:, 0], [1, 1, 1, 0, 0])  # t = 4 = n: no decision


@pytest.mark.parametrize("kind", ["ouro", "pondernet"])
def test_gate_loss_is_the_mean_bce_over_the_decided_steps(kind):
    lam, logits, batch, n = _inputs()
    loss, logs = _kind(kind).gate_loss(lam, logits, batch, n, 1.0)
    ce = [_ce(z, TARGET) for z in LOGITS]  # 3.07, 1.46, 0.07: every step improves
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    w = [sig(50 * (max(ce[t] - ce[t + 1], 0) - 0.005)) for t in range(2)]
    bce = [-(w[t] * math.log(1 - LAMBDAS[t]) + (1 - w[t]) * math.log(LAMBDAS[t])) for t in range(2)]
    assert float(loss) == pytest.approx(sum(bce) / 2, rel=1e-5)
    assert float(logs["halting_gate_continue"]) == pytest.approx(sum(w) / 2, rel=1e-5)
    assert not HALTINGS.get("act").gate_stage and HALTINGS.get(kind).gate_stage
