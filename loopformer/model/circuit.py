"""A looped circuit, and the parallel bank (the ⊕) that runs circuits side by side.

For one circuit c with depth D, width w and the normed residual stream xn: [B, T, d_model]:

    e   = read_c(xn)                      # [B, T, w]  its slice of the stream, or a projection
    h_0 = init_c(e)                       # zeros | e | noise
    h_i = stack_c(inject_c(h_{i-1}, e))   # i = 1..n_c, the same D blocks every iteration
    out = write_c(norm(h_n))              # [B, T, w] back into its slice, or [B, T, d_model]; zero-initialised

A bank adds ``g_c * out_c + (1 - g_c) * fill_c`` over its circuits (the plan's gates and fills):
gate 1 runs the circuit, 0 removes it (fill 0: zero ablation; the circuit's mean output: mean ablation).
With a router (`loopformer.model.router`) the bank runs in rounds instead, and the router picks which
circuit each token runs next.

One iteration function (`Circuit.iteration`) serves training, evaluation, prefill and cached decoding:
with a decoding context it reads earlier tokens' keys and values from the circuit's cache and gathers the
chunk's own per iteration. The variants it is built from (initial state, injection, halting kind, exit
rule, cache policy) are registered classes in `loopformer.variants`.

Weights are stored by circuit name (``circuits/X/...``): a circuit's parameter paths depend only on its
name and shapes. Circuits whose modules are interchangeable (same shapes and behaviour) and that run
the same way (truncation depth, exit rule) run batched: their weights are stacked when the bank is
called and one ``vmap`` runs them, so a bank of many narrow circuits costs one kernel, not many.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from loopformer.config.schema import CircuitConfig, RouterConfig
from loopformer.errors import DecodingError, PlanError
from loopformer.model.cache import store
from loopformer.model.layers import Block, BlockSettings, normal_init, run_stack, stack_layers, stacked, zeros_init
from loopformer.model.loop import (
    Phase,
    Until,
    iterate,
    iterate_traced,
    iterate_until,
    iterate_window,
    phase_switch,
    while_phases,
)
from loopformer.model.plan import CircuitPlan, CircuitReport, Plan
from loopformer.model.router import Router
from loopformer.variants.cache import CachePolicy
from loopformer.variants.exits import ExitRule, exit_rule, latent_change, latent_change_sq
from loopformer.variants.halting import Halting
from loopformer.variants.state import INITS, INJECTIONS

Array = jax.Array
Readout = Callable[[Array], Array]  # the stream after a bank [B, T, D] -> logits [B, T, V]
KV = tuple[Array, Array]


class Decoding(NamedTuple):
    """Cached decoding of a chunk of t new tokens: each row's first new position ``start_B`` [B] (cache
    positions before it are read) and the cache ``policy``."""

    start_B: Array
    policy: CachePolicy


class Context(NamedTuple):
    """What every layer of one forward pass shares: token positions [B, T] (the sequence index: a cache
    slot when decoding), the attention mask [B, 1, T, T] (or None), the real (non-padding) tokens [B, T]
    bool (or None: all real), when decoding with a cache `Decoding`, and ``rope_BT`` [B, T] the positions
    the position scheme rotates by where they are not ``positions_BT`` (model.position=coupled: each
    token's digit place)."""

    positions_BT: Array
    mask: Array | None
    valid_BT: Array | None
    decoding: Decoding | None = None
    rope_BT: Array | None = None

    @property
    def rotary(self) -> Array:
        """The positions queries and keys are rotated by [B, T]."""
        return self.positions_BT if self.rope_BT is None else self.rope_BT


class CircuitOut(NamedTuple):
    """A circuit's run: ``out`` [B, T, O] what it writes (O = w for io slice, d_model for project);
    ``trace`` [trace_len, 3]; ``used`` [B, T] iterations per token; with a halting head and a stash,
    ``steps`` [L, B, T, O] the write of every iteration, ``exit_p`` [L, B, T] and the head's
    ``exit_lambda`` [L, B, T], ``ponder`` [B, T] (ACT); with a window of W (`CircuitPlan.window`), ``steps``
    [W, B, T, O] the writes of iterations n, n - 1, ..., n - W + 1 and (W >= 2) ``settle`` [B, T] the squared relative
    change of the state over iteration n, ||h_n - h_{n-1}||^2 / ||h_n||^2 (0 where n < 2; with gradient);
    when decoding, ``cache`` its keys and values with the chunk stored and ``state`` [B, t, w] the final
    states; in inference, ``computed`` [] the token-iterations its blocks executed (masked: every token of
    the batch at every iteration the loop ran; compacted: the gathered buffer's size at each; when decoding,
    also the iteration that fills the cache slots of a loop that stopped early); in inference of a routed
    bank, ``scored`` [] the token-rounds its router scored (every token of the batch at every round the bank
    ran: the stream's writes and the router's scores are computed for all of them)."""

    out: Array
    trace: Array | None = None
    used: Array | None = None
    steps: Array | None = None
    exit_p: Array | None = None
    ponder: Array | None = None
    cache: tuple[KV, ...] | None = None
    state: Array | None = None
    computed: Array | None = None
    exit_lambda: Array | None = None
    scored: Array | None = None
    settle: Array | None = None


# Compacted inference (in buffers of `Plan.compact_shares`) by default only in batches of at least this many tokens:
# below it the extra programs cost more to compile than the skipped work saves (bench/compact.py: 1.04x at 64 x 33
# tokens, 1.31x at 64 x 129)
COMPACT_MIN_TOKENS = 4096


# A flat compaction buffer gathers each token's row of keys and values ([N, S, K, H] in float32, keys and values; S
# the row's T or a windowed circuit's span): buffers that would take more than this are left out (the row-by-token
# buffers need no such copy)
FLAT_KV_BYTES = 64 * 2**20


def _compacts(choice: bool | None, B: int, T: int) -> bool:
    """Whether inference over [B, T] tokens compacts: `Plan.compact` when given, else the batch's size."""
    return B * T >= COMPACT_MIN_TOKENS if choice is None else choice


class _Probe(NamedTuple):
    """What an exit rule reads of the circuit it stops (`loopformer.variants.exits.Probe`)."""

    circuit: Circuit
    e: Array
    n: Array
    readout: Readout | None
    out_width: int

    @property
    def halting(self) -> Halting:
        return self.circuit.halting

    def emit(self, h: Array) -> Array:
        return self.circuit.emit(h, self.e)

    def halt_prob(self, h: Array) -> Array:
        return self.circuit.halt_prob(h)

    @property
    def causal(self) -> bool:
        return self.circuit.blocks.attn.causal


class Circuit(nnx.Module):
    """One circuit's weights: ``blocks`` [D, ...] (a stack of D blocks of width w), ``read`` (io:
    project), ``adapter`` (inject: concat), ``loop_norm`` (state_norm), ``out_norm``, ``write`` and
    ``halt`` (a halting kind with a head)."""

    def __init__(self, c: CircuitConfig, *, d_model: int, settings: BlockSettings, rngs: nnx.Rngs):
        self.project, self.replace = not c.sliced, c.replaces
        self.init, self.noise_std = INITS.get(c.init)(), c.init_noise_std
        self.injection = INJECTIONS.get(c.inject)()
        self.halting = c.halting.rule()
        w, dtype = c.width, settings.dtype
        lin = dict(use_bias=False, dtype=dtype)
        self.blocks = stacked(lambda r: _circuit_block(c, settings, r), c.depth, rngs)
        if self.project:
            self.read = nnx.Linear(d_model, w, kernel_init=normal_init(settings.std, ("embed", "circuit")), rngs=rngs,
                                   **lin)
        self.injection.build(self, w, dtype=dtype, rngs=rngs)
        if c.state_norm:
            # h_i = norm(stack(inject(h_{i-1}, e))): without it, residual blocks plus additive
            # injection grow the state like i * e, so norm(h_i) stops changing with i.
            self.loop_norm = nnx.RMSNorm(w, dtype=dtype, rngs=rngs, epsilon=settings.norm_eps)
        if not self.replace:  # output: replace writes its final state as it is
            self.out_norm = nnx.RMSNorm(w, dtype=dtype, rngs=rngs, epsilon=settings.norm_eps)
            self.write = nnx.Linear(w, d_model if self.project else w,
                                    kernel_init=zeros_init(("circuit", "embed")), rngs=rngs, **lin)
        if self.halting.has_head:
            self.halt = nnx.Linear(w, 1, use_bias=True, kernel_init=normal_init(settings.std, ("circuit", None)),
                                   bias_init=nnx.initializers.constant(self.halting.head_bias), dtype=dtype, rngs=rngs)

    # ------------------------------------------------------------------ pieces
    def begin(self, src: Array, key: Array) -> tuple[Array, Array]:
        """(e, h_0) from ``src`` (io slice: its slice [B, T, w]; io project: the normed stream)."""
        e = self.read(src) if self.project else src
        return e, self.init(e, key, self.noise_std)

    def iteration(self, h_BTW: Array, e_BTW: Array, ctx: Context, i: Array | None = None,
                  cache: tuple[KV, ...] | None = None, chunk: tuple[KV, ...] = ()) -> tuple[Array, tuple[KV, ...]]:
        """Iteration i (0-based): h <- stack(inject(h, e)), then the state norm. When decoding, the stack
        reads earlier tokens' keys and values from ``cache`` (per layer [S, B, T, K, H]) at the policy's
        slot for i, and the chunk's own from ``chunk`` (per layer [S, B, t, K, H]), where it also stores
        this iteration's (if the policy writes at i). Returns (h, chunk)."""
        x = self.injection(self, h_BTW, e_BTW)
        if ctx.decoding is None:
            x = run_stack(self.blocks, x, ctx.rotary, ctx.mask)
        else:
            x, chunk = self._cached_stack(x, ctx, i, cache, chunk)
        return self.state_norm(x), chunk

    def state_norm(self, x: Array) -> Array:
        """x after the state norm (RMSNorm, state_norm: true), or x where the circuit has none."""
        return self.loop_norm(x) if hasattr(self, "loop_norm") else x

    def _cached_stack(self, x: Array, ctx: Context, i: Array, cache: tuple[KV, ...], chunk: tuple[KV, ...]
                      ) -> tuple[Array, tuple[KV, ...]]:
        policy = ctx.decoding.policy
        slot, writes = policy.slot(i), policy.writes(i)
        at = lambda a: jax.lax.dynamic_index_in_dim(a, slot, 0, False)  # noqa: E731
        new = []
        for layer, (k_c, v_c), (k_b, v_b) in zip(stack_layers(self.blocks), cache, chunk, strict=True):
            own = (at(k_b), at(v_b))
            x, (k, v) = layer.cached(x, ctx.positions_BT, (at(k_c), at(v_c)), ctx.decoding.start_B, (*own, ~writes),
                                    rope_Bt=ctx.rope_BT)
            new.append(tuple(jax.lax.dynamic_update_index_in_dim(b, jnp.where(writes, f.astype(b.dtype), o), slot, 0)
                             for b, f, o in zip((k_b, v_b), (k, v), own, strict=True)))
        return x, tuple(new)

    def emit(self, h: Array, e: Array | None = None) -> Array:
        """What the circuit writes for a state: write(norm(h)) (any leading axes); for output: replace,
        h - e (added to the stream, whose slice is e, it leaves h there)."""
        if self.replace:
            return h - e
        return self.write(self.out_norm(h))

    def halt_prob(self, h: Array) -> Array:
        """lambda = sigmoid(w . norm(h) + b) [...], the halting head's exit probability (float32)."""
        return jax.nn.sigmoid(self.halt(self.out_norm(h))[..., 0].astype(jnp.float32))

    # ------------------------------------------------------------------ the loop
    def __call__(self, src: Array, ctx: Context, run: CircuitPlan, *, readout: Readout | None = None,
                 cache: tuple[KV, ...] | None = None, h_init: Array | None = None) -> CircuitOut:
        """Run the loop on ``src`` as ``run`` says: ``run.loops`` iterations (int32 [] or per token; the cap
        under an exit rule), gradient through the last ``run.backprop`` when > 0, state statistics of the
        first ``run.trace_len``, every iteration kept (``run.stash``, halting circuits in training), the last
        ``run.window`` kept (the loss at each of them, train.iteration_loss).
        ``readout`` maps this circuit's write to logits (exit rules that read the output). When decoding
        (``ctx.decoding``), ``cache`` holds earlier tokens' keys and values, and ``h_init`` [B, t, w]
        replaces the initial state (continuous thinking)."""
        e, h0 = self.begin(src, run.key)
        h0 = h0 if h_init is None else h_init.astype(h0.dtype)
        n = run.loops
        graphdef, state = nnx.split(self)
        consts = (state, e)

        def step(consts: tuple[Any, Array], h: Array) -> Array:  # everything it reads is in consts
            return nnx.merge(graphdef, consts[0]).iteration(h, consts[1], ctx)[0]

        if (run.trace_len or run.backprop or run.stash) and ctx.decoding is not None:
            raise DecodingError("decoding with a cache runs inference only (no trace, gradient or stash)")
        if run.trace_len:
            h, trace = iterate_traced(step, consts, h0, n, run.trace_len, ctx.valid_BT)
            return CircuitOut(self.emit(h, e), trace=trace)
        if run.exit is None and run.stash and self.halting.has_head:  # training a halting circuit
            return self._stashed(step, consts, h0, n, run.backprop, run.stash)
        if run.exit is None and run.window:  # training with a loss after each of the last W iterations
            h, states, valid = iterate_window(step, consts, h0, n, run.backprop, run.window, bound=run.bound)
            settle = None if run.window < 2 else jnp.where(valid[1], latent_change_sq(states[1], states[0]), 0.0)
            return CircuitOut(self.emit(h, e), used=None if jnp.ndim(n) == 0 else jnp.asarray(n, jnp.float32),
                              steps=self.emit(states, e), settle=settle)
        if run.exit is None and run.backprop:
            if self.halting.mixes_output:
                raise PlanError("a halting circuit needs plan.stash (its loop's length bound) outside exits")
            h = iterate(step, consts, h0, n, run.backprop, bound=run.bound, grad=run.grad)  # truncated backprop
            return CircuitOut(self.emit(h, e), used=None if jnp.ndim(n) == 0 else jnp.asarray(n, jnp.float32))
        return self._infer(graphdef, consts, h0, n, run.exit, readout, ctx, cache, run.compact,
                           shares=run.compact_shares)

    def _infer(self, graphdef: nnx.GraphDef, consts: tuple[Any, Array], h0: Array, n: Array, rule: ExitRule | None,
               readout: Readout | None, ctx: Context, cache: tuple[KV, ...] | None,
               compact_ok: bool | None = None, *, shares: tuple[float, ...]) -> CircuitOut:
        """Inference, with or without an exit rule, with or without a cache: `iterate_until`. Compacted
        (``compact_ok``: `Plan.compact`, None: batches or decoding chunks of COMPACT_MIN_TOKENS or more) when
        tokens may stop at different iterations and the circuit is one block: then a frozen token's keys and
        values never change (they depend on its own state only), so they are computed once, in the iteration
        after it stops, and reused (when decoding, also for the cache slots of the later iterations)."""
        e = consts[1]
        if rule is None and self.halting.mixes_output:  # ACT evaluates with its own halting rule, up to n
            rule = exit_rule("learned", self.halting.default_q())
        probe = _Probe(self, e, n, readout, self.write.kernel.value.shape[-1] if hasattr(self, "write") else e.shape[-1])
        chunk0 = () if cache is None else self._chunk(cache, h0)

        def step(consts: tuple[Any, Array], i: Array, h: Array, chunk: tuple, fresh: Array) -> tuple[Array, tuple]:
            del fresh  # every token runs the step
            return nnx.merge(graphdef, consts[0]).iteration(h, consts[1], ctx, i, cache, chunk)

        B, T = h0.shape[:2]
        adaptive = rule is not None or jnp.ndim(n) > 0  # tokens may stop at different iterations
        compact = adaptive and _compacts(compact_ok, B, T) and self.depth == 1
        side0, active0 = chunk0, None
        if cache is None and adaptive and ctx.valid_BT is not None:
            active0 = ctx.valid_BT  # padding never reaches an output: it need not run
        if compact:
            step = self._compact_step(graphdef, ctx, shares, cache)
            side0 = (self._kv_buffers(h0), jnp.zeros((), jnp.float32), chunk0)
        if rule is None:
            loop = iterate_until(step, consts, h0, n, side0=side0, active0=active0)
            out = self.emit(loop.h, e)
        else:
            loop = iterate_until(step, consts, h0, n, stop=lambda i, hp, h, a, st: rule.stop(probe, i, hp, h, a, st),
                                 state0=rule.start(probe, h0), due=rule.due, side0=side0, active0=active0)
            out = rule.output(probe, loop.state, self.emit(loop.h, e))
        used = None if rule is None and jnp.ndim(n) == 0 and cache is None else loop.used
        computed = loop.side[1] if compact else loop.ran.astype(jnp.float32) * B * T
        if cache is None:
            return CircuitOut(out, used=used, computed=computed)
        cache, filled = self._store(phase_switch(step) if compact else step, consts, loop, n, ctx, cache,
                                    early=rule is not None, compact=compact)
        return CircuitOut(out, used=used, cache=cache, state=loop.h, computed=computed + filled)

    @property
    def depth(self) -> int:
        return jax.tree.leaves(nnx.state(self.blocks))[0].shape[0]

    def _kv_buffers(self, h0: Array) -> KV:
        """Zeroed keys and values [B, T, K, H] of the (one) block, for compacted inference."""
        attn = self.blocks.attn  # the stack's attention: its static shapes are every layer's
        shape = (*h0.shape[:2], attn.kv_heads, attn.head_dim)
        # float32 holds any compute dtype's values exactly; attention casts them back to its own
        return jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)

    def _compact_step(self, graphdef: nnx.GraphDef, ctx: Context, shares: tuple[float, ...],
                      cache: tuple[KV, ...] | None = None) -> list[Phase]:
        """The compacted iteration, one `Phase` per buffer size, largest first (`while_phases` runs each while
        no smaller one holds the fresh tokens; `phase_switch` picks one for a single iteration); each phase's
        step is ``step(consts, i, h, (kv, computed, chunk), fresh)``. The fresh tokens (those
        that ran the previous iteration) are gathered into an [R, c] buffer: the R rows that hold any, then
        in each the fresh tokens in sequence order, R and c the smallest of B / ``shares`` and
        T / ``shares`` that hold them (R = B or c = T gathers nothing along that axis); or, in evaluation,
        into a flat buffer of N tokens from any rows, N the smallest of B T / ``shares`` that holds them (rows
        whose running tails differ in length: an [R, c] buffer pads every row to the longest), for every N whose
        gathered keys and values ([N, S, K, H], each token reads its own row's: S = T, or a windowed circuit's
        span) stay under FLAT_KV_BYTES; [R, c] buffers then only where R c is above the largest such N. They run
        the block over their rows' keys and values ``kv`` (each token's, from its current state), storing their
        own.
        Tokens that stopped in the previous iteration run once more this way, which stores the keys and values
        of their final state; their new state is discarded by the loop.

        When decoding (``cache``: the earlier positions' keys and values per slot), the gathered rows also read
        their cache at the policy's slot for i, and the chunk's keys and values of iteration i (``chunk``, per
        slot, as the masked step keeps them) are ``kv`` after the step, written where the policy writes at i:
        a frozen token's keys and values at iteration i are those of its final state, which ``kv`` holds."""
        B, T = ctx.positions_BT.shape
        row_caps = sorted({math.ceil(B / share) for share in shares})
        tok_caps = sorted({math.ceil(T / share) for share in shares})
        seg = None if ctx.mask is None else ctx.mask[:, 0]  # [B, T, T]

        def gathered(R: int, c: int) -> Callable:
            def run(consts: tuple[Any, Array], h: Array, kv: KV, fresh: Array, dec: tuple) -> tuple[Array, KV]:
                circuit = nnx.merge(graphdef, consts[0])
                rows = _select(jnp.any(fresh, axis=-1), R) if R < B else None  # [R], B in empty slots
                take = (lambda a: a) if rows is None else (lambda a: a[jnp.minimum(rows, B - 1)])  # noqa: E731
                h_r, e_r, f_r, pos_r, kv_r = take(h), take(consts[1]), take(fresh), take(ctx.rotary), \
                    tuple(take(b) for b in kv)
                if rows is not None:
                    f_r = f_r & (rows < B)[:, None]
                seg_r = None if seg is None else take(seg)
                if c < T:
                    idx = _select(f_r, c)  # [R, c], T in empty slots
                    at = jnp.arange(f_r.shape[0])[:, None], jnp.minimum(idx, T - 1)
                    h_c, e_c, pos_c, write = h_r[at], e_r[at], pos_r[at], idx < T
                    mask = None if seg_r is None else seg_r[at][:, None]
                else:
                    at, idx, h_c, e_c, pos_c, write = None, None, h_r, e_r, pos_r, f_r
                    mask = None if seg_r is None else seg_r[:, None]
                earlier = shared = None
                if dec:  # (earlier keys, values at the slot [B, S, K, H], the chunk's at the slot [B, T, K, H], use)
                    k_e, v_e, k_s, v_s, use = dec
                    abs_r = take(ctx.positions_BT)
                    earlier = (take(k_e), take(v_e), take(ctx.decoding.start_B), abs_r if at is None else abs_r[at])
                    shared = (take(k_s), take(v_s), use)
                x = circuit.injection(circuit, h_c, e_c)
                x, kv_r = stack_layers(circuit.blocks)[0].compact(x, pos_c, idx, kv_r, write, mask, earlier, shared)
                x = circuit.state_norm(x).astype(h.dtype)
                if idx is None:
                    h_r = jnp.where(write[..., None], x, h_r)
                else:
                    h_r = h_r.at[jnp.arange(f_r.shape[0])[:, None], idx].set(x, mode="drop")
                if rows is None:
                    return h_r, kv_r
                return h.at[rows].set(h_r, mode="drop"), tuple(b.at[rows].set(b_r, mode="drop")
                                                               for b, b_r in zip(kv, kv_r, strict=True))
            return run

        def flat(N: int) -> Callable:
            def run(consts: tuple[Any, Array], h: Array, kv: KV, fresh: Array, dec: tuple) -> tuple[Array, KV]:
                del dec  # evaluation only
                circuit = nnx.merge(graphdef, consts[0])
                at = _select(fresh.reshape(-1), N)  # [N], B * T in empty slots
                rows, idx = at // T, jnp.where(at < B * T, at % T, T)  # empty: row B, index T (scatters drop)
                take = lambda a: a[jnp.minimum(rows, B - 1), jnp.minimum(idx, T - 1)]  # noqa: E731
                mask = None if seg is None else take(seg)[:, None, None]  # [N, 1, 1, T]
                x = circuit.injection(circuit, take(h)[:, None], take(consts[1])[:, None])
                x, kv = stack_layers(circuit.blocks)[0].flat(x, take(ctx.rotary)[:, None], rows, idx, kv, mask)
                x = circuit.state_norm(x).astype(h.dtype)
                return h.at[rows, idx].set(x[:, 0], mode="drop"), kv
            return run

        attn = self.blocks.attn
        flat_caps = [] if cache is not None else sorted(
            N for N in {math.ceil(B * T / share) for share in shares}
            if N < B * T and 2 * N * attn.flat_span(T) * attn.kv_heads * attn.head_dim * 4 <= FLAT_KV_BYTES)
        policy = None if ctx.decoding is None else ctx.decoding.policy

        def phase(run: Callable, size: int) -> Callable:
            def step(consts: tuple[Any, Array], i: Array, h: Array, side: tuple, fresh: Array) -> tuple[Array, tuple]:
                kv, computed, chunk = side
                dec = ()
                if cache is not None:  # one block: one layer of cache and chunk
                    slot, writes = policy.slot(i), policy.writes(i)
                    at = lambda a: jax.lax.dynamic_index_in_dim(a, slot, 0, False)  # noqa: E731
                    (k_c, v_c), = cache
                    (k_b, v_b), = chunk
                    dec = (at(k_c), at(v_c), at(k_b), at(v_b), ~writes)
                h, kv = run(consts, h, kv, fresh, dec)
                if cache is not None:
                    put = lambda b, f: jnp.where(writes, f.astype(b.dtype), at(b))  # noqa: E731
                    chunk = (tuple(jax.lax.dynamic_update_index_in_dim(b, put(b, f), slot, 0)
                                   for b, f in zip(chunk[0], kv, strict=True)),)
                return h, (kv, computed + size, chunk)
            return step

        def rows_by_tokens(R: int, c: int) -> Phase:
            def fits(fresh: Array) -> Array:
                per_row = jnp.sum(fresh, axis=-1)
                return (jnp.sum(per_row > 0) <= R) & (jnp.max(per_row) <= c)
            return Phase(phase(gathered(R, c), R * c), fits)

        def tokens(N: int) -> Phase:
            return Phase(phase(flat(N), N), lambda fresh: jnp.sum(fresh) <= N)

        # A flat buffer holds any fresh set a rows-by-tokens one of its size holds, so at and below the largest flat
        # buffer rows by tokens only add programs: on a parity model (batch 64 x 17, shares 1, 2, 4, 8) 19 phases
        # compiled in 22 s where the 5 left compile in 7, at the same time per token. Rows by tokens remain above it:
        # in decoding (its chunks have no flat buffers) and where a flat buffer's per-token copy of keys and values
        # would pass FLAT_KV_BYTES. Largest first.
        top = max(flat_caps, default=0)
        buffers = [(R * c, rows_by_tokens(R, c)) for R in row_caps for c in tok_caps if R * c > top] + \
                  [(N, tokens(N)) for N in flat_caps]
        return [phase for _, phase in sorted(buffers, key=lambda b: -b[0])]

    def _chunk(self, cache: tuple[KV, ...], h0: Array) -> tuple[KV, ...]:
        """Per layer, a [S, B, t, K, H] buffer for the chunk's keys and values of each slot."""
        t = h0.shape[1]
        return tuple((jnp.zeros((k.shape[0], k.shape[1], t, *k.shape[3:]), k.dtype),) * 2 for k, _ in cache)

    def _store(self, step: Callable, consts: Any, loop: Until, n: Array, ctx: Context, cache: tuple[KV, ...], *,
               early: bool, compact: bool = False) -> tuple[tuple[KV, ...], Array]:
        """The cache with the chunk's keys and values stored at its positions, and the token-iterations the
        fill below executed. A loop that ended before ``n`` (every token stopped) leaves the slots of
        iterations ran .. n - 1 unwritten; a later token running that long reads there what the forward pass
        computes: the keys and values of the frozen final states, which one more iteration gives (exact for
        one-block circuits; deeper blocks attend to neighbours that may still have been running at those
        iterations). Masked, that iteration runs every token; compacted, only those that ran the loop's last
        iteration (every other token's keys and values are those of its final state already)."""
        policy = ctx.decoding.policy
        chunk = loop.side[2] if compact else loop.side
        S, B, t = chunk[0][0].shape[:3]

        def fill(chunk: tuple) -> tuple[tuple, Array]:
            if compact:
                side = step(consts, loop.ran, loop.h, (*loop.side[:2], chunk), loop.fresh)[1]
                extra, cost = side[2], side[1] - loop.side[1]
            else:
                extra, cost = step(consts, loop.ran, loop.h, chunk, jnp.ones(loop.h.shape[:-1], bool))[1], B * t
            ran = jnp.broadcast_to(loop.ran, (B,))
            target = policy.later_slots(ran, n, S)  # [S, B]
            src = policy.slot(loop.ran)

            def put(a: Array, b: Array) -> Array:
                fresh = jax.lax.dynamic_index_in_dim(b, src, 0, True)  # [1, B, t, K, H]
                return jnp.where(target[:, :, None, None, None], fresh, a)

            return tuple(tuple(put(a, b) for a, b in zip(kv, kv_new, strict=True)) for kv, kv_new in
                         zip(chunk, extra, strict=True)), jnp.asarray(cost, jnp.float32)

        filled = jnp.zeros((), jnp.float32)
        if early:  # only an exit rule ends the loop before n
            chunk, filled = jax.lax.cond(loop.ran < n, fill, lambda c: (c, jnp.zeros((), jnp.float32)), chunk)
        pos = ctx.positions_BT
        return tuple((store(k_c, k_b, pos), store(v_c, v_b, pos)) for (k_c, v_c), (k_b, v_b) in zip(cache, chunk,
                                                                                                 strict=True)), filled

    def _stashed(self, step: Callable, consts: Any, h0: Array, n: Array, k: int, stash: int) -> CircuitOut:
        """Training a halting circuit: every iteration kept, its exit distribution and per-step writes; a
        kind that mixes its output writes the p-weighted mixture."""
        h, states = iterate(step, consts, h0, n, k, stash=stash)
        lambdas, steps = self.halt_prob(states), self.emit(states)  # [L, B, T], [L, B, T, O]
        p, used, ponder = self.halting.distribution(lambdas, n)
        out = jnp.einsum("lbt,lbto->bto", p.astype(steps.dtype), steps) if self.halting.mixes_output else self.emit(h)
        return CircuitOut(out, used=used, steps=steps, exit_p=p, ponder=ponder, exit_lambda=lambdas)


