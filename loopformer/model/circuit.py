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

Weights are stored by circuit name (``circuits/X/...``): a circuit's parameter paths depend only on its
name and shapes. Circuits whose modules are interchangeable (same shapes and behaviour) and that run
the same way (truncation depth, exit rule) run batched: their weights are stacked when the bank is
called and one ``vmap`` runs them, so a bank of many narrow circuits costs one kernel, not many.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from loopformer.config.schema import CircuitConfig, RouterConfig
from loopformer.errors import PlanError
from loopformer.model import halting as halting_math
from loopformer.model.cache import CachePolicy, store
from loopformer.model.exits import ExitRule, entropy, kl_divergence, latent_change
from loopformer.model.layers import Block, normal_init, run_stack, stack_layers, stacked, zeros_init
from loopformer.model.loop import iterate, iterate_traced, iterate_until
from loopformer.model.plan import CircuitReport, Plan
from loopformer.model.router import Router

Array = jax.Array
Readout = Callable[[Array], Array]  # the stream after a bank [B, T, D] -> logits [B, T, V]


class Context(NamedTuple):
    """What every layer of one forward pass shares: token positions [B, T], the attention mask
    [B, 1, T, T] (or None) and the real (non-padding) tokens [B, T] bool (or None: all real)."""

    positions_BT: Array
    mask: Array | None
    valid_BT: Array | None


class CircuitOut(NamedTuple):
    """A circuit's run: ``out`` [B, T, O] what it writes (O = w for io slice, d_model for project);
    ``trace`` [trace_len, 3]; ``used`` [B, T] iterations per token; with a halting head and a stash,
    ``steps`` [L, B, T, O] the write of every iteration, ``exit_p`` [L, B, T], ``ponder`` [B, T] (ACT)."""

    out: Array
    trace: Array | None = None
    used: Array | None = None
    steps: Array | None = None
    exit_p: Array | None = None
    ponder: Array | None = None


