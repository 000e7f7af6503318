"""A looped circuit, and the parallel bank (the ⊕) that runs circuits side by side.

For one circuit c with depth D, width w and the normed residual stream xn: [B, T, d_model]:

    e   = read_c(xn)                      # [B, T, w]  its slice of the stream, or a projection
    h_0 = init_c(e)                       # zeros | e | noise
    h_i = stack_c(inject_c(h_{i-1}, e))   # i = 1..n_c, the same D blocks every iteration
    out = write_c(norm(h_n))              # [B, T, w] back into its slice, or [B, T, d_model]; zero-initialised

A bank adds ``g_c * out_c + (1 - g_c) * fill_c`` over its circuits (the plan's gates and fills):
gate 1 runs the circuit, 0 removes it (fill 0: zero ablation; the circuit's mean output: mean ablation).

Weights are stored by circuit name (``circuits/X/...``): a circuit's parameter paths depend only on its
name and shapes. Circuits whose modules are interchangeable (same shapes and behaviour) and whose
truncation depths agree run batched: their weights are stacked when the bank is called and one
``vmap`` runs them, so a bank of many narrow circuits costs one kernel, not many.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from loopformer.config.schema import CircuitConfig
from loopformer.model.layers import Block, normal_init, run_stack, stacked, zeros_init
from loopformer.model.loop import iterate, iterate_traced
from loopformer.model.plan import CircuitReport, Plan

Array = jax.Array


class Context(NamedTuple):
    """What every layer of one forward pass shares: token positions [B, T], the attention mask
    [B, 1, T, T] (or None) and the real (non-padding) tokens [B, T] bool (or None: all real)."""

    positions_BT: Array
    mask: Array | None
    valid_BT: Array | None


class Circuit(nnx.Module):
    """One circuit's weights: ``blocks`` [D, ...] (a stack of D blocks of width w), ``read`` (io:
    project), ``adapter`` (inject: concat), ``loop_norm`` (state_norm), ``out_norm`` and ``write``."""

    def __init__(self, c: CircuitConfig, *, d_model: int, mlp: str, norm: str, std: float, out_std: float,
                 rope_base: float, dtype: Any, causal: bool, rngs: nnx.Rngs):
        self.io, self.inject, self.init, self.noise_std = c.io, c.inject, c.init, c.init_noise_std
        w = c.width
        lin = dict(use_bias=False, dtype=dtype)

        def block(r: nnx.Rngs) -> Block:
            return Block(w, c.heads, c.mlp_hidden, mlp=mlp, norm=norm, std=std, out_std=out_std,
                         rope_base=rope_base, dtype=dtype, rngs=r, window=c.window, causal=causal)

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
            self.loop_norm = nnx.RMSNorm(w, dtype=dtype, rngs=rngs)
        self.out_norm = nnx.RMSNorm(w, dtype=dtype, rngs=rngs)
        self.write = nnx.Linear(w, w if c.io == "slice" else d_model, kernel_init=zeros_init(("circuit", "embed")),
                                rngs=rngs, **lin)

    def iteration(self, h_BTW: Array, e_BTW: Array, ctx: Context) -> Array:
        """One loop step: h <- stack(inject(h, e)) (then the state norm)."""
        if self.inject == "add":
            h_BTW = h_BTW + e_BTW
        elif self.inject == "concat":
            h_BTW = self.adapter(jnp.concatenate([h_BTW, e_BTW], axis=-1))
        h_BTW = run_stack(self.blocks, h_BTW, ctx.positions_BT, ctx.mask)
        return self.loop_norm(h_BTW) if hasattr(self, "loop_norm") else h_BTW

    def __call__(self, src: Array, n: Array, key: Array, ctx: Context, *, k: int = 0,
                 trace_len: int = 0) -> tuple[Array, Array | None]:
        """Run the loop ``n`` times (int32 []; gradient through the last k iterations when k > 0) on
        ``src`` (io slice: its slice e [B, T, w]; io project: the normed stream [B, T, d_model]).

        Returns (out [B, T, w or d_model], trace [trace_len, 3] or None)."""
        e = self.read(src) if self.io == "project" else src
        if self.init == "zeros":
            h0 = jnp.zeros_like(e)
        elif self.init == "input":
            h0 = e
        else:
            h0 = (self.noise_std * jax.random.normal(key, e.shape)).astype(e.dtype)
        graphdef, state = nnx.split(self)

        def step(consts: tuple[Any, Array], h: Array) -> Array:  # everything it reads is in consts
            return nnx.merge(graphdef, consts[0]).iteration(h, consts[1], ctx)

        if trace_len:
            h, trace = iterate_traced(step, (state, e), h0, n, trace_len, ctx.valid_BT)
        else:
            h, trace = iterate(step, (state, e), h0, n, k), None
        return self.write(self.out_norm(h)), trace


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

    @staticmethod
    def of(circuits: list[CircuitConfig], first_index: int) -> BankLayout:
        offsets, o = [], 0
        for c in circuits:
            offsets.append(o if c.io == "slice" else None)
            o += c.width if c.io == "slice" else 0
        kinds = tuple((c.depth, c.width, c.heads, c.mlp_ratio, c.io, c.inject, c.state_norm, c.window, c.init,
                       c.init_noise_std) for c in circuits)
        return BankLayout(tuple(c.name for c in circuits), tuple(c.width for c in circuits), tuple(offsets),
                          tuple(range(first_index, first_index + len(circuits))), kinds)

    def at(self, name: str) -> int:
        return self.names.index(name)


class Bank(nnx.Module):
    """A parallel bank (X)^M ⊕ (Y1∘Y2)^N ⊕ ...: circuits read norm(x) and their outputs add up."""

    def __init__(self, circuits: list[CircuitConfig], first_index: int, *, d_model: int, rngs: nnx.Rngs,
                 batch_circuits: bool = True, **block_kw: Any):
        self.d_model = d_model
        self.norm = nnx.RMSNorm(d_model, dtype=block_kw["dtype"], rngs=rngs)
        self.circuits = nnx.Dict({c.name: Circuit(c, d_model=d_model, rngs=rngs, **block_kw) for c in circuits})
        self.layout = BankLayout.of(circuits, first_index)
        self.batch_circuits = batch_circuits

    @property
    def names(self) -> tuple[str, ...]:
        return self.layout.names

    def groups(self, plan: Plan) -> list[list[str]]:
        """Circuits that run together under one vmap: same kind and the same truncation depth."""
        if not self.batch_circuits:
            return [[n] for n in self.names]
        out: dict[tuple, list[str]] = {}
        for n in self.names:
            out.setdefault((self.layout.kinds[self.layout.at(n)], plan.truncation(n)), []).append(n)
        return list(out.values())

    def _source(self, name: str, xn_BTD: Array) -> Array:
        i = self.layout.at(name)
        o = self.layout.offsets[i]
        return xn_BTD if o is None else xn_BTD[..., o:o + self.layout.widths[i]]

    def _place(self, name: str, out: Array) -> Array:
        """A circuit's output in the stream's coordinates [B, T, d_model]."""
        o = self.layout.offsets[self.layout.at(name)]
        if o is None:
            return out
        return jnp.pad(out, [(0, 0), (0, 0), (o, self.d_model - o - out.shape[-1])])

    def _run(self, members: list[str], xn_BTD: Array, ctx: Context, plan: Plan) -> list[tuple[Array, Array | None]]:
        keys = [jax.random.fold_in(plan.key, self.layout.index[self.layout.at(n)]) for n in members]
        k, trace_len = plan.truncation(members[0]), plan.trace_len
        if len(members) == 1:
            name = members[0]
            return [self.circuits[name](self._source(name, xn_BTD), plan.loops[name], keys[0], ctx, k=k,
                                        trace_len=trace_len)]
        graphdef = nnx.graphdef(self.circuits[members[0]])
        states = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(self.circuits[n]) for n in members])
        src = jnp.stack([self._source(n, xn_BTD) for n in members])
        loops = jnp.stack([plan.loops[n] for n in members])

        def one(state: Any, s: Array, n: Array, key: Array) -> tuple[Array, Array | None]:
            return nnx.merge(graphdef, state)(s, n, key, ctx, k=k, trace_len=trace_len)

        outs, traces = jax.vmap(one)(states, src, loops, jnp.stack(keys))
        return [(outs[i], None if traces is None else traces[i]) for i in range(len(members))]

    def __call__(self, x_BTD: Array, ctx: Context, plan: Plan) -> tuple[Array, dict[str, CircuitReport]]:
        """x <- x + sum_c (g_c * out_c + (1 - g_c) * fill_c); a report per circuit."""
        xn = self.norm(x_BTD)
        update = jnp.zeros_like(x_BTD)
        reports: dict[str, CircuitReport] = {}
        for members in self.groups(plan):
            for name, (out, trace) in zip(members, self._run(members, xn, ctx, plan), strict=True):
                out_BTD = self._place(name, out)
                gate = plan.gates[name].astype(out_BTD.dtype)
                contrib = gate * out_BTD
                if plan.fills is not None:
                    contrib = contrib + (1 - gate) * plan.fills[name].astype(out_BTD.dtype)
                update = update + contrib
                reports[name] = CircuitReport(trace=trace, mean_out=_mean_over(out_BTD, ctx.valid_BT)
                                              if plan.collect_means else None)
        return x_BTD + update, reports


def _mean_over(out_BTD: Array, valid_BT: Array | None) -> Array:
    """[D] mean of ``out`` over the real tokens (all tokens when ``valid_BT`` is None)."""
    out = out_BTD.astype(jnp.float32)
    w = jnp.ones(out.shape[:2], jnp.float32) if valid_BT is None else valid_BT.astype(jnp.float32)
    return (out * w[..., None]).sum((0, 1)) / jnp.maximum(w.sum(), 1.0)
