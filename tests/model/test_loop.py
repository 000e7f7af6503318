"""Loop mechanics: fori/scan iteration == a Python loop, truncated backprop, samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopformer.config import LoopDistribution
from loopformer.model.loop import Phase, iterate, iterate_traced, iterate_until, phase_switch, sample_count, sample_loops


def _step(consts, h):
    w, e = consts
    return jnp.tanh(h @ w + e)


def _consts(seed=0, width=8):
    kw, ke = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(kw, (width, width)) / np.sqrt(width), jax.random.normal(ke, (3, width)))


def _python_loop(consts, h, n):
    for _ in range(n):
        h = _step(consts, h)
    return h


@pytest.mark.parametrize("n", [1, 2, 5, 9])
@pytest.mark.parametrize("k", [0, 1, 3, 12])
def test_iterate_equals_python_loop(n, k):
    consts = _consts()
    h0 = jnp.zeros((3, 8))
    got = jax.jit(lambda c, h, n: iterate(_step, c, h, n, k))(consts, h0, jnp.int32(n))
    np.testing.assert_allclose(got, _python_loop(consts, h0, n), rtol=1e-5, atol=1e-6)


def test_one_program_for_every_count():
    consts, h0 = _consts(), jnp.zeros((3, 8))
    traces = []

    @jax.jit
    def run(c, h, n):
        traces.append(1)
        return iterate(_step, c, h, n, 3)

    for n in (1, 4, 17, 100):
        run(consts, h0, jnp.int32(n))
    assert len(traces) == 1


def _loss(consts, h0, n, k):
    return jnp.sum(iterate(_step, consts, h0, jnp.int32(n), k) ** 2)


def test_truncated_backprop_cuts_early_iterations():
    consts, h0 = _consts(), jax.random.normal(jax.random.key(1), (3, 8))
    n, k = 7, 3
    g_h0 = jax.grad(_loss, argnums=1)(consts, h0, n, k)
    assert np.all(np.asarray(g_h0) == 0.0), "h0 enters before the last k iterations: no gradient"

    # Reference: run n - k steps on stop-gradient values, then k steps with gradient.
    def reference(c):
        h = jax.lax.stop_gradient(_python_loop(jax.lax.stop_gradient(c), h0, n - k))
        return jnp.sum(_python_loop(c, h, k) ** 2)

    got = jax.grad(_loss)(consts, h0, n, k)
    want = jax.grad(reference)(consts)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert np.abs(np.asarray(a)).sum() > 0


@pytest.mark.parametrize("n,k", [(3, 3), (2, 5), (1, 4)])
def test_full_backprop_when_k_covers_n(n, k):
    consts, h0 = _consts(), jax.random.normal(jax.random.key(1), (3, 8))
    got = jax.grad(_loss, argnums=(0, 1))(consts, h0, n, k)
    want = jax.grad(lambda c, h: jnp.sum(_python_loop(c, h, n) ** 2), argnums=(0, 1))(consts, h0)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_traced_iteration_records_each_step():
    consts, h0 = _consts(), jnp.zeros((2, 3, 8))
    h, trace = iterate_traced(_step, consts, h0, jnp.int32(4), 6)
    np.testing.assert_allclose(h, _python_loop(consts, h0, 4), rtol=1e-5, atol=1e-6)
    trace = np.asarray(trace)
    assert np.all(np.isfinite(trace[:4])) and np.all(np.isnan(trace[4:]))
    assert trace[0, 0] == pytest.approx(1.0)  # from a zero state the relative change is 1
    h3 = _python_loop(consts, h0, 3)
    want = np.mean(np.linalg.norm(h - h3, axis=-1) / np.maximum(np.linalg.norm(h, axis=-1),
                                                                 np.linalg.norm(h3, axis=-1)))
    assert trace[3, 0] == pytest.approx(want, rel=1e-5)


# ----------------------------------------------------------------------------- samplers


def _draws(dist, count=20000):
    keys = jax.random.split(jax.random.key(3), count)
    return np.asarray(jax.vmap(lambda k: sample_count(dist, k))(keys))


def test_poisson_lognormal_mean_and_support():
    dist = LoopDistribution.parse("poisson_lognormal(8, 0.5)", cap=10_000)
    x = _draws(dist)
    assert x.min() >= 1
    # E[n] = mean + 1; standard error here is ~0.04.
    assert x.mean() == pytest.approx(9.0, abs=0.2)


def test_uniform_and_fixed_and_cap():
    u = _draws(LoopDistribution.parse("uniform(2, 6)"))
    assert set(np.unique(u)) == {2, 3, 4, 5, 6}
    assert u.mean() == pytest.approx(4.0, abs=0.05)
    assert set(np.unique(_draws(LoopDistribution.parse("5"), 100))) == {5}
    capped = _draws(LoopDistribution.parse("poisson_lognormal(30, 1.0)", cap=12), 2000)
    assert capped.max() == 12


def test_counts_are_a_function_of_seed_and_step():
    dists = {"X": LoopDistribution.parse("uniform(1, 1000)", cap=1000),
             "Y": LoopDistribution.parse("poisson_lognormal(8, 1)")}
    draw = lambda seed, step: np.asarray(list(sample_loops(dists, seed, step).values()))  # noqa: E731
    a = draw(7, 123)
    b = np.asarray(list(jax.jit(lambda s: sample_loops(dists, 7, s))(jnp.int32(123)).values()))
    np.testing.assert_array_equal(a, b)
    assert len({tuple(draw(7, s)) for s in range(20)}) > 15
    assert not np.array_equal(a, draw(8, 123))


def test_trace_statistics_skip_padding():
    """Stats over real tokens only: a batch padded with arbitrary states gives the unpadded numbers."""
    from loopformer.model.loop import state_stats

    h0, h1 = jax.random.normal(jax.random.key(0), (2, 2, 5, 8))
    junk0, junk1 = 100 * jax.random.normal(jax.random.key(1), (2, 2, 3, 8))
    real = jnp.concatenate([jnp.ones((2, 5), bool), jnp.zeros((2, 3), bool)], axis=1)
    want = np.asarray(state_stats(h0, h1))
    got = np.asarray(state_stats(jnp.concatenate([h0, junk0], 1), jnp.concatenate([h1, junk1], 1), real))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    ragged = real.at[1, 4].set(False)  # sequence 1 has 4 real tokens: its cosine averages its 12 pairs
    u = np.asarray(h1 / jnp.linalg.norm(h1, axis=-1, keepdims=True))
    cos = [(np.sum(u[0].sum(0) ** 2) - 5) / 20, (np.sum(u[1, :4].sum(0) ** 2) - 4) / 12]
    got = np.asarray(state_stats(jnp.concatenate([h0, junk0], 1), jnp.concatenate([h1, junk1], 1), ragged))
    assert got[2] == pytest.approx(np.mean(cos), rel=1e-5)


def test_phases_shrink_with_the_running_tokens():
    """Phases (compacted inference): per-token counts 1, 2, 5 and 9 on four tokens, buffers of 4, 3, 2 and 1 tokens
    whose step records its size; the 2-token one says it holds at most 1 (as a rows-by-tokens buffer may not hold
    a set of its size). Fresh tokens per iteration: 4, 4 (the first ran iteration 1), 3, 2, 2, 2 (the 2-token
    buffer says no: the 3-token one runs), then 1, 1, 1. The states are a single step's loop's, and
    `phase_switch` picks the last buffer that holds a fresh set."""
    w, e = _consts()
    consts = (w, jax.random.normal(jax.random.key(2), (4, 8)))
    h0 = jax.random.normal(jax.random.key(1), (4, 8))
    n = jnp.asarray([1, 2, 5, 9], jnp.int32)

    def phase(size, fits):
        def step(consts, i, h, side, fresh):
            return _step(consts, h), side + size
        return Phase(step, fits)

    phases = [phase(4, lambda f: jnp.ones((), bool)), phase(3, lambda f: jnp.sum(f) <= 3),
              phase(2, lambda f: jnp.sum(f) <= 1), phase(1, lambda f: jnp.sum(f) <= 1)]
    loop = jax.jit(lambda h: iterate_until(phases, consts, h, n, side0=jnp.zeros((), jnp.int32)))(h0)
    one = iterate_until(phases[0].step, consts, h0, n, side0=jnp.zeros((), jnp.int32))
    assert int(loop.side) == 4 + 4 + 3 + 3 + 3 + 3 + 1 + 1 + 1
    assert int(one.side) == 4 * 9  # every iteration in the largest buffer
    np.testing.assert_allclose(np.asarray(loop.h), np.asarray(one.h), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(loop.used), [1, 2, 5, 9])
    pick = phase_switch(phases)
    for fresh, size in (([1, 1, 1, 1], 4), ([0, 1, 1, 1], 3), ([0, 0, 0, 1], 1)):
        assert int(pick(consts, 0, h0, jnp.zeros((), jnp.int32), jnp.asarray(fresh, bool))[1]) == size