class Circuit(nnx.Module):
    """One circuit's weights: ``blocks`` [D, ...] (a stack of D blocks of width w), ``read`` (io:
    project), ``adapter`` (inject: concat), ``loop_norm`` (state_norm), ``out_norm``, ``write`` and
    ``halt`` (the halting head, halting.kind != none)."""

    def __init__(self, c: CircuitConfig, *, d_model: int, mlp: str, norm: str, std: float, out_std: float,
                 rope_base: float, dtype: Any, causal: bool, rngs: nnx.Rngs, qkv_bias: bool = False,
                 norm_eps: float = 1e-6, attention: str = "auto"):
        self.io, self.inject, self.init, self.noise_std = c.io, c.inject, c.init, c.init_noise_std
        self.halting, self.act_eps = c.halting.kind, c.halting.eps
        self.replace = c.output == "replace"
        w = c.width
        lin = dict(use_bias=False, dtype=dtype)

        def block(r: nnx.Rngs) -> Block:
            return Block(w, c.heads, c.mlp_hidden, mlp=mlp, norm=norm, std=std, out_std=out_std,
                         rope_base=rope_base, dtype=dtype, rngs=r, window=c.window, causal=causal,
                         kv_heads=c.kv_heads, qkv_bias=qkv_bias, norm_eps=norm_eps, attention=attention)

        self.blocks = stacked(block, c.depth, rngs)
        if c.io == "project":
            self.read = nnx.Linear(d_model, w, kernel_init=normal_init(std, ("embed", "circuit")), rngs=rngs, **lin)
        if c.inject == "concat":
            # [h; e] -> w. Initialised to pass h through plus a small e term would bias the loop;
            # plain fan-in scaling lets the optimiser choose how much recall to use.
            self.adapter = nnx.Linear(2 * w, w, kernel_init=normal_init(1.0 / math.sqrt(2 * w), ("circuit", "circuit")),
                                      rngs=rngs, **lin)
        if c.state_norm:
            # h_i = norm(stack(inject(h_{i-1}, e))): without it, residual blocks plus additive
            # injection grow the state like i * e, so norm(h_i) stops changing with i.
            self.loop_norm = nnx.RMSNorm(w, dtype=dtype, rngs=rngs, epsilon=norm_eps)
        if not self.replace:  # output: replace writes its final state as it is
            self.out_norm = nnx.RMSNorm(w, dtype=dtype, rngs=rngs, epsilon=norm_eps)
            self.write = nnx.Linear(w, w if c.io == "slice" else d_model,
                                    kernel_init=zeros_init(("circuit", "embed")), rngs=rngs, **lin)
        if c.halting.kind != "none":
            # ACT starts by pondering (halting bias negative: lambda ~ 0.05); the others start neutral.
            bias = -3.0 if c.halting.kind == "act" else 0.0
            self.halt = nnx.Linear(w, 1, use_bias=True, kernel_init=normal_init(std, ("circuit", None)),
                                   bias_init=nnx.initializers.constant(bias), dtype=dtype, rngs=rngs)

    # ------------------------------------------------------------------ pieces
    def begin(self, src: Array, key: Array) -> tuple[Array, Array]:
        """(e, h_0) from ``src`` (io slice: its slice [B, T, w]; io project: the normed stream)."""
        e = self.read(src) if self.io == "project" else src
        if self.init == "zeros":
            return e, jnp.zeros_like(e)
        if self.init == "input":
            return e, e
        return e, (self.noise_std * jax.random.normal(key, e.shape)).astype(e.dtype)

    def iteration(self, h_BTW: Array, e_BTW: Array, ctx: Context) -> Array:
        """One loop step: h <- stack(inject(h, e)) (then the state norm)."""
        if self.inject == "add":
            h_BTW = h_BTW + e_BTW
        elif self.inject == "concat":
            h_BTW = self.adapter(jnp.concatenate([h_BTW, e_BTW], axis=-1))
        h_BTW = run_stack(self.blocks, h_BTW, ctx.positions_BT, ctx.mask)
        return self.loop_norm(h_BTW) if hasattr(self, "loop_norm") else h_BTW

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
    def __call__(self, src: Array, n: Array, key: Array, ctx: Context, *, k: int = 0, trace_len: int = 0,
                 exit: ExitRule | None = None, readout: Readout | None = None, stash: int = 0,
                 bound: int = 0) -> CircuitOut:
        """Run the loop on ``src``: ``n`` iterations (int32 [] or per token [B, T]; the cap when
        ``exit`` is given), gradient through the last k when k > 0. ``trace_len`` records state
        statistics; ``exit`` stops tokens by a rule (``readout`` maps this circuit's write to logits,
        for the kl / entropy_diff rules); ``stash`` (halting circuits) keeps every iteration."""
        e, h0 = self.begin(src, key)
        graphdef, state = nnx.split(self)

        def step(consts: tuple[Any, Array], h: Array) -> Array:  # everything it reads is in consts
            return nnx.merge(graphdef, consts[0]).iteration(h, consts[1], ctx)

        if trace_len:
            h, trace = iterate_traced(step, (state, e), h0, n, trace_len, ctx.valid_BT)
            return CircuitOut(self.emit(h, e), trace=trace)
        if exit is not None:
            return self._until(step, (state, e), h0, n, exit, readout)
        if self.halting == "act" or (self.halting != "none" and stash):
            return self._stashed(step, (state, e), h0, n, k, stash)
        h = iterate(step, (state, e), h0, n, k, bound=bound)
        used = None if jnp.ndim(n) == 0 else jnp.asarray(n, jnp.float32)
        return CircuitOut(self.emit(h, e), used=used)

    def _stashed(self, step: Callable, consts: Any, h0: Array, n: Array, k: int, stash: int) -> CircuitOut:
        """Every iteration kept (halting): exit distribution, per-step writes; ACT writes their mixture."""
        if not stash:
            if self.halting == "act":  # evaluation of an ACT circuit: its own halting rule, up to n
                return self._until(step, consts, h0, n, ExitRule("learned", 1.0 - self.act_eps), None)
            raise PlanError("a halting circuit needs plan.stash (its loop's length bound) outside exits")
        h, states = iterate(step, consts, h0, n, k, stash=stash)
        lambdas, steps = self.halt_prob(states), self.emit(states)  # [L, B, T], [L, B, T, O]
        if self.halting == "act":
            p, ponder = halting_math.act_exit(lambdas, n, self.act_eps)
            return CircuitOut(jnp.einsum("lbt,lbto->bto", p.astype(steps.dtype), steps), used=ponder, steps=steps,
                              exit_p=p, ponder=ponder)
        p = halting_math.geometric_exit(lambdas, n)
        t = jnp.arange(1, p.shape[0] + 1, dtype=jnp.float32)[:, None, None]
        return CircuitOut(self.emit(h), used=jnp.sum(p * t, axis=0), steps=steps, exit_p=p)

    def _until(self, step: Callable, consts: Any, h0: Array, n: Array, rule: ExitRule,
               readout: Readout | None) -> CircuitOut:
        """Inference with an exit rule (`loopformer.model.exits`)."""
        shape, e = h0.shape[:-1], consts[1]
        if rule.kind == "latent_diff":
            def stop(i: Array, h_prev: Array, h: Array, active: Array, st: Any) -> tuple[Array, Any]:
                return latent_change(h_prev, h) < rule.threshold, st
            state0: Any = ()
        elif rule.kind == "learned":
            if self.halting == "none":
                raise PlanError("exit rule learned:q=... needs a circuit trained with a halting head (halting.kind); "
                                "use latent_diff, kl or entropy_diff for this one")
            act = self.halting == "act"

            def stop(i: Array, h_prev: Array, h: Array, active: Array, st: Any) -> tuple[Array, Any]:
                lam = jnp.where(active, self.halt_prob(h), 0.0)
                if not act:  # survival prod (1 - lambda): stop once the exit CDF reaches q
                    survive = st * (1.0 - lam)
                    return 1.0 - survive >= rule.threshold, survive
                total, mix = st  # ACT: halting mass so far and the mixture of writes
                fire = (total + lam >= rule.threshold) | (i >= n)
                p = jnp.where(fire, 1.0 - total, lam) * active
                mix = mix + p[..., None].astype(mix.dtype) * self.emit(h)
                return fire, (total + lam, mix)

            out_width = self.write.kernel.value.shape[-1]
            state0 = (jnp.ones(shape, jnp.float32) if not act else
                      (jnp.zeros(shape, jnp.float32), jnp.zeros((*shape, out_width), h0.dtype)))
        else:
            if readout is None:
                raise PlanError(f"exit rule {rule.kind} reads the model's output after every iteration: only one "
                                f"circuit of a model can use kl or entropy_diff at a time")

            def stop(i: Array, h_prev: Array, h: Array, active: Array, st: Any) -> tuple[Array, Any]:
                logits = readout(self.emit(h, e))
                change = kl_divergence(logits, st) if rule.kind == "kl" else jnp.abs(entropy(logits) - entropy(st))
                return (change < rule.threshold) & (i >= 2), logits  # the first iteration has nothing to compare

            state0 = readout(self.emit(h0, e))
        h, used, st = iterate_until(step, consts, h0, n, stop, state0, min_loops=rule.min_loops,
                                    check_every=rule.check_every)
        out = st[1] if rule.kind == "learned" and self.halting == "act" else self.emit(h, e)
        return CircuitOut(out, used=used)


    # ------------------------------------------------------------------ decoding with a cache
    def decode(self, src: Array, n: Array, key: Array, positions_Bt: Array, start_B: Array,
               cache: tuple[tuple[Array, Array], ...], policy: CachePolicy, *, exit: ExitRule | None = None,
               h_init: Array | None = None) -> tuple[Array, tuple[tuple[Array, Array], ...], Array, Array]:
        """The loop on t new tokens over earlier tokens' keys and values ``cache`` (per layer of the
        circuit, [S, B, T, K, H] each): iteration i attends to slot ``policy.slot(i)`` of the positions
        before ``start_B`` and to the chunk itself, whose keys and values gather in a small [S, B, t, K, H]
        buffer (iteration i writes its slot where ``policy.writes(i)``) that is stored once at the end.
        ``h_init`` [B, t, w] replaces the initial state (continuous thinking). With ``exit`` (latent_diff or
        learned) each token stops on its own; rows whose tokens all stopped stop writing, and their later
        slots get their last keys and values (so later tokens read a defined value).

        Returns (out [B, t, O], the cache with the chunk stored, final states [B, t, w], iterations [B, t])."""
        e, h0 = self.begin(src, key)
        h0 = h0 if h_init is None else h_init.astype(h0.dtype)
        B, t = positions_Bt.shape
        layers = stack_layers(self.blocks)
        S = cache[0][0].shape[0]
        buf0 = tuple((jnp.zeros((S, *k.shape[1:2], t, *k.shape[3:]), k.dtype),) * 2 for k, _ in cache)

        def step(i: Array, h: Array, buf: tuple, write_B: Array) -> tuple[Array, tuple]:
            slot = policy.slot(i)
            x = h + e if self.inject == "add" else (
                self.adapter(jnp.concatenate([h, e], axis=-1)) if self.inject == "concat" else h)
            new_buf = []
            for layer, (k_c, v_c), (k_b, v_b) in zip(layers, cache, buf, strict=True):
                read = (jax.lax.dynamic_index_in_dim(k_c, slot, 0, False), jax.lax.dynamic_index_in_dim(v_c, slot, 0, False))
                own = (jax.lax.dynamic_index_in_dim(k_b, slot, 0, False), jax.lax.dynamic_index_in_dim(v_b, slot, 0, False))
                x, (k, v) = layer.cached(x, positions_Bt, read, start_B, (*own, ~policy.writes(i)))
                keep = (write_B & policy.writes(i))[:, None, None, None]
                new_buf.append(tuple(jax.lax.dynamic_update_index_in_dim(b, jnp.where(keep, f.astype(b.dtype), o), slot, 0)
                                     for b, f, o in zip((k_b, v_b), (k, v), own, strict=True)))
            return (self.loop_norm(x) if hasattr(self, "loop_norm") else x), tuple(new_buf)

        if exit is None:
            h, buf = jax.lax.fori_loop(0, n, lambda i, c: step(i, c[0], c[1], jnp.ones((B,), bool)), (h0, buf0))
            used = jnp.broadcast_to(jnp.asarray(n, jnp.float32), h.shape[:2])
        else:
            if exit.kind not in ("latent_diff", "learned") or (exit.kind == "learned" and self.halting in ("none", "act")):
                raise PlanError(f"decoding with a cache supports the exits latent_diff and learned (an ouro or "
                                f"pondernet halting head), not {exit.kind} here; use --no-cache")

            def cond(c: tuple) -> Array:
                return (c[0] < n) & jnp.any(c[3])

            def body(c: tuple) -> tuple:
                i, h, buf, active, used, wrote, survive = c
                write_B = jnp.any(active, axis=1)
                new, buf = step(i, h, buf, write_B)
                h_next = jnp.where(active[..., None], new, h)
                if exit.kind == "latent_diff":
                    fire = latent_change(h, h_next) < exit.threshold
                else:
                    survive = survive * (1.0 - jnp.where(active, self.halt_prob(h_next), 0.0))
                    fire = 1.0 - survive >= exit.threshold
                due = ((i + 1) >= exit.min_loops) & ((i + 1) % exit.check_every == 0)
                used = used + active.astype(jnp.float32)
                return i + 1, h_next, buf, active & ~(fire & due), used, wrote + write_B, survive

            c0 = (jnp.zeros((), jnp.int32), h0, buf0, jnp.ones((B, t), bool), jnp.zeros((B, t), jnp.float32),
                  jnp.zeros((B,), jnp.int32), jnp.ones((B, t), jnp.float32))
            _, h, buf, _, used, wrote, _ = jax.lax.while_loop(cond, body, c0)
            buf = _fill(buf, wrote, n, policy)
        cache = tuple(tuple(store(c, b, positions_Bt) for c, b in zip(layer_c, layer_b, strict=True))
                      for layer_c, layer_b in zip(cache, buf, strict=True))
        return self.emit(h, e), cache, h, used