def _circuit_block(c: CircuitConfig, settings: BlockSettings, rngs: nnx.Rngs) -> Block:
    return Block(c.width, c.heads, c.mlp_hidden, settings, rngs=rngs, window=c.window, kv_heads=c.kv_heads)


@dataclass(frozen=True)
class BankLayout:
    """Where a bank's circuits sit (static, hashable): names in order, each one's width, slice offset
    (None for io: project), position in the model (for PRNG keys), kind (circuits of one kind have
    interchangeable modules, so they may run under one vmap), whether it reads the raw stream (output:
    replace) and whether it has a halting head (those run alone: they stash per-step writes)."""

    names: tuple[str, ...]
    widths: tuple[int, ...]
    offsets: tuple[int | None, ...]
    index: tuple[int, ...]
    kinds: tuple[tuple, ...]
    raw: tuple[bool, ...] = ()
    halting: tuple[bool, ...] = ()

    @staticmethod
    def of(circuits: list[CircuitConfig], first_index: int) -> BankLayout:
        offsets, o = [], 0
        for c in circuits:
            offsets.append(o if c.sliced else None)
            o += c.width if c.sliced else 0
        kinds = tuple((c.depth, c.width, c.heads, c.kv_heads, c.mlp_ratio, c.io, c.inject, c.state_norm, c.window,
                       c.init, c.init_noise_std, c.output, c.halting.kind) for c in circuits)
        return BankLayout(tuple(c.name for c in circuits), tuple(c.width for c in circuits), tuple(offsets),
                          tuple(range(first_index, first_index + len(circuits))), kinds,
                          tuple(c.replaces for c in circuits), tuple(c.halting.has_head for c in circuits))

    def at(self, name: str) -> int:
        return self.names.index(name)


