"""Router kinds: how a router over a bank's circuits picks, every round, which circuit runs next for
each token (`loopformer.model.router` holds the scoring layer; ``stages.S.router.kind``).

    token_choice   scores s = W . norm(x_r) over the C circuits (and exit): each running token takes its
                   argmax; the chosen circuit runs one iteration for it. Load-balancing loss (Switch):
                   C * sum_c f_c P_c (f_c: share of the round's assignments, P_c: mean probability).
    expert_choice  scores sigmoid(w_c . norm(x_r)): each circuit takes the top capacity * T running tokens
                   of every sequence (Mixture-of-Recursions); a token no circuit takes exits. Auxiliary BCE
                   between the scores and the selections (MoR: 1e-3).

Both learn by a straight-through estimator: circuit c's new state is hard + (q_c - stop_gradient(q_c))
(h~_c - h_c), where q_c is the router's probability (token choice) or score (expert choice) of c; its value
is the hard choice, its gradient that of the soft state h_c + q_c (h~_c - h_c). ``compute`` adds a cost per
round a token keeps running, which pushes exits earlier. A new kind is one class here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from loopformer.variants.registry import Registry

Array = jax.Array
ROUTERS: Registry = Registry("router kind")


@dataclass(frozen=True)
class RouterKind:
    """A router kind with its ``RouterConfig`` settings (hashable: the model keeps it as structure)."""

    exit: bool = True
    capacity: float = 0.5
    balance: float = 0.01
    aux: float = 1e-3
    compute: float = 0.0
    kind: ClassVar[str] = ""
    routes: ClassVar[bool] = True

    @staticmethod
    def of(cfg: Any, where: str = "router.kind") -> RouterKind:
        cls = ROUTERS.get(cfg.kind, where)
        return cls(exit=cfg.exit, capacity=cfg.capacity, balance=cfg.balance, aux=cfg.aux, compute=cfg.compute)

    def scores(self, circuits: int) -> int:
        """Outputs of the scoring layer for ``circuits`` circuits."""
        return circuits

    def score_bias(self, circuits: int) -> list[float]:
        return [0.0] * self.scores(circuits)

    def select(self, s_BTS: Array, eligible_C: Array, active_BT: Array, running_BT: Array, count: Array
               ) -> tuple[Array, Array, Array, Array]:
        """One round from the scores ``s``: (selected [C, B, T] bool, soft [C, B, T] = q - stop_gradient(q),
        still running [B, T], auxiliary loss [])."""
        raise NotImplementedError


def straight_through(q_CBT: Array, running_BT: Array, eligible_C: Array) -> Array:
    """q - stop_gradient(q): 0 in value, q's gradient; 0 for tokens not running and circuits not eligible."""
    return (q_CBT - jax.lax.stop_gradient(q_CBT)) * (running_BT[None] & eligible_C[:, None, None])


@ROUTERS.register("none")
@dataclass(frozen=True)
class NoRouter(RouterKind):
    routes = False


@ROUTERS.register("token_choice")
@dataclass(frozen=True)
class TokenChoice(RouterKind):
    def scores(self, circuits: int) -> int:
        return circuits + int(self.exit)

    def score_bias(self, circuits: int) -> list[float]:
        # the exit option starts unlikely (bias -2): tokens first learn to run, then to stop
        return [0.0] * circuits + [-2.0] * int(self.exit)

    def select(self, s_BTS: Array, eligible_C: Array, active_BT: Array, running_BT: Array, count: Array
               ) -> tuple[Array, Array, Array, Array]:
        C = eligible_C.shape[0]
        allowed = jnp.concatenate([eligible_C, jnp.ones((int(self.exit),), bool)])
        probs = jax.nn.softmax(jnp.where(allowed, s_BTS, -1e9), axis=-1)
        choice = jnp.argmax(probs, axis=-1)
        sel = (choice[None] == jnp.arange(C)[:, None, None]) & running_BT[None]
        still = active_BT & ~(running_BT & (choice == C)) if self.exit else active_BT
        still = still & jnp.any(eligible_C)
        # [C, B, T]; the exit option learns through the softmax
        soft = straight_through(jnp.moveaxis(probs[..., :C], -1, 0), running_BT, eligible_C)
        share = sel.sum((1, 2)) / count  # f_c
        mean_p = jnp.sum(probs[..., :C] * running_BT[..., None], axis=(0, 1)) / count  # P_c
        # Switch's balance spreads tokens over circuits; over one circuit it would only penalise running it
        # (P_X down, towards the exit), so it applies from two circuits on
        loss = self.balance * C * jnp.sum(share * mean_p) if C > 1 else jnp.zeros((), jnp.float32)
        if self.exit:
            loss = loss + self.compute * jnp.sum((1.0 - probs[..., C]) * running_BT) / count
        return sel, soft, still, loss


@ROUTERS.register("expert_choice")
@dataclass(frozen=True)
class ExpertChoice(RouterKind):
    def select(self, s_BTS: Array, eligible_C: Array, active_BT: Array, running_BT: Array, count: Array
               ) -> tuple[Array, Array, Array, Array]:
        C = eligible_C.shape[0]
        scores = jax.nn.sigmoid(s_BTS)  # [B, T, C]
        k = max(1, math.ceil(self.capacity * s_BTS.shape[1]))
        masked = jnp.moveaxis(jnp.where(running_BT[..., None], scores, -1.0), -1, 0)  # [C, B, T]
        top, idx = jax.lax.top_k(masked, k)  # exactly k per circuit and sequence (ties broken by position)
        picked = jnp.zeros(masked.shape, bool).at[
            jnp.arange(C)[:, None, None], jnp.arange(masked.shape[1])[None, :, None], idx].set(top >= 0)
        sel = picked & running_BT[None] & eligible_C[:, None, None]  # [C, B, T]
        soft = straight_through(jnp.moveaxis(scores, -1, 0), running_BT, eligible_C)
        still = active_BT & jnp.any(sel, axis=0)
        target = jnp.moveaxis(sel, 0, -1).astype(jnp.float32)
        bce = -(target * jnp.log(scores + 1e-6) + (1 - target) * jnp.log(1 - scores + 1e-6))
        loss = self.aux * jnp.sum(bce * running_BT[..., None]) / (count * C)
        loss = loss + self.compute * jnp.sum(scores * running_BT[..., None]) / (count * C)
        return sel, soft, still, loss