def _fill(buf: tuple, wrote_B: Array, n: Array, policy: CachePolicy) -> tuple:
    """Rows that stopped writing after ``wrote_B`` iterations: copy the keys and values of their last
    iteration into the slots of iterations wrote .. n - 1 (``buf``: per layer (k, v) [S, B, t, K, H])."""
    if policy.kind in ("last", "first"):
        return buf
    S, B = buf[0][0].shape[:2]
    last = policy.slot(jnp.maximum(wrote_B - 1, 0))  # [B]
    j = jnp.arange(S)[:, None]
    if policy.kind == "full":
        target = (j >= wrote_B[None]) & (j < n)  # [S, B]
    else:  # ring: slot j is written by some later iteration i in [wrote, n) with i % K == j
        target = ((j - wrote_B[None]) % policy.ring) < (n - wrote_B[None])

    def fill(a: Array) -> Array:
        src = jnp.moveaxis(a, 0, 1)[jnp.arange(B), last]  # [B, t, K, H]: each row's last slot
        return jnp.where(target[:, :, None, None, None], src[None], a)

    return tuple(tuple(fill(a) for a in kv) for kv in buf)


@dataclass(frozen=True)
class BankLayout:
    """Where a bank's circuits sit (static, hashable): names in order, each one's width, slice offset
    (None for io: project), position in the model (for PRNG keys), and kind (circuits of one kind have
    interchangeable modules, so they may run under one vmap)."""

    names: tuple[str, ...]
    widths: tuple[int, ...]
    offsets: tuple[int | None, ...]
    index: tuple[int, ...]
    kinds: tuple[tuple, ...]
    raw: tuple[bool, ...] = ()  # per circuit: reads the raw stream (output: replace), not the normed one

    @staticmethod
    def of(circuits: list[CircuitConfig], first_index: int) -> BankLayout:
        offsets, o = [], 0
        for c in circuits:
            offsets.append(o if c.io == "slice" else None)
            o += c.width if c.io == "slice" else 0
        kinds = tuple((c.depth, c.width, c.heads, c.kv_heads, c.mlp_ratio, c.io, c.inject, c.state_norm, c.window,
                       c.init, c.init_noise_std, c.output, c.halting.kind) for c in circuits)
        return BankLayout(tuple(c.name for c in circuits), tuple(c.width for c in circuits), tuple(offsets),
                          tuple(range(first_index, first_index + len(circuits))), kinds,
                          tuple(c.output == "replace" for c in circuits))

    def at(self, name: str) -> int:
        return self.names.index(name)


