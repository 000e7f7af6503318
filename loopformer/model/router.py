"""A router over a bank's circuits (the "mixture of blocks"): at every round it scores, per token, the
circuits (and, for some kinds, an exit option) from the normed stream; its kind
(`loopformer.variants.routing`) turns the scores into a selection and an auxiliary loss.

Shapes stay static: every circuit computes its candidate step h~ for every token and the selection masks
which tokens take it (`loopformer.model.circuit.Bank`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from loopformer.config.schema import RouterConfig
from loopformer.model.layers import normal_init
from loopformer.variants.routing import RouterKind

Array = jax.Array


class Router(nnx.Module):
    def __init__(self, cfg: RouterConfig, d_model: int, circuits: int, *, dtype: Any, rngs: nnx.Rngs,
                 rounds: int = 1, causal: bool = True):
        self.rule = RouterKind.of(cfg, rounds=rounds)
        self.causal = causal
        self.norm = nnx.RMSNorm(d_model, dtype=dtype, rngs=rngs)
        bias = self.rule.score_bias(circuits)
        self.score = nnx.Linear(d_model, self.rule.scores(circuits), use_bias=True,
                                kernel_init=normal_init(0.02, ("embed", None)),
                                bias_init=lambda *_: jnp.asarray(bias, dtype), dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD: Array, eligible_CBT: Array, active_BT: Array, valid_BT: Array | None,
                 r: Array | int = 0, training: bool = True) -> tuple[Array, Array, Array, Array]:
        """Round ``r``. ``eligible_CBT`` bool [C, B, T]: the circuits each token may run this round (within its
        loop count); ``active_BT``: tokens still running; ``training``: else a causal model selects causally.

        Returns (selected [C, B, T] bool, soft [C, B, T] = q - stop_gradient(q) (0 in value, the router's
        gradient; 0 for tokens not running and circuits not eligible), still running afterwards [B, T],
        auxiliary loss [])."""
        s = self.score(self.norm(x_BTD)).astype(jnp.float32)  # [B, T, C(+1)]
        valid = jnp.ones(active_BT.shape, bool) if valid_BT is None else valid_BT
        running = active_BT & valid
        return self.rule.select(s, eligible_CBT, active_BT, running, jnp.maximum(running.sum(), 1.0), r,
                                causal_inference=self.causal and not training)
