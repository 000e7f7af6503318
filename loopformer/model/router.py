"""A router over a bank's circuits (the "mixture of blocks"): at every round it picks, per token, which
circuit runs next, or whether the token exits.

    token_choice   scores s = W . norm(x_r) over the C circuits (and exit): each running token takes its
                   argmax; the chosen circuit runs one iteration for it. Load-balancing loss (Switch):
                   C * sum_c f_c P_c (f_c: share of the round's assignments, P_c: mean probability).
    expert_choice  scores sigmoid(w_c . norm(x_r)): each circuit takes the top capacity * T running tokens
                   of every sequence (Mixture-of-Recursions); a token no circuit takes exits. Auxiliary BCE
                   between the scores and the selections (MoR: 1e-3).

Shapes stay static: every circuit computes its candidate step h~ for every token and the selection masks
which tokens take it. The router learns by a straight-through estimator: circuit c's new state is
hard + (q_c - stop_gradient(q_c)) (h~_c - h_c), where q_c is the router's probability (token choice) or
score (expert choice) of c; its value is the hard choice, its gradient that of the soft state
h_c + q_c (h~_c - h_c), so the router sees whether running c would have lowered the loss. (Scaling the new
state by q / stop_gradient(q) instead gives almost no signal: a state norm removes the scale.) ``compute``
adds a cost per round a token keeps running, which pushes exits earlier.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from loopformer.config.schema import RouterConfig
from loopformer.model.layers import normal_init

Array = jax.Array


class Router(nnx.Module):
    def __init__(self, cfg: RouterConfig, d_model: int, circuits: int, *, dtype: Any, rngs: nnx.Rngs):
        self.kind, self.capacity = cfg.kind, cfg.capacity
        self.with_exit = cfg.kind == "token_choice" and cfg.exit
        self.balance, self.aux, self.compute = cfg.balance, cfg.aux, cfg.compute
        self.norm = nnx.RMSNorm(d_model, dtype=dtype, rngs=rngs)
        # the exit option starts unlikely (bias -2): tokens first learn to run, then to stop
        bias = [0.0] * circuits + [-2.0] * int(self.with_exit)
        self.score = nnx.Linear(d_model, circuits + int(self.with_exit), use_bias=True,
                                kernel_init=normal_init(0.02, ("embed", None)),
                                bias_init=lambda *_: jnp.asarray(bias, dtype), dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD: Array, eligible_C: Array, active_BT: Array, valid_BT: Array | None
                 ) -> tuple[Array, Array, Array]:
        """One round. ``eligible_C`` bool [C]: circuits allowed to run this round (within their loop
        count); ``active_BT``: tokens still running.

        Returns (selected [C, B, T] bool, soft [C, B, T] = q - stop_gradient(q) (0 in value, the router's
        gradient; 0 for tokens not running and circuits not eligible), still running afterwards [B, T],
        auxiliary loss [])."""
        s = self.score(self.norm(x_BTD)).astype(jnp.float32)  # [B, T, C(+1)]
        C = eligible_C.shape[0]
        valid = jnp.ones(active_BT.shape, bool) if valid_BT is None else valid_BT
        running = active_BT & valid
        count = jnp.maximum(running.sum(), 1.0)
        if self.kind == "token_choice":
            allowed = jnp.concatenate([eligible_C, jnp.ones((int(self.with_exit),), bool)])
            probs = jax.nn.softmax(jnp.where(allowed, s, -1e9), axis=-1)
            choice = jnp.argmax(probs, axis=-1)
            sel = (choice[None] == jnp.arange(C)[:, None, None]) & running[None]
            still = active_BT & ~(running & (choice == C)) if self.with_exit else active_BT
            still = still & jnp.any(eligible_C)
            # [C, B, T]; the exit option learns through the softmax
            soft = _straight_through(jnp.moveaxis(probs[..., :C], -1, 0), running, eligible_C)
            share = sel.sum((1, 2)) / count  # f_c
            mean_p = jnp.sum(probs[..., :C] * running[..., None], axis=(0, 1)) / count  # P_c
            # Switch's balance spreads tokens over circuits; over one circuit it would only penalise running
            # it (P_X down, towards the exit), so it applies from two circuits on
            loss = self.balance * C * jnp.sum(share * mean_p) if C > 1 else jnp.zeros((), jnp.float32)
            if self.with_exit:
                loss = loss + self.compute * jnp.sum((1.0 - probs[..., C]) * running) / count
            return sel, soft, still, loss
        # expert choice: each eligible circuit takes the top ceil(capacity * T) running tokens per sequence
        scores = jax.nn.sigmoid(s)  # [B, T, C]
        k = max(1, math.ceil(self.capacity * x_BTD.shape[1]))
        masked = jnp.moveaxis(jnp.where(running[..., None], scores, -1.0), -1, 0)  # [C, B, T]
        top, idx = jax.lax.top_k(masked, k)  # exactly k per circuit and sequence (ties broken by position)
        picked = jnp.zeros(masked.shape, bool).at[
            jnp.arange(C)[:, None, None], jnp.arange(masked.shape[1])[None, :, None], idx].set(top >= 0)
        sel = picked & running[None] & eligible_C[:, None, None]  # [C, B, T]
        soft = _straight_through(jnp.moveaxis(scores, -1, 0), running, eligible_C)
        still = active_BT & jnp.any(sel, axis=0)
        target = jnp.moveaxis(sel, 0, -1).astype(jnp.float32)
        bce = -(target * jnp.log(scores + 1e-6) + (1 - target) * jnp.log(1 - scores + 1e-6))
        loss = self.aux * jnp.sum(bce * running[..., None]) / (count * C)
        loss = loss + self.compute * jnp.sum(scores * running[..., None]) / (count * C)
        return sel, soft, still, loss


def _straight_through(q_CBT: Array, running_BT: Array, eligible_C: Array) -> Array:
    """q - stop_gradient(q): 0 in value, q's gradient; 0 for tokens not running and circuits not eligible."""
    return (q_CBT - jax.lax.stop_gradient(q_CBT)) * (running_BT[None] & eligible_C[:, None, None])
