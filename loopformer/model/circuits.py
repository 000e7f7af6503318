"""Looped circuits and the parallel bank (the ⊕) that runs them side by side.

For one circuit c with depth D, width w and the residual stream x: [B, T, d_model]:

    e   = read_c(norm(x))                 # [B, T, w]  its slice of the stream, or a projection
    h_0 = init_c(e)                       # zeros | e | noise
    h_i = stack_c(inject_c(h_{i-1}, e))   # i = 1..n_c, the same D blocks every iteration
    out = write_c(norm(h_n))              # [B, T, d_model], write_c zero-initialised

A stage adds ``g_c * out_c + (1 - g_c) * fill_c`` over its circuits: gate g_c = 1 runs the circuit,
0 removes it (fill_c = 0: zero ablation; fill_c = the circuit's mean output: mean ablation).

Circuits of identical shape form a `CircuitGroup`: their weights are stacked on a leading circuit
axis and run under one ``vmap``, so a bank of many narrow circuits costs one kernel, not many.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from loopformer.config import CircuitConfig
from loopformer.model.layers import Block, normal_init, run_stack, stacked, zeros_init
from loopformer.model.loop import TRACE_STATS, iterate, iterate_traced

Array = jax.Array


class CircuitGroup(nnx.Module):
    """C same-shape circuits with stacked weights: blocks [C, D, ...], read/write [C, ...]."""

    def __init__(self, circuits: list[CircuitConfig], offsets: list[int], *, d_model: int, mlp: str, norm: str,
                 std: float, out_std: float, rope_base: float, dtype: Any, rngs: nnx.Rngs, causal: bool = True):
        c0 = circuits[0]
        assert all(c.shape_key() == c0.shape_key() for c in circuits), "a group needs identical shapes"
        self.names = [c.name for c in circuits]
        self.offsets = list(offsets)  # slice start of each circuit in the stream (slice mode)
        self.depth, self.width, self.mode = c0.depth, c0.width, c0.read
        self.inject, self.init, self.noise_std, self.backprop = c0.inject, c0.init, c0.init_noise_std, c0.backprop
        self.d_model = d_model
        C, w = len(circuits), c0.width
        hidden = max(1, int(round(c0.mlp_ratio * w)))

        def block(r: nnx.Rngs) -> Block:
            return Block(w, c0.heads, hidden, mlp=mlp, norm=norm, std=std, out_std=out_std,
                         rope_base=rope_base, dtype=dtype, rngs=r, window=c0.window, causal=causal)

        lin = dict(use_bias=False, dtype=dtype)
        self.blocks = stacked(lambda r: stacked(block, c0.depth, r), C, rngs)
        if self.mode == "project":
            self.read = stacked(lambda r: nnx.Linear(d_model, w, kernel_init=normal_init(std, ("embed", "circuit")),
                                                     rngs=r, **lin), C, rngs)
        if self.inject == "concat":
            # [h; e] -> w. Initialised to pass h through plus a small e term would bias the loop;
            # plain fan-in scaling lets the optimiser choose how much recall to use.
            self.adapter = stacked(lambda r: nnx.Linear(2 * w, w, kernel_init=normal_init(
                1.0 / math.sqrt(2 * w), ("circuit", "circuit")), rngs=r, **lin), C, rngs)
        if c0.state_norm:
            # h_i = norm(stack(inject(h_{i-1}, e))): without it, residual blocks plus additive
            # injection grow the state like i * e, so norm(h_i) stops changing with i.
            self.loop_norm = stacked(lambda r: nnx.RMSNorm(w, dtype=dtype, rngs=r), C, rngs)
        self.out_norm = stacked(lambda r: nnx.RMSNorm(w, dtype=dtype, rngs=r), C, rngs)
        w_out = w if self.mode == "slice" else d_model
        self.write = stacked(lambda r: nnx.Linear(w, w_out, kernel_init=zeros_init(("circuit", "embed")),
                                                  rngs=r, **lin), C, rngs)

    def __call__(self, xn_BTD: Array, positions_BT: Array, mask: Array | None, loops_C: Array, *,
                 train: bool, key: Array, trace_len: int = 0, real_BT: Array | None = None) -> tuple[Array, Array | None]:
        """Run every circuit of the group on the normed stream (``real_BT``: the tokens the trace
        statistics average over).

        Returns (out_CBTD [C, B, T, d_model], trace [C, trace_len, 3] or None).
        """
        C, w = len(self.names), self.width
        if self.mode == "slice":
            e_CBTW = jnp.stack([xn_BTD[..., o:o + w] for o in self.offsets])
        else:
            r_gd, r_state = nnx.split(self.read)
            e_CBTW = jax.vmap(lambda s: nnx.merge(r_gd, s)(xn_BTD))(r_state)
        blocks_gd, blocks_state = nnx.split(self.blocks)
        adapter = nnx.split(self.adapter) if self.inject == "concat" else (None, None)
        loop_norm = nnx.split(self.loop_norm) if hasattr(self, "loop_norm") else (None, None)
        norm_gd, norm_state = nnx.split(self.out_norm)
        write_gd, write_state = nnx.split(self.write)
        k = self.backprop if train else 0

        def one_circuit(blocks_s: Any, adapter_s: Any, loop_norm_s: Any, norm_s: Any, write_s: Any, e: Array,
                        n: Array, key_c: Array) -> tuple[Array, Array | None]:
            def step(consts: tuple, h: Array) -> Array:
                b_s, a_s, ln_s, e_ = consts
                if self.inject == "add":
                    h = h + e_
                elif self.inject == "concat":
                    h = nnx.merge(adapter[0], a_s)(jnp.concatenate([h, e_], axis=-1))
                h = run_stack(nnx.merge(blocks_gd, b_s), h, positions_BT, mask)
                return h if ln_s is None else nnx.merge(loop_norm[0], ln_s)(h)

            if self.init == "zeros":
                h0 = jnp.zeros_like(e)
            elif self.init == "input":
                h0 = e
            else:
                h0 = (self.noise_std * jax.random.normal(key_c, e.shape)).astype(e.dtype)
            consts = (blocks_s, adapter_s, loop_norm_s, e)
            if trace_len:
                h, trace = iterate_traced(step, consts, h0, n, trace_len, real_BT)
            else:
                h, trace = iterate(step, consts, h0, n, k), None
            return nnx.merge(write_gd, write_s)(nnx.merge(norm_gd, norm_s)(h)), trace

        keys = jax.random.split(key, C)
        out_CBTW, trace = jax.vmap(one_circuit)(blocks_state, adapter[1], loop_norm[1], norm_state, write_state, e_CBTW,
                                                loops_C, keys)
        if self.mode == "slice":
            pad = [[(0, 0)] * 2 + [(o, self.d_model - o - w)] for o in self.offsets]
            out_CBTD = jnp.stack([jnp.pad(out_CBTW[i], pad[i]) for i in range(C)])
        else:
            out_CBTD = out_CBTW
        return out_CBTD, trace


class Stage(nnx.Module):
    """A parallel bank (X)^M ⊕ (Y1∘Y2)^N ⊕ ...: circuits read norm(x) and their outputs add up."""

    def __init__(self, circuits: list[CircuitConfig], first_index: int, *, d_model: int, mlp: str, norm: str,
                 std: float, out_std: float, rope_base: float, dtype: Any, rngs: nnx.Rngs, causal: bool = True):
        self.names = [c.name for c in circuits]
        self.first_index = first_index  # position of this stage's first circuit in the model's loop vector
        self.norm = nnx.RMSNorm(d_model, dtype=dtype, rngs=rngs)
        offsets, o = {}, 0
        for c in circuits:
            if c.read == "slice":
                offsets[c.name], o = o, o + c.width
        groups: dict[tuple, list[CircuitConfig]] = {}
        for c in circuits:
            groups.setdefault(c.shape_key(), []).append(c)
        self.group_index = [[self.names.index(c.name) for c in g] for g in groups.values()]
        self.groups = nnx.List([
            CircuitGroup(g, [offsets.get(c.name, 0) for c in g], d_model=d_model, mlp=mlp, norm=norm, std=std,
                         out_std=out_std, rope_base=rope_base, dtype=dtype, rngs=rngs, causal=causal)
            for g in groups.values()])

    def __call__(self, x_BTD: Array, positions_BT: Array, mask: Array | None, loops: Array, gates: Array,
                 fill: Array | None, *, train: bool, key: Array, trace_len: int = 0,
                 collect: bool | Array = False, real_BT: Array | None = None) -> tuple[Array, dict[str, Array]]:
        """x <- x + sum_c (g_c * out_c + (1 - g_c) * fill_c). ``loops``/``gates``: [num_circuits of
        the model] (this stage reads its own entries); ``fill``: [num_circuits, d_model] or None.

        aux (per circuit of this stage, by name): ``trace`` [trace_len, 3] when trace_len > 0, and
        ``mean_out`` [d_model] (mean write over batch and tokens; weighted when ``collect`` is a
        [B, T] weight array) unless collect is False.
        """
        xn = self.norm(x_BTD)
        update = jnp.zeros_like(x_BTD)
        aux: dict[str, Array] = {}
        for g, (group, members) in enumerate(zip(self.groups, self.group_index, strict=True)):
            idx = jnp.asarray([self.first_index + m for m in members])
            out_CBTD, trace = group(xn, positions_BT, mask, loops[idx], train=train,
                                    key=jax.random.fold_in(key, g), trace_len=trace_len, real_BT=real_BT)
            gate = gates[idx].astype(out_CBTD.dtype)[:, None, None, None]
            contrib = gate * out_CBTD
            if fill is not None:
                contrib = contrib + (1 - gate) * fill[idx].astype(out_CBTD.dtype)[:, None, None, :]
            update = update + contrib.sum(axis=0)
            for i, m in enumerate(members):
                name = self.names[m]
                if trace is not None:
                    aux[f"trace/{name}"] = trace[i]
                if collect is not False:
                    out = out_CBTD[i].astype(jnp.float32)
                    w_BT = jnp.ones(out.shape[:2]) if collect is True else jnp.asarray(collect, jnp.float32)
                    aux[f"mean_out/{name}"] = (out * w_BT[..., None]).sum((0, 1)) / jnp.maximum(w_BT.sum(), 1.0)
        return x_BTD + update, aux


__all__ = ["CircuitGroup", "Stage", "TRACE_STATS"]