class BankOut(NamedTuple):
    """A bank's run: the stream ``x`` after it [B, T, D], a report per circuit, the routers' auxiliary loss
    [], for a halting circuit with a stash the stream after each of its iterations [L, B, T, D] (a
    windowed circuit: after each of its last W; a routed bank in training with a windowed circuit: after each of
    its last W rounds), else None, and when decoding each circuit's cache and
    final states [B, t, w]."""

    x: Array
    reports: dict[str, CircuitReport]
    aux_loss: Array
    streams: Array | None = None
    caches: dict[str, tuple[KV, ...]] | None = None
    states: dict[str, Array] | None = None
    stream_valid: Array | None = None  # [W, B, T]: the rows of ``streams`` a token's window reads (router.window=own)


class Bank(nnx.Module):
    """A parallel bank (X)^M ⊕ (Y1∘Y2)^N ⊕ ...: circuits read norm(x) and their outputs add up."""

    def __init__(self, circuits: list[CircuitConfig], first_index: int, *, d_model: int, settings: BlockSettings,
                 rngs: nnx.Rngs, router: RouterConfig | None = None, batch_circuits: bool = True):
        self.d_model = d_model
        self.norm = nnx.RMSNorm(d_model, dtype=settings.dtype, rngs=rngs, epsilon=settings.norm_eps)
        self.circuits = nnx.Dict({c.name: Circuit(c, d_model=d_model, settings=settings, rngs=rngs) for c in circuits})
        self.layout = BankLayout.of(circuits, first_index)
        self.batch_circuits = batch_circuits
        if router is not None and router.routes:
            self.router = Router(router, d_model, len(circuits), dtype=settings.dtype, rngs=rngs,
                                 rounds=max(c.max_loops for c in circuits), causal=settings.causal)

    @property
    def names(self) -> tuple[str, ...]:
        return self.layout.names

    @property
    def routed(self) -> bool:
        return hasattr(self, "router")

    def groups(self, plan: Plan, decoding: bool = False) -> list[list[str]]:
        """Circuits that run together under one vmap: same kind, truncation depth and exit rule, and no
        per-step readout, halting stash, window or cache (those run alone)."""
        if not self.batch_circuits or decoding:
            return [[n] for n in self.names]
        out: dict[tuple, list[str]] = {}
        for n in self.names:
            # exit thresholds are traced per circuit and halting circuits keep per-step stashes: both run alone
            alone = (plan.exit_of(n) is not None or self.layout.halting[self.layout.at(n)]
                     or n in dict(plan.windows))
            shapes = (jnp.ndim(plan.loops[n]), None if n not in plan.grads else jnp.ndim(plan.grads[n]))  # stackable
            key = (n,) if alone else (self.layout.kinds[self.layout.at(n)], plan.truncation(n), shapes)
            out.setdefault(key, []).append(n)
        return list(out.values())

    def _source(self, name: str, xn_BTD: Array, x_BTD: Array) -> Array:
        """A circuit's input: its slice (or all) of the normed stream, or of the raw stream for a circuit
        with output: replace."""
        i = self.layout.at(name)
        src = x_BTD if self.layout.raw[i] else xn_BTD
        o = self.layout.offsets[i]
        return src if o is None else src[..., o:o + self.layout.widths[i]]

    def _place(self, name: str, out: Array) -> Array:
        """A circuit's output in the stream's coordinates [..., B, T, d_model]."""
        o = self.layout.offsets[self.layout.at(name)]
        if o is None:
            return out
        return jnp.pad(out, [(0, 0)] * (out.ndim - 1) + [(o, self.d_model - o - out.shape[-1])])

    def _run(self, plan: Plan, name: str) -> CircuitPlan:
        return plan.circuit(name, jax.random.fold_in(plan.key, self.layout.index[self.layout.at(name)]))

    def _batched(self, members: list[str], srcs: list[Array], ctx: Context, plan: Plan) -> list[CircuitOut]:
        """Interchangeable circuits under one vmap (their weights stacked)."""
        graphdef = nnx.graphdef(self.circuits[members[0]])
        states = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(self.circuits[n]) for n in members])
        # never compacted: under vmap every member would run each phase as long as the slowest needs it
        runs = jax.tree.map(lambda *xs: jnp.stack(xs), *[dataclasses.replace(self._run(plan, n), compact=False)
                                                         for n in members])

        def one(state: Any, s: Array, run: CircuitPlan) -> CircuitOut:
            return nnx.merge(graphdef, state)(s, ctx, run)

        outs = jax.vmap(one)(states, jnp.stack(srcs), runs)
        return [jax.tree.map(lambda a, i=i: a[i], outs) for i in range(len(members))]

    def _contribution(self, name: str, out: Array, plan: Plan) -> Array:
        """g * place(out) + (1 - g) * fill for one circuit's write ``out`` [..., B, T, O]."""
        out_BTD = self._place(name, out)
        gate = plan.gates[name].astype(out_BTD.dtype)
        contrib = gate * out_BTD
        if plan.fills is not None:
            contrib = contrib + (1 - gate) * plan.fills[name].astype(out_BTD.dtype)
        return contrib

    def _report(self, name: str, res: CircuitOut, contrib: Array, ctx: Context, plan: Plan) -> CircuitReport:
        return CircuitReport(trace=res.trace, used=res.used, exit_p=res.exit_p, ponder=res.ponder, computed=res.computed,
                             exit_lambda=res.exit_lambda, scored=res.scored, settle=res.settle,
                             mean_out=_mean_over(contrib, ctx.valid_BT) if plan.collect_means else None,
                             write_norm=_write_norm(res.out, plan.gates[name]) if plan.collect_norms else None)

    def __call__(self, x_BTD: Array, ctx: Context, plan: Plan, readout: Readout | None = None,
                 caches: dict[str, tuple[KV, ...]] | None = None, h_init: dict[str, Array] | None = None) -> BankOut:
        """x <- x + sum_c (g_c * out_c + (1 - g_c) * fill_c).

        ``readout`` maps the stream after this bank to logits (through the rest of the model), for exit
        rules that read the output. When decoding (``ctx.decoding``), ``caches`` holds each circuit's keys
        and values and ``h_init`` its initial states (continuous thinking)."""
        if self.routed:  # never while decoding: LoopedTransformer.check_decoding refuses routed banks
            return self._routed(x_BTD, ctx, plan)
        xn = self.norm(x_BTD)
        groups = self.groups(plan, ctx.decoding is not None)
        # circuits that read the output after every iteration go last: they see the others' final writes
        groups.sort(key=lambda g: any(plan.exit_of(n) is not None and plan.exit_of(n).needs_readout for n in g))
        update = jnp.zeros_like(x_BTD)
        reports: dict[str, CircuitReport] = {}
        new_caches: dict[str, tuple[KV, ...]] = {}
        states: dict[str, Array] = {}
        stepped: tuple[str, Array, Array] | None = None
        for members in groups:
            srcs = [self._source(n, xn, x_BTD) for n in members]
            if len(members) > 1:
                results = self._batched(members, srcs, ctx, plan)
            else:
                name, base = members[0], x_BTD + update
                own = None if readout is None else (lambda out, base=base, name=name:
                                                    readout(base + self._contribution(name, out, plan)))
                results = [self.circuits[name](srcs[0], ctx, self._run(plan, name), readout=own,
                                               cache=None if caches is None else caches[name],
                                               h_init=None if h_init is None else h_init[name])]
            for name, res in zip(members, results, strict=True):
                contrib = self._contribution(name, res.out, plan)
                update = update + contrib
                if res.steps is not None:
                    stepped = (name, contrib, res.steps)
                reports[name] = self._report(name, res, contrib, ctx, plan)
                if res.cache is not None:
                    new_caches[name], states[name] = res.cache, res.state
        x_out = x_BTD + update
        streams = None
        if stepped is not None:  # the stream as it would be after each (stashed) iteration of that circuit
            name, contrib, steps = stepped
            streams = x_out[None] - contrib[None] + self._contribution(name, steps, plan)
        decoded = ctx.decoding is not None
        return BankOut(x_out, reports, jnp.zeros((), jnp.float32), streams, new_caches if decoded else None,
                       states if decoded else None)

    # ------------------------------------------------------------------ routed
    def _routed(self, x_BTD: Array, ctx: Context, plan: Plan) -> BankOut:
        """Rounds r = 0 .. max_c n_c - 1: the router picks, per running token, the circuit that runs its
        next iteration (circuit c is eligible while r < n_c) or exit; a circuit's state changes only for
        the tokens it runs (copy-forward). Training runs ``plan.bound`` rounds in a checkpointed scan, the
        states carrying gradient through every round, or with ``router.backprop`` k through the last k (a
        loop's truncation), and with a window (train.iteration_loss) also reports the stream after each of its
        last W rounds; evaluation runs exactly the rounds needed."""
        names = self.names
        xn = self.norm(x_BTD)
        # [C, B, T]: each circuit's count per token (per_difficulty loops give each token its own)
        loops = jnp.stack([jnp.broadcast_to(jnp.asarray(plan.loops[n], jnp.int32), x_BTD.shape[:2]) for n in names])
        starts = [self.circuits[n].begin(self._source(n, xn, x_BTD), self._run(plan, n).key) for n in names]
        es = tuple(e for e, _ in starts)
        graphdefs = [nnx.graphdef(self.circuits[n]) for n in names]
        consts = (tuple(nnx.state(self.circuits[n]) for n in names), es, nnx.state(self.router))
        router_gd = nnx.graphdef(self.router)
        active0 = jnp.ones(x_BTD.shape[:2], bool)

        def stream(cs: Any, hs: tuple) -> Array:
            x = x_BTD
            for i, n in enumerate(names):
                x = x + self._contribution(n, nnx.merge(graphdefs[i], cs[0][i]).emit(hs[i]), plan)
            return x

        def round_(cs: Any, carry: tuple, r: Array) -> tuple:
            hs, active, used, aux, change = carry
            router = nnx.merge(router_gd, cs[2])
            sel, soft, still, loss = router(stream(cs, hs), r < loops, active, ctx.valid_BT, r, plan.training,
                                            change)
            new_hs = []
            for i in range(len(names)):
                circuit = nnx.merge(graphdefs[i], cs[0][i])
                cand = circuit.iteration(hs[i], cs[1][i], ctx)[0]
                # straight-through: the hard choice in value, the soft state h + q (cand - h) in gradient
                step = soft[i][..., None].astype(hs[i].dtype) * (cand - hs[i])
                new_hs.append(jnp.where(sel[i][..., None], cand, hs[i]) + step)
            new_hs = tuple(new_hs)
            change = None if change is None else _bank_change(hs, new_hs)
            return new_hs, still, used + sel.astype(jnp.float32), aux + loss, change

        # router.inputs: each token's latent change over its last round (none before round 0: it reads as moving)
        change0 = jnp.ones(x_BTD.shape[:2], jnp.float32) if self.router.inputs else None
        carry0 = (tuple(h for _, h in starts), active0, jnp.zeros((len(names), *x_BTD.shape[:2]), jnp.float32),
                  jnp.zeros((), jnp.float32), change0)
        rounds = jnp.max(loops)
        streams = valid = None
        if plan.training:
            if plan.bound < 1:
                raise PlanError("training a routed bank needs plan.bound (the most rounds) to set its scan length")
            body = jax.checkpoint(lambda cs, carry, r: round_(cs, carry, r))
            # router.backprop = k > 0: each token's states carry gradient through the last k rounds it ran
            # (a loop's truncation, per token as per-token loop counts have it; the routers' auxiliary losses
            # still learn from every round); 0: through every round. A token's rounds are known only once
            # it has exited, so a first pass without gradient finds them: cutting at the bank's last k rounds
            # instead left a token that exited earlier no gradient of the task loss at all, and the compute
            # cost alone then drove every token to exit at round 0 (bench/adaptive.py's routers).
            k = self.router.rule.backprop
            ran = None
            if k:
                def probe(carry: tuple, r: Array) -> tuple[tuple, None]:
                    new = round_(jax.lax.stop_gradient(consts), carry, r)
                    return jax.tree.map(lambda a, b: jnp.where(r < rounds, a, b), new, carry), None

                used0 = jax.lax.scan(probe, jax.lax.stop_gradient(carry0), jnp.arange(plan.bound))[0][2]
                ran = jax.lax.stop_gradient(used0.sum(0))  # [B, T] rounds each token ran (one circuit a round)

            window = max((dict(plan.windows).get(n, 0) for n in names), default=0)

            def scan_step(carry: tuple, r: Array) -> tuple[tuple, tuple | None]:
                if k:
                    # the state a token enters round ran - k with is a constant (none before its first round)
                    cut = ((r <= ran - k) & (r > 0))[..., None]
                    carry = (jax.tree.map(lambda h: jnp.where(cut, jax.lax.stop_gradient(h), h), carry[0]),
                             *carry[1:])
                new = body(consts, carry, r)
                new = jax.tree.map(lambda a, b: jnp.where(r < rounds, a, b), new, carry)
                return new, (new[0] if window else None)  # with a window: the states after every round

            (hs, _, used, aux, _), ys = jax.lax.scan(scan_step, carry0, jnp.arange(plan.bound))
            if window and self.router.rule.window == "own":  # after each of the token's own last W rounds
                streams, valid = _own_rounds(stream, consts, ys, jax.lax.stop_gradient(used.sum(0)), window)
            elif window:  # train.iteration_loss: the stream after each of the bank's last W rounds
                streams = _last_rounds(stream, consts, ys, rounds, window)
        else:  # stop as soon as every token has exited (padding never runs: it does not hold the loop open)
            if ctx.valid_BT is not None:
                carry0 = (carry0[0], ctx.valid_BT, *carry0[2:])
            B, T = x_BTD.shape[:2]
            one_block = len(names) == 1 and self.circuits[names[0]].depth == 1
            if _compacts(plan.compact, B, T) and one_block and ctx.decoding is None:
                hs, used, aux, computed, ran = self._routed_compact(graphdefs[0], router_gd, stream, consts, carry0,
                                                                    loops, rounds, ctx, plan.compact_shares)
            else:
                def cond(c: tuple) -> Array:
                    return (c[0] < rounds) & jnp.any(c[1][1])

                ran, (hs, _, used, aux, _) = jax.lax.while_loop(
                    cond, lambda c: (c[0] + 1, round_(consts, c[1], c[0])), (jnp.zeros((), jnp.int32), carry0))
                computed = ran.astype(jnp.float32) * B * T  # every circuit computes every token each round
            scored = ran.astype(jnp.float32) * B * T  # the router scores every token's stream each round
        writes = {n: self.circuits[n].emit(hs[i]) for i, n in enumerate(names)}
        contribs = {n: self._contribution(n, writes[n], plan) for n in names}
        reports = {n: self._report(n, CircuitOut(writes[n], used=used[i], computed=None if plan.training else computed,
                                                 scored=None if plan.training else scored), contribs[n], ctx, plan)
                   for i, n in enumerate(names)}
        return BankOut(x_BTD + sum(contribs.values()), reports, aux / jnp.maximum(rounds, 1).astype(jnp.float32),
                       streams, stream_valid=valid)

    def _routed_compact(self, graphdef: nnx.GraphDef, router_gd: nnx.GraphDef, stream: Callable, consts: Any,
                        carry0: tuple, loops: Array, rounds: Array, ctx: Context, shares: tuple[float, ...]) -> tuple:
        """Evaluation of a one-circuit routed bank whose circuit is one block, compacted as exits are
        (`Circuit._compact_step`): at round r the router picks from every token's stream (cheap: a norm and a
        linear map), and only the tokens that ran round r - 1 (all at r = 0) run the block. Those the router
        keeps take the new state; those it exited keep theirs, and their keys and values are now those of
        their final state, which every later round reads. The masked rounds' outputs (test). Returns
        ((h,), used [1, B, T], the auxiliary loss summed over rounds, token-iterations executed, rounds run)."""
        circuit = self.circuits[self.names[0]]
        hs0, active0, used0, aux0, change0 = carry0

        def cond(c: tuple) -> Array:
            return (c[0] < rounds) & jnp.any(c[2])

        def body(step: Callable, c: tuple) -> tuple:
            r, h, active, used, aux, side, fresh, change = c
            router = nnx.merge(router_gd, consts[2])
            sel, _, still, loss = router(stream(consts, (h,)), r < loops, active, ctx.valid_BT, r, False, change)
            new, side = step((consts[0][0], consts[1][0]), r, h, side, fresh)
            new_h = jnp.where(sel[0][..., None], new, h)
            change = None if change is None else _bank_change((h,), (new_h,))
            return r + 1, new_h, still, used + sel.astype(jnp.float32), aux + loss, side, sel[0], change

        side0 = (circuit._kv_buffers(hs0[0]), jnp.zeros((), jnp.float32), ())
        c0 = (jnp.zeros((), jnp.int32), hs0[0], active0, used0, aux0, side0, jnp.ones(active0.shape, bool), change0)
        ran, h, _, used, aux, side, _, _ = while_phases(circuit._compact_step(graphdef, ctx, shares), cond, body, c0,
                                                     lambda c: c[6])
        return (h,), used, aux, side[1], ran


