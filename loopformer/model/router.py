"""A router over a bank's circuits (the "mixture of blocks"): at every round it scores, per token, the
circuits (and, for some kinds, an exit option) from the normed stream, and with ``router.inputs`` from how
much the states are still moving (`settling_inputs`); its kind (`loopformer.variants.routing`) turns the scores
into a selection and an auxiliary loss.

Shapes stay static: every circuit computes its candidate step h~ for every token and the selection masks
which tokens take it (`loopformer.model.circuit.Bank`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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
        self.inputs = tuple(cfg.inputs)
        if self.inputs:  # zero at initialisation: the router starts as one without them
            self.sense = nnx.Linear(len(self.inputs), self.rule.scores(circuits), use_bias=False,
                                    kernel_init=nnx.initializers.zeros_init(), dtype=jnp.float32, rngs=rngs)

    def __call__(self, x_BTD: Array, eligible_CBT: Array, active_BT: Array, valid_BT: Array | None,
                 r: Array | int = 0, training: bool = True, change_BT: Array | None = None
                 ) -> tuple[Array, Array, Array, Array]:
        """Round ``r``. ``eligible_CBT`` bool [C, B, T]: the circuits each token may run this round (within its
        loop count); ``active_BT``: tokens still running; ``training``: else a causal model selects causally;
        ``change_BT``: each token's latent change over its last round (`latent_change`; read with
        ``router.inputs``, which then needs it).

        Returns (selected [C, B, T] bool, soft [C, B, T] = q - stop_gradient(q) (0 in value, the router's
        gradient; 0 for tokens not running and circuits not eligible), still running afterwards [B, T],
        auxiliary loss [])."""
        s = self.score(self.norm(x_BTD)).astype(jnp.float32)  # [B, T, C(+1)]
        valid = jnp.ones(active_BT.shape, bool) if valid_BT is None else valid_BT
        if self.inputs:
            s = s + self.sense(settling_inputs(self.inputs, change_BT, valid, self.causal))
        running = active_BT & valid
        return self.rule.select(s, eligible_CBT, active_BT, running, jnp.maximum(running.sum(), 1.0), r,
                                causal_inference=self.causal and not training)


CHANGE_FLOOR = 1e-6  # log10 of a change below it (a token that did not run) reads as -6


def settling_inputs(inputs: tuple[str, ...], change_BT: Array, valid_BT: Array, causal: bool) -> Array:
    """[B, T, F] float32, no gradient: per ``inputs`` entry, change: log10 max(c_t, 1e-6) of the token's latent
    change c_t = ||h_r - h_{r-1}|| / ||h_r|| over its last round (0 for a token that did not run it: -6), or
    context: the largest of these over the real tokens that can reach t (s <= t in a causal model, its whole row
    in a bidirectional one, as `loopformer.variants.exits.ContextDiff` reads them). A stop that waits until
    nothing it reads still moves (a maze's flood) can then be learned; the stream alone does not say it."""
    log = jnp.log10(jnp.maximum(jax.lax.stop_gradient(change_BT).astype(jnp.float32), CHANGE_FLOOR))
    floor = jnp.float32(np.log10(CHANGE_FLOOR))
    real = jnp.where(valid_BT, log, floor)
    reach = (jax.lax.cummax(real, axis=real.ndim - 1) if causal
             else jnp.broadcast_to(jnp.max(real, axis=-1, keepdims=True), real.shape))
    return jnp.stack([{"change": log, "context": reach}[i] for i in inputs], axis=-1)
