"""Learned halting: the exit distribution over a circuit's iterations from its halting head.

A circuit with ``halting: {kind: ...}`` has a head lambda_t = sigmoid(w . norm(h_t) + b) read after every
iteration t = 1..n. Over a horizon of n iterations (the loop count):

    ouro, pondernet   p(t) = lambda_t prod_{j<t} (1 - lambda_j) for t < n, and p(n) = prod_{j<n} (1 - lambda_j)
                      (the rest on the last step); inference stops once the CDF 1 - prod_{j<=t}(1 - lambda_j) >= q
    act               (Graves 2016) N = the first t with sum_{j<=t} lambda_j >= 1 - eps (or n); p(t) = lambda_t
                      for t < N, p(N) = R = 1 - sum_{j<N} lambda_j; the output is sum_t p(t) out_t, and
                      the ponder cost is N + R

Shapes: lambdas and p are [L, ...] over a stash of L >= n iterations (rows past n are zero).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
KINDS = ("none", "ouro", "pondernet", "act")


def geometric_exit(lambdas: Array, n: Array) -> Array:
    """Ouro / PonderNet p [L, ...]: exit at t with probability lambda_t given it ran t steps; whatever
    survives step n - 1 exits at n."""
    L = lambdas.shape[0]
    t = jnp.arange(1, L + 1).reshape((L,) + (1,) * (lambdas.ndim - 1))
    lam = jnp.where(t < n, lambdas, jnp.where(t == n, 1.0, 0.0))  # the last step takes the rest
    survive = jnp.cumprod(1.0 - lam, axis=0)
    before = jnp.concatenate([jnp.ones_like(survive[:1]), survive[:-1]], axis=0)
    return lam * before


def act_exit(lambdas: Array, n: Array, eps: float) -> tuple[Array, Array]:
    """ACT's p [L, ...] and ponder cost N + R [...]."""
    L = lambdas.shape[0]
    t = jnp.arange(1, L + 1).reshape((L,) + (1,) * (lambdas.ndim - 1))
    lam = jnp.where(t <= n, lambdas, 0.0)
    cum = jnp.cumsum(lam, axis=0)
    before = cum - lam  # sum_{j<t} lambda_j
    halts_here = ((cum >= 1.0 - eps) | (t == n)) & (before < 1.0 - eps) & (t <= n)
    ran = (before < 1.0 - eps) & (t <= n)  # steps 1..N
    remainder = 1.0 - before
    p = jnp.where(halts_here, remainder, jnp.where(ran, lam, 0.0))
    steps = jnp.sum(ran, axis=0).astype(jnp.float32)  # N
    rest = jnp.sum(jnp.where(halts_here, remainder, 0.0), axis=0)  # R
    return p, steps + rest


def exit_entropy(p: Array) -> Array:
    """[...]: H(p) over the step axis."""
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-30)), 0.0), axis=0)


def kl_to_geometric(p: Array, n: Array, prior: float) -> Array:
    """[...]: KL(p || Geometric(prior) truncated to 1..n and renormalised) (PonderNet's regulariser)."""
    L = p.shape[0]
    t = jnp.arange(1, L + 1).reshape((L,) + (1,) * (p.ndim - 1))
    q = jnp.where(t <= n, prior * (1.0 - prior) ** (t - 1), 0.0)
    q = q / jnp.sum(q, axis=0, keepdims=True)
    return jnp.sum(jnp.where(p > 0, p * (jnp.log(jnp.maximum(p, 1e-30)) - jnp.log(jnp.maximum(q, 1e-30))), 0.0), axis=0)