def _bank_change(hs: tuple[Array, ...], new_hs: tuple[Array, ...]) -> Array:
    """[B, T] float32, no gradient: a routed bank's `latent_change` ||h' - h|| / ||h'|| per token over one round,
    its circuits' states taken together (0 for a token no circuit ran)."""
    return jax.lax.stop_gradient(latent_change(jnp.concatenate(hs, axis=-1), jnp.concatenate(new_hs, axis=-1)))


def _select(mask: Array, cap: int) -> Array:
    """int32 [..., cap]: the indices of ``mask``'s True entries along its last axis (length N), in order,
    then N in the slots left (an index past the end: gathers clip it, scatters with mode="drop" skip it).
    The caller guarantees at most ``cap`` True entries per row."""
    N = mask.shape[-1]
    slot = jnp.where(mask, jnp.cumsum(mask, axis=-1) - 1, cap)  # every False entry writes the spare slot cap
    out = jnp.full((*mask.shape[:-1], cap + 1), N, jnp.int32)
    lead = tuple(jnp.indices(mask.shape[:-1], sparse=True))
    lead = tuple(a[..., None] for a in lead)
    return out.at[(*lead, slot)].set(jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), mask.shape))[..., :cap]


def _write_norm(out_BTO: Array, gate: Array) -> Array:
    """[B, T] ||g * out|| per token: how much a circuit writes into the stream (its on-indicator)."""
    return jnp.linalg.norm(gate.astype(jnp.float32) * out_BTO.astype(jnp.float32), axis=-1)


