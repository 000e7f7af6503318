"""Evaluation at chosen loop counts, gates and fills, with one compiled program per batch shape.

`Evaluator.evaluate(params, batches, loops={"X": 16}, ablate=["Y"])` is the seam every analysis
command (eval, ablate, sweep) and the trainer's periodic eval go through.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loopformer.data.tasks import PAD
from loopformer.errors import LoopformerError
from loopformer.model.loop import TRACE_STATS
from loopformer.model.transformer import LoopedTransformer
from loopformer.train.step import answer_sums, exact_match, packing, summarize

Array = jax.Array
Batch = dict[str, Any]


class Evaluator:
    """Jitted evaluation of one model structure. Loop counts, gates and fills are traced inputs:
    a new count or ablation never recompiles (`compiles` counts the programs built)."""

    def __init__(self, model: LoopedTransformer):
        self.graphdef = nnx.graphdef(model)
        self.names = list(model.circuit_names)
        self.defaults = model.default_loops()
        self.d_model = model.cfg.d_model
        self.compiles = 0

        def eval_fn(params: Any, batch: Batch, loops: Array, gates: Array, fill: Array) -> dict[str, Array]:
            self.compiles += 1  # runs at trace time only
            model = nnx.merge(self.graphdef, params)
            logits, _ = model(batch["inputs"], loops=loops, gates=gates, fill=fill, **packing(batch))
            return answer_sums(logits, batch)

        def means_fn(params: Any, batch: Batch, loops: Array) -> dict[str, Array]:
            real_BT = (batch["inputs"] != PAD).astype(jnp.float32)  # padding does not count towards the mean
            _, aux = nnx.merge(self.graphdef, params)(batch["inputs"], loops=loops, collect=real_BT, **packing(batch))
            return {"tokens": real_BT.sum()} | {k: v for k, v in aux.items() if k.startswith("mean_out/")}

        def trace_fn(params: Any, batch: Batch, loops: Array, trace_len: int) -> dict[str, Array]:
            _, aux = nnx.merge(self.graphdef, params)(batch["inputs"], loops=loops, trace_len=trace_len, **packing(batch))
            return {k: v for k, v in aux.items() if k.startswith("trace/")}

        def correct_fn(params: Any, batch: Batch, loops: Array) -> Array:
            logits, _ = nnx.merge(self.graphdef, params)(batch["inputs"], loops=loops, **packing(batch))
            return exact_match(logits, batch)

        self._eval = jax.jit(eval_fn)
        self._correct = jax.jit(correct_fn)
        self._means = jax.jit(means_fn)
        self._trace = jax.jit(trace_fn, static_argnums=3)

    # ------------------------------------------------------------------ argument checking
    def loop_vector(self, loops: Mapping[str, int] | None = None) -> Array:
        merged = dict(self.defaults)
        for name, n in (loops or {}).items():
            if name not in merged:
                raise LoopformerError(f"unknown circuit '{name}' in --loops; this model's circuits are "
                                      f"{', '.join(self.names)}")
            if int(n) < 1:
                raise LoopformerError(f"loop count for circuit '{name}' must be >= 1, got {n}")
            merged[name] = int(n)
        return jnp.asarray([merged[n] for n in self.names], jnp.int32)

    def gate_vector(self, ablate: Sequence[str] = ()) -> Array:
        for name in ablate:
            if name not in self.names:
                raise LoopformerError(f"unknown circuit '{name}' to ablate; this model's circuits are "
                                      f"{', '.join(self.names)}")
        return jnp.asarray([0.0 if n in ablate else 1.0 for n in self.names], jnp.float32)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, params: Any, batches: Sequence[Batch], loops: Mapping[str, int] | None = None,
                 ablate: Sequence[str] = (), fill: Array | None = None) -> dict[str, float]:
        """Loss / accuracy (exact match per example) / token_accuracy / examples over ``batches``.

        ``ablate`` removes circuits (gate 0); their output is replaced by ``fill`` [num_circuits,
        d_model] (zeros unless given: zero ablation; circuit means: mean ablation).
        """
        loop_v, gate_v = self.loop_vector(loops), self.gate_vector(ablate)
        fill = jnp.zeros((len(self.names), self.d_model), jnp.float32) if fill is None else jnp.asarray(fill)
        totals: dict[str, Any] = {}
        for batch in batches:
            sums = self._eval(params, batch, loop_v, gate_v, fill)
            totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
        totals = jax.device_get(totals)
        out = summarize(totals)
        out["examples"] = int(totals["examples"])
        return out

    def correct(self, params: Any, batches: Sequence[Batch], loops: Mapping[str, int] | None = None) -> np.ndarray:
        """bool [examples]: exact match of each example of ``batches`` (in order; padding rows
        dropped) at ``loops``."""
        loop_v = self.loop_vector(loops)
        return np.concatenate([np.asarray(self._correct(params, b, loop_v))[np.asarray(b["mask"]).sum(-1) > 0]
                               for b in batches])  # rows without an answer pad the last batch

    def circuit_means(self, params: Any, batches: Sequence[Batch], loops: Mapping[str, int] | None = None) -> Array:
        """[num_circuits, d_model]: each circuit's mean output over the non-padding tokens of the
        batches (for mean ablation)."""
        loop_v = self.loop_vector(loops)
        parts = [self._means(params, b, loop_v) for b in batches]
        w = jnp.stack([p["tokens"] for p in parts])
        w = w / jnp.maximum(w.sum(), 1.0)
        return jnp.stack([jnp.einsum("b,bd->d", w, jnp.stack([p[f"mean_out/{n}"] for p in parts])) for n in self.names])

    def diagnostics(self, params: Any, batch: Batch, loops: Mapping[str, int] | None = None,
                    trace_len: int | None = None) -> dict[str, dict[str, list[float]]]:
        """Per circuit and iteration: rel_change, state_norm, token_cosine (lists of length
        trace_len; iterations past the circuit's count are omitted)."""
        loop_v = self.loop_vector(loops)
        trace_len = trace_len or int(np.max(np.asarray(loop_v)))
        traces = jax.device_get(self._trace(params, batch, loop_v, trace_len))
        out = {}
        for i, name in enumerate(self.names):
            t = np.asarray(traces[f"trace/{name}"])[: int(loop_v[i])]
            out[name] = {stat: [float(v) for v in t[:, j]] for j, stat in enumerate(TRACE_STATS)}
        return out