class Bank(nnx.Module):
    """A parallel bank (X)^M ⊕ (Y1∘Y2)^N ⊕ ...: circuits read norm(x) and their outputs add up."""

    def __init__(self, circuits: list[CircuitConfig], first_index: int, *, d_model: int, rngs: nnx.Rngs,
                 router: RouterConfig | None = None, batch_circuits: bool = True, **block_kw: Any):
        self.d_model = d_model
        self.norm = nnx.RMSNorm(d_model, dtype=block_kw["dtype"], rngs=rngs, epsilon=block_kw.get("norm_eps", 1e-6))
        self.circuits = nnx.Dict({c.name: Circuit(c, d_model=d_model, rngs=rngs, **block_kw) for c in circuits})
        self.layout = BankLayout.of(circuits, first_index)
        self.batch_circuits = batch_circuits
        if router is not None and router.kind != "none":
            self.router = Router(router, d_model, len(circuits), dtype=block_kw["dtype"], rngs=rngs)

    @property
    def names(self) -> tuple[str, ...]:
        return self.layout.names

    @property
    def routed(self) -> bool:
        return hasattr(self, "router")

    def groups(self, plan: Plan) -> list[list[str]]:
        """Circuits that run together under one vmap: same kind, truncation depth and exit rule, and no
        per-step readout or halting stash (those run alone)."""
        if not self.batch_circuits:
            return [[n] for n in self.names]
        out: dict[tuple, list[str]] = {}
        for n in self.names:
            # exit thresholds are traced per circuit and halting circuits keep per-step stashes: both run alone
            alone = plan.exit_of(n) is not None or self.layout.kinds[self.layout.at(n)][-1] != "none"
            key = (n,) if alone else (self.layout.kinds[self.layout.at(n)], plan.truncation(n))
            out.setdefault(key, []).append(n)
        return list(out.values())

    def _source(self, name: str, xn_BTD: Array | tuple[Array, Array]) -> Array:
        """A circuit's input: its slice (or all) of the normed stream; given (normed, raw), a circuit with
        output: replace reads the raw stream instead."""
        i = self.layout.at(name)
        if isinstance(xn_BTD, tuple):
            xn_BTD = xn_BTD[1] if self.layout.raw and self.layout.raw[i] else xn_BTD[0]
        o = self.layout.offsets[i]
        return xn_BTD if o is None else xn_BTD[..., o:o + self.layout.widths[i]]

    def _place(self, name: str, out: Array) -> Array:
        """A circuit's output in the stream's coordinates [..., B, T, d_model]."""
        o = self.layout.offsets[self.layout.at(name)]
        if o is None:
            return out
        return jnp.pad(out, [(0, 0)] * (out.ndim - 1) + [(o, self.d_model - o - out.shape[-1])])

    def _key(self, plan: Plan, name: str) -> Array:
        return jax.random.fold_in(plan.key, self.layout.index[self.layout.at(name)])

    def _run(self, members: list[str], xn_BTD: Array | tuple[Array, Array], ctx: Context, plan: Plan,
             readout: Readout | None) -> list[CircuitOut]:
        kw = dict(k=plan.truncation(members[0]), trace_len=plan.trace_len, exit=plan.exit_of(members[0]),
                  stash=plan.stash, bound=plan.bound)
        if len(members) == 1:
            name = members[0]
            return [self.circuits[name](self._source(name, xn_BTD), plan.loops[name], self._key(plan, name), ctx,
                                        readout=readout, **kw)]
        graphdef = nnx.graphdef(self.circuits[members[0]])
        states = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(self.circuits[n]) for n in members])
        src = jnp.stack([self._source(n, xn_BTD) for n in members])
        loops = jnp.stack([plan.loops[n] for n in members])
        keys = jnp.stack([self._key(plan, n) for n in members])

        def one(state: Any, s: Array, n: Array, key: Array) -> CircuitOut:
            return nnx.merge(graphdef, state)(s, n, key, ctx, **kw)

        outs = jax.vmap(one)(states, src, loops, keys)
        return [jax.tree.map(lambda a, i=i: a[i], outs) for i in range(len(members))]

    def _contribution(self, name: str, out: Array, plan: Plan) -> Array:
        """g * place(out) + (1 - g) * fill for one circuit's write ``out`` [..., B, T, O]."""
        out_BTD = self._place(name, out)
        gate = plan.gates[name].astype(out_BTD.dtype)
        contrib = gate * out_BTD
        if plan.fills is not None:
            contrib = contrib + (1 - gate) * plan.fills[name].astype(out_BTD.dtype)
        return contrib

    def __call__(self, x_BTD: Array, ctx: Context, plan: Plan, readout: Readout | None = None
                 ) -> tuple[Array, dict[str, CircuitReport], Array, Array | None]:
        """x <- x + sum_c (g_c * out_c + (1 - g_c) * fill_c).

        ``readout`` maps the stream after this bank to logits (through the rest of the model), for exit
        rules that read the output. Returns (x, a report per circuit, auxiliary loss [], and for a
        halting circuit with a stash the stream after each of its iterations [L, B, T, D] or None)."""
        if self.routed:
            return self._routed(x_BTD, ctx, plan)
        xn = self.norm(x_BTD)
        groups = self.groups(plan)
        # circuits that read the output after every iteration go last: they see the others' final writes
        groups.sort(key=lambda g: any(plan.exit_of(n) is not None and plan.exit_of(n).needs_readout for n in g))
        update = jnp.zeros_like(x_BTD)
        reports: dict[str, CircuitReport] = {}
        stepped: tuple[str, Array] | None = None
        for members in groups:
            base = x_BTD + update
            own = None if readout is None else (lambda out, base=base, name=members[0]:
                                                readout(base + self._contribution(name, out, plan)))
            for name, res in zip(members, self._run(members, (xn, x_BTD), ctx, plan, own), strict=True):
                contrib = self._contribution(name, res.out, plan)
                update = update + contrib
                if res.steps is not None:
                    stepped = (name, contrib, res.steps)
                reports[name] = CircuitReport(trace=res.trace, used=res.used, exit_p=res.exit_p, ponder=res.ponder,
                                              mean_out=_mean_over(contrib, ctx.valid_BT) if plan.collect_means else None,
                                              write_norm=_write_norm(res.out, plan.gates[name]) if plan.collect_norms
                                              else None)
        x_out = x_BTD + update
        streams = None
        if stepped is not None:  # the stream as it would be after each iteration of the halting circuit
            name, contrib, steps = stepped
            streams = x_out[None] - contrib[None] + self._contribution(name, steps, plan)
        return x_out, reports, jnp.zeros((), jnp.float32), streams

    # ------------------------------------------------------------------ decoding
    def decode(self, x_BtD: Array, positions_Bt: Array, start_B: Array, caches: dict[str, tuple], plan: Plan,
               policy: CachePolicy, h_init: dict[str, Array] | None = None
               ) -> tuple[Array, dict[str, tuple], dict[str, Array], dict[str, Array]]:
        """The bank on t new tokens over its circuits' caches (`Circuit.decode`), circuit by circuit.
        Returns (x, caches, final states {name: [B, t, w]}, iterations per token {name: [B, t]})."""
        if self.routed:
            raise PlanError("decoding with a cache does not run routed banks; use --no-cache")
        xn = self.norm(x_BtD)
        update = jnp.zeros_like(x_BtD)
        caches, states, used = dict(caches), {}, {}
        for name in self.names:
            out, caches[name], states[name], used[name] = self.circuits[name].decode(
                self._source(name, (xn, x_BtD)), plan.loops[name], self._key(plan, name), positions_Bt, start_B,
                caches[name],
                policy, exit=plan.exit_of(name), h_init=None if h_init is None else h_init[name])
            update = update + self._contribution(name, out, plan)
        return x_BtD + update, caches, states, used

    # ------------------------------------------------------------------ routed
    def _routed(self, x_BTD: Array, ctx: Context, plan: Plan
                ) -> tuple[Array, dict[str, CircuitReport], Array, None]:
        """Rounds r = 0 .. max_c n_c - 1: the router picks, per running token, the circuit that runs its
        next iteration (circuit c is eligible while r < n_c) or exit; a circuit's state changes only for
        the tokens it runs (copy-forward). Training runs ``plan.bound`` rounds in a checkpointed scan
        (gradient through all of them); evaluation runs exactly the rounds needed."""
        names = self.names
        xn = self.norm(x_BTD)
        loops = jnp.stack([jnp.asarray(plan.loops[n], jnp.int32) for n in names])
        starts = [self.circuits[n].begin(self._source(n, xn), self._key(plan, n)) for n in names]
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
            hs, active, used, aux = carry
            router = nnx.merge(router_gd, cs[2])
            sel, soft, still, loss = router(stream(cs, hs), r < loops, active, ctx.valid_BT)
            new_hs = []
            for i in range(len(names)):
                circuit = nnx.merge(graphdefs[i], cs[0][i])
                cand = circuit.iteration(hs[i], cs[1][i], ctx)
                # straight-through: the hard choice in value, the soft state h + q (cand - h) in gradient
                step = soft[i][..., None].astype(hs[i].dtype) * (cand - hs[i])
                new_hs.append(jnp.where(sel[i][..., None], cand, hs[i]) + step)
            return tuple(new_hs), still, used + sel.astype(jnp.float32), aux + loss

        carry0 = (tuple(h for _, h in starts), active0, jnp.zeros((len(names), *x_BTD.shape[:2]), jnp.float32),
                  jnp.zeros((), jnp.float32))
        rounds = jnp.max(loops)
        if plan.training:
            if plan.bound < 1:
                raise PlanError("training a routed bank needs plan.bound (the most rounds) to set its scan length")
            body = jax.checkpoint(lambda cs, carry, r: round_(cs, carry, r))

            def scan_step(carry: tuple, r: Array) -> tuple[tuple, None]:
                new = body(consts, carry, r)
                return jax.tree.map(lambda a, b: jnp.where(r < rounds, a, b), new, carry), None

            hs, _, used, aux = jax.lax.scan(scan_step, carry0, jnp.arange(plan.bound))[0]
        else:  # stop as soon as every token has exited
            def cond(c: tuple) -> Array:
                return (c[0] < rounds) & jnp.any(c[1][1])

            _, (hs, _, used, aux) = jax.lax.while_loop(cond, lambda c: (c[0] + 1, round_(consts, c[1], c[0])),
                                                       (jnp.zeros((), jnp.int32), carry0))
        update = sum(self._contribution(n, self.circuits[n].emit(hs[i]), plan) for i, n in enumerate(names))
        reports = {n: CircuitReport(used=used[i], mean_out=_mean_over(self._contribution(
            n, self.circuits[n].emit(hs[i]), plan), ctx.valid_BT) if plan.collect_means else None,
            write_norm=_write_norm(self.circuits[n].emit(hs[i]), plan.gates[n]) if plan.collect_norms else None)
            for i, n in enumerate(names)}
        return x_BTD + update, reports, aux / jnp.maximum(rounds, 1).astype(jnp.float32), None


def _write_norm(out_BTO: Array, gate: Array) -> Array:
    """[B, T] ||g * out|| per token: how much a circuit writes into the stream (its on-indicator)."""
    return jnp.linalg.norm(gate.astype(jnp.float32) * out_BTO.astype(jnp.float32), axis=-1)


def _mean_over(out_BTD: Array, valid_BT: Array | None) -> Array:
    """[D] mean of ``out`` over the real tokens (all tokens when ``valid_BT`` is None)."""
    out = out_BTD.astype(jnp.float32)
    w = jnp.ones(out.shape[:2], jnp.float32) if valid_BT is None else valid_BT.astype(jnp.float32)
    return (out * w[..., None]).sum((0, 1)) / jnp.maximum(w.sum(), 1.0)