def _mean_over(out_BTD: Array, valid_BT: Array | None) -> Array:
    """[D] mean of ``out`` over the real tokens (all tokens when ``valid_BT`` is None)."""
    out = out_BTD.astype(jnp.float32)
    w = jnp.ones(out.shape[:2], jnp.float32) if valid_BT is None else valid_BT.astype(jnp.float32)
    return (out * w[..., None]).sum((0, 1)) / jnp.maximum(w.sum(), 1.0)


def _last_rounds(stream: Callable, consts: Any, ys: tuple[Array, ...], rounds: Array, window: int) -> Array:
    """[W, B, T, D]: the stream after rounds R - 1, R - 2, ..., R - W of a routed bank's training scan (R =
    ``rounds``; ``ys``: each circuit's states after every round of the scan, [bound, B, T, w]). A token that
    exited earlier holds its last state in every row, so its rows are its exit's stream; a row before the first
    round (R - 1 - j < 0) holds the states after round 0, which `loopformer.train.losses.iteration_terms` leaves
    out (a token's count n <= R, and it reads row j only where n - j >= 1)."""
    j = jnp.arange(window)
    rows = jnp.maximum(rounds - 1 - j, 0)  # [W]
    states = tuple(jnp.take(y, rows, axis=0) for y in ys)  # each [W, B, T, w]
    return jax.vmap(lambda hs: stream(consts, hs))(states)


def _own_rounds(stream: Callable, consts: Any, ys: tuple[Array, ...], ran_BT: Array, window: int
                ) -> tuple[Array, Array]:
    """([W, B, T, D] the stream after each token's own rounds m - 1, m - 2, ..., m - W of a routed bank's
    training scan, m = ``ran_BT`` the rounds it ran (one circuit a round, rounds 0 .. m - 1); valid [W, B, T]:
    m - j >= 1, or j = 0). A loop's window (`loopformer.model.loop.iterate_window`) read at the rounds a token
    ran rather than at the bank's last W (`_last_rounds`), so that a token that stops at round m is asked to be
    right over its last W rounds, not W times at its exit. A token that ran no round (it exited at round 0)
    reads its state after round 0, which is its initial state, once."""
    j = jnp.arange(window)[:, None, None]
    ran = jnp.asarray(ran_BT, jnp.int32)[None]
    rows = jnp.maximum(ran - 1 - j, 0)  # [W, B, T]
    states = tuple(jnp.take_along_axis(y, rows[..., None], axis=0) for y in ys)  # each [W, B, T, w]
    return jax.vmap(lambda hs: stream(consts, hs))(states), (ran - j >= 1) | (j == 0)
