"""Loop mechanics: run a weight-tied step a *runtime* number of times, sample that number, and
measure what the iterations do to the state.

The loop count ``n`` is a traced int32, never a Python constant, so one compiled program serves
every count. Truncated backprop (depth ``k``, static) splits the loop in two:

    h <- step(h)   n - k times   in lax.fori_loop, under stop_gradient   (memory O(1) in n)
    h <- step(h)   k times       in lax.scan with jax.checkpoint          (memory O(k))

When n < k the scan masks its surplus steps (h passes through unchanged), so exactly n steps run.
With k = 0 the whole loop is a fori_loop (inference: any n in 1..1000, one program).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from loopformer.variants.loops import LoopDistribution

Array = jax.Array
PyTree = Any

# ----------------------------------------------------------------------------- sampling


def sample_count(dist: LoopDistribution, key: Array) -> Array:
    """One draw of ``dist`` as an int32 scalar (jit-friendly), clipped to [1, dist.cap]."""
    return dist.draw(key)


def sample_loops(dists: Mapping[str, LoopDistribution], seed: int | Array, step: int | Array) -> dict[str, Array]:
    """Loop counts of every circuit at a training step, {name: int32 []}.

    A pure function of (seed, step, the circuit's position in ``dists``): every host draws the same
    counts, and a resumed run replays exactly the counts of the run it continues.
    """
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0x100F), seed), step)
    return {name: sample_count(d, jax.random.fold_in(key, i)) for i, (name, d) in enumerate(dists.items())}


# ----------------------------------------------------------------------------- iteration

StepFn = Callable[[PyTree, Array], Array]


def iterate(step: StepFn, consts: PyTree, h0: Array, n: Array, k: int, *, bound: int = 0,
            stash: int = 0, grad: Array | None = None) -> Array | tuple[Array, Array]:
    """h_n = step^n(h0), with gradient through the last ``min(n, k)`` steps only (``min(n, k, grad)`` with
    ``grad``).

    Args:
      step: ``step(consts, h) -> h``, the weight-tied loop body. Everything it closes over must be
        in ``consts`` so the no-gradient part can cut it explicitly.
      consts: pytree of arrays the body reads (weights, the injected input e).
      h0: initial state [..., W].
      n: int32 loop count (traced): a scalar, or one count per token (shape h0.shape[:-1]). A token
        past its count keeps its last state (copy-forward), so its neighbours read a stable value.
      k: static truncation depth; 0 means "no gradient needed" (a fori_loop to the largest count).
      bound: static upper bound of per-token counts when k > 0 (the loop is a scan of that length;
        counts above it are clipped to it).
      stash: static length L > 0 also returns the states h_1..h_n, [L, ...h0.shape] (zeros past n;
        L must be >= max(n, k)); the first n - k are detached, the last min(n, k) carry gradient. With one
        count per token (k > 0), L is the bound and rows past a token's count repeat its h_n.
      grad: traced iterations with gradient (like n: a scalar or one per token), at most k: the progressive
        loss's random truncation (k stays the static scan length). None: k.
    """
    n = jnp.asarray(n, jnp.int32)
    if grad is not None and (stash or k == 0):
        raise ValueError("a traced gradient depth (grad) needs k > 0 and no stash")
    if n.ndim:
        if stash:  # rows past a token's count repeat its last state (a halting head's p is 0 there)
            if k == 0 or grad is not None:
                raise ValueError("a stash with one count per token needs k > 0 and no traced gradient depth")
            return _iterate_per_token(step, consts, h0, n, k, stash, emit=True)
        return _iterate_per_token(step, consts, h0, n, k, bound, grad)
    if grad is not None:
        g = jnp.clip(jnp.asarray(grad, jnp.int32), 1, k)
        if g.ndim:
            raise ValueError("a gradient depth per token (grad) needs a loop count per token (n)")
        return _truncated(step, consts, h0, n, k, g)
    if k == 0:
        if not stash:
            return jax.lax.fori_loop(0, n, lambda _, h: step(consts, h), h0)
        buf0 = jnp.zeros((stash, *h0.shape), h0.dtype)

        def body(i: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
            h = step(consts, carry[0])
            return h, jax.lax.dynamic_update_index_in_dim(carry[1], h, jnp.minimum(i, stash - 1), 0)

        return jax.lax.fori_loop(0, jnp.minimum(n, stash), body, (h0, buf0))
    n_free = jnp.maximum(n - k, 0)
    consts_ng = jax.lax.stop_gradient(consts)
    if stash:
        def free(i: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
            h = step(consts_ng, carry[0])
            return h, jax.lax.dynamic_update_index_in_dim(carry[1], h, i, 0)

        h, buf = jax.lax.fori_loop(0, n_free, free, (jax.lax.stop_gradient(h0), jnp.zeros((stash, *h0.shape), h0.dtype)))
    else:
        h = jax.lax.fori_loop(0, n_free, lambda _, h: step(consts_ng, h), jax.lax.stop_gradient(h0))
    # Keep h0's gradient path when nothing ran without gradient (n <= k): h0 enters the scan directly.
    h = jnp.where(n_free > 0, jax.lax.stop_gradient(h), h0)
    body = jax.checkpoint(step)
    n_grad = jnp.minimum(n, k)

    def grad_step(h: Array, i: Array) -> tuple[Array, Array | None]:
        h = jnp.where(i < n_grad, body(consts, h), h)
        return h, (jnp.where(i < n_grad, h, jnp.zeros_like(h)) if stash else None)

    h, ys = jax.lax.scan(grad_step, h, jnp.arange(k))
    if not stash:
        return h
    # rows n_free .. n_free + k - 1 (those past n are zero); n_free + k = max(n, k) <= stash
    return h, jax.lax.dynamic_update_slice_in_dim(jax.lax.stop_gradient(buf), ys, n_free, 0)


def _truncated(step: StepFn, consts: PyTree, h0: Array, n: Array, k: int, g: Array | int,
               emit: bool = False) -> Array | tuple[Array, Array]:
    """h_n with gradient through the last min(n, g) iterations (g <= k traced, k static): n - min(n, g)
    detached steps in a fori_loop, then a scan of k whose steps past min(n, g) pass h through. ``emit``
    also returns the scan's states [k, ...]: row i is h_{n - min(n, g) + i + 1} (rows from min(n, g) on
    repeat h_n)."""
    n_grad = jnp.minimum(n, g)
    h = jax.lax.fori_loop(0, n - n_grad, lambda _, h: step(jax.lax.stop_gradient(consts), h), jax.lax.stop_gradient(h0))
    h = jnp.where(n > n_grad, jax.lax.stop_gradient(h), h0)  # h0's gradient path when nothing ran without it
    body = jax.checkpoint(step)

    def grad_step(h: Array, i: Array) -> tuple[Array, Array | None]:
        h = jnp.where(i < n_grad, body(consts, h), h)
        return h, (h if emit else None)

    h, ys = jax.lax.scan(grad_step, h, jnp.arange(k))
    return (h, ys) if emit else h


def _iterate_per_token(step: StepFn, consts: PyTree, h0: Array, n: Array, k: int, bound: int,
                       grad: Array | None = None, emit: bool = False) -> Array | tuple[Array, Array]:
    """`iterate` with one count per token: every iteration runs on all tokens and only those still
    counting take the new state. With k > 0, token t's new state is detached outside its own last
    min(n_t, k) iterations (min(n_t, k, grad_t) with ``grad``), so each token gets exactly the gradient
    of its own truncated loop. ``emit`` (k > 0) also returns the states [bound, ...]: row i is each token's
    state after iteration min(i + 1, n_t)."""
    def keep(active: Array, new: Array, old: Array) -> Array:
        return jnp.where(active[..., None], new, old)

    if k == 0:
        return jax.lax.fori_loop(0, jnp.max(n), lambda i, h: keep(i < n, step(consts, h), h), h0)
    if bound < 1:
        raise ValueError("per-token loop counts with gradient (k > 0) need a static bound on the counts")
    n = jnp.minimum(n, bound)
    depth = k if grad is None else jnp.clip(jnp.asarray(grad, jnp.int32), 1, k)
    body = jax.checkpoint(step)

    def grad_step(h: Array, i: Array) -> tuple[Array, Array | None]:
        new = body(consts, h)
        new = keep(i >= n - depth, new, jax.lax.stop_gradient(new))
        h = keep(i < n, new, h)
        return h, (h if emit else None)

    h, ys = jax.lax.scan(grad_step, h0, jnp.arange(bound))
    return (h, ys) if emit else h


def iterate_window(step: StepFn, consts: PyTree, h0: Array, n: Array, k: int, window: int, *,
                   bound: int = 0) -> tuple[Array, Array, Array]:
    """`iterate` with gradient through the last min(n, k) steps, also returning the last ``window`` states:
    (h_n, states [window, ...h0.shape] with row j = h_{n - j}, valid [window, ...h0.shape[:-1]] bool: n - j >= 1).

    Rows past a token's first iteration (n - j < 1) hold h_1 and are not valid. Because window <= k, every
    valid row lies in the part with gradient: row j carries gradient through iterations n - k + 1 .. n - j
    (Yang et al. 2024's loss window under truncated backprop). ``n`` is a scalar, or one count per token with
    ``bound`` (static, the largest count) as in `iterate`.
    """
    if not 1 <= window <= k:
        raise ValueError(f"a window of {window} states needs 1 <= window <= k (the gradient depth, {k})")
    n = jnp.asarray(n, jnp.int32)
    if n.ndim:
        h, ys = _iterate_per_token(step, consts, h0, n, k, bound, emit=True)
        last = jnp.minimum(n, bound) - 1  # each token's row of h_n
    else:
        h, ys = _truncated(step, consts, h0, n, k, k, emit=True)
        last = jnp.minimum(n, k) - 1
    j = jnp.arange(window).reshape((window,) + (1,) * (h0.ndim - 1))
    rows = last - j  # [window, ...]: the row of h_{n - j}
    valid = jnp.broadcast_to(rows >= 0, (window, *h0.shape[:-1]))
    rows = jnp.broadcast_to(jnp.maximum(rows, 0), (window, *h0.shape[:-1]))
    return h, jnp.take_along_axis(ys, rows[..., None], axis=0), valid


CachedStepFn = Callable[[PyTree, Array, Array, PyTree, Array], tuple[Array, PyTree]]
StopFn = Callable[[Array, Array, Array, Array, PyTree], tuple[Array, PyTree]]


class Phase(NamedTuple):
    """One static buffer of a compacted loop: ``step`` (a `CachedStepFn`) runs an iteration on the fresh tokens
    gathered into it; ``fits(fresh) -> bool []`` whether it holds them all."""

    step: CachedStepFn
    fits: Callable[[Array], Array]


def while_phases(phases: Sequence[Phase], cond: Callable[[PyTree], Array],
                 body: Callable[[CachedStepFn, PyTree], PyTree], carry: PyTree,
                 fresh: Callable[[PyTree], Array]) -> PyTree:
    """``while cond(carry): carry = body(step, carry)``, in ``phases`` (largest buffer first; the first holds any
    fresh set): one ``while_loop`` per phase with its ``step``, each running while no later phase's buffer holds
    the fresh tokens ``fresh(carry)``, which only shrink. The loop of `iterate_until` and of a routed bank's
    compacted rounds."""
    for j, phase in enumerate(phases):
        later = [p.fits for p in phases[j + 1:]]

        def go(c: PyTree, later: list = later) -> Array:  # a smaller buffer holds the fresh tokens: move on
            f = fresh(c)
            return cond(c) & ~jnp.any(jnp.stack([fits(f) for fits in later])) if later else cond(c)

        carry = jax.lax.while_loop(go, lambda c, step=phase.step: body(step, c), carry)
    return carry


def phase_switch(phases: Sequence[Phase]) -> CachedStepFn:
    """One step that runs the last of ``phases`` (largest buffer first) whose buffer holds the fresh tokens,
    chosen by `lax.switch`: for a single iteration outside a loop (the one that completes a decoding cache's
    fill). The first phase must hold any fresh set."""
    def step(consts: PyTree, i: Array, h: Array, side: PyTree, fresh: Array) -> tuple[Array, PyTree]:
        fits = jnp.stack([p.fits(fresh) for p in phases])
        which = len(phases) - 1 - jnp.argmax(fits[::-1])
        return jax.lax.switch(which, [p.step for p in phases], consts, i, h, side, fresh)
    return step


class Until(NamedTuple):
    """An inference loop's result: the final states h [..., W], ``used`` [...] float32 iterations each token
    ran, the stop rule's final state, the side state the step carried (a decoding chunk's keys and values),
    ``ran`` int32 [] the iterations the loop itself ran (its last token's count), and ``fresh`` [...] bool the
    tokens that ran its last iteration (a compacted decoding step computes the keys and values of their final
    states once more, for the cache slots the loop never reached)."""

    h: Array
    used: Array
    state: PyTree
    side: PyTree
    ran: Array
    fresh: Array


def iterate_until(step: CachedStepFn | Sequence[Phase], consts: PyTree, h0: Array, n: Array, *, stop: StopFn | None = None,
                  state0: PyTree = (), due: Callable[[Array], Array] | None = None, side0: PyTree = (),
                  active0: Array | None = None) -> Until:
    """Inference (no gradient): iterate every token until its stop rule fires or it reaches its count.

    The one loop of evaluation, prefill and cached decoding. ``step(consts, i, h, side, fresh) -> (h, side)``
    runs iteration i (0-based); ``side`` is what the step carries besides the state (decoding: the chunk's
    keys and values of each iteration; compacted evaluation and decoding: also the block's current keys and
    values of every token; ``()`` otherwise); ``fresh`` [...] bool marks the tokens that ran the previous
    iteration (all at i = 0): every other token's state is frozen and was frozen when the previous iteration
    ran, so a step may reuse what it computed from them then (their keys and values) and compute only the
    fresh tokens. ``n`` is the cap,
    int32 [] or one per token (shape h0.shape[:-1]). ``stop(i, h_prev, h, active, state) -> (fire, state)``
    is asked after iteration i (1-based) with the states before and after it and the tokens that ran it
    (``active``); a token stops when it fires at an iteration where ``due(i)`` holds, and keeps its state
    from then on (copy-forward: its neighbours read the keys and values of its frozen state). ``active0``
    (default all) are the tokens that run at all (evaluation leaves padding out: no real token reads it).
    The loop ends when no token runs. Without a stop rule and with one count, it is a plain ``fori_loop``.

    ``step`` may instead be phases (compacted inference: the largest buffer first, the first holding any fresh
    set): one ``while_loop`` per phase, each running while no later phase's buffer holds the fresh tokens. The
    fresh set only shrinks, so the buffers shrink with it, and no iteration pays for a `lax.switch` (XLA copies
    a conditional's carried state, keys and values included, in and out at every iteration).
    """
    n = jnp.asarray(n, jnp.int32)
    everyone = jnp.ones(h0.shape[:-1], bool)
    phases = [Phase(step, lambda fresh: jnp.ones((), bool))] if callable(step) else list(step)
    if stop is None and n.ndim == 0 and active0 is None:  # every token runs every iteration: the first phase
        h, side = jax.lax.fori_loop(0, n, lambda i, c: phases[0].step(consts, i, *c, everyone), (h0, side0))
        return Until(h, jnp.broadcast_to(n.astype(jnp.float32), h0.shape[:-1]), state0, side, n, everyone)
    due = due or (lambda i: jnp.ones((), bool))
    n_max = jnp.max(n)

    def cond(c: tuple) -> Array:
        return (c[0] < n_max) & jnp.any(c[2])

    def body(step: CachedStepFn, c: tuple) -> tuple:
        i, h, active, fresh, used, state, side = c
        new, side = step(consts, i, h, side, fresh)
        h_next = jnp.where(active[..., None], new, h)
        used = used + active.astype(jnp.float32)
        ran = active
        if stop is not None:
            fire, state = stop(i + 1, h, h_next, active, state)
            active = active & ~(fire & due(i + 1))
        return i + 1, h_next, active & (i + 1 < n), ran, used, state, side

    active = everyone if active0 is None else active0 & (n > 0)
    c = (jnp.zeros((), jnp.int32), h0, active, everyone, jnp.zeros(h0.shape[:-1], jnp.float32), state0, side0)
    ran, h, _, fresh, used, state, side = while_phases(phases, cond, body, c, lambda c: c[3])
    return Until(h, used, state, side, ran, fresh)


# ----------------------------------------------------------------------------- diagnostics

TRACE_STATS = ("rel_change", "state_norm", "token_cosine")


def state_stats(h_prev: Array, h: Array, real_BT: Array | None = None) -> Array:
    """[3] diagnostics of one iteration for a state h: [B, T, W], over the real tokens (``real_BT``
    [B, T] bool, default all; padding states never reach an output, so they do not count):

    - rel_change: mean over tokens of ||h_i - h_{i-1}|| / max(||h_i||, ||h_{i-1}||) (in [0, 2];
      equals ||h_i - h_{i-1}|| / ||h_{i-1}|| near a fixed point, and stays finite from a zero start);
    - state_norm: mean per-token norm ||h_i||;
    - token_cosine: mean cosine similarity between distinct tokens of a sequence (1 = collapse).
    """
    h, h_prev = h.astype(jnp.float32), h_prev.astype(jnp.float32)
    w_BT = jnp.ones(h.shape[:-1], jnp.float32) if real_BT is None else real_BT.astype(jnp.float32)
    count = jnp.maximum(w_BT.sum(), 1.0)
    norm = jnp.linalg.norm(h, axis=-1)
    denom = jnp.maximum(jnp.maximum(norm, jnp.linalg.norm(h_prev, axis=-1)), 1e-12)
    rel = jnp.sum(w_BT * jnp.linalg.norm(h - h_prev, axis=-1) / denom) / count
    u = w_BT[..., None] * h / jnp.maximum(norm, 1e-12)[..., None]
    T_B = w_BT.sum(-1)
    total_B = jnp.sum(jnp.sum(u, axis=-2) ** 2, axis=-1)  # ||sum_t u_t||^2 = T + sum_{s != t} cos
    cos = jnp.mean((total_B - T_B) / jnp.maximum(T_B * (T_B - 1), 1.0))
    return jnp.stack([rel, jnp.sum(w_BT * norm) / count, cos])


def iterate_traced(step: StepFn, consts: PyTree, h0: Array, n: Array, trace_len: int,
                   real_BT: Array | None = None) -> tuple[Array, Array]:
    """Like ``iterate(..., k=0)`` but also records `state_stats` (over ``real_BT`` tokens) of
    iterations 1..trace_len: returns (h_n, trace [trace_len, 3]); rows past n are NaN."""
    trace0 = jnp.full((trace_len, len(TRACE_STATS)), jnp.nan, jnp.float32)

    def body(i: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        h, trace = carry
        h_new = step(consts, h)
        row = state_stats(h, h_new, real_BT)
        trace = jax.lax.dynamic_update_slice(trace, row[None], (jnp.minimum(i, trace_len - 1), 0))
        trace = jnp.where(i < trace_len, trace, carry[1])
        return h_new, trace

    return jax.lax.fori_loop(0, jnp.asarray(n, jnp.int32), body, (h0, trace0))
