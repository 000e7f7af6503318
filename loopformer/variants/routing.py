"""Router kinds: how a router over a bank's circuits picks, every round, which circuit runs next for
each token (`loopformer.model.router` holds the scoring layer; ``stages.S.router.kind``).

    token_choice   scores s = W . norm(x_r) over the C circuits (and exit): each running token takes its
                   argmax; the chosen circuit runs one iteration for it. Load-balancing loss (Switch):
                   C * sum_c f_c P_c (f_c: share of the round's assignments, P_c: mean probability).
    expert_choice  scores sigmoid(w_c . norm(x_r)): at round r each circuit takes the top k_r = ceil(c_r T)
                   running tokens of every sequence, and a token no circuit takes exits (Mixture-of-Recursions'
                   hierarchical filtering). Per-round capacities c_r: ``capacities``, or MoR's linear
                   schedule c_r = capacity (R - r) / R over the bank's R = max_loops rounds (the last
                   capacity holds past the list). An auxiliary BCE (MoR: 1e-3) teaches each score whether
                   its token is selected; a causal model's inference selects by it, sigmoid > 0.5 (top-k
                   over a sequence would read later tokens), a bidirectional model's by top-k as in training.

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
    capacities: tuple[float, ...] = ()
    backprop: int = 0  # training: the states carry gradient through the last k rounds (0: every round)
    window: str = "bank"  # the rounds train.iteration_loss reads: the bank's last W | each token's own last W
    rounds: int = 1  # the bank's largest max_loops (expert choice's default capacity schedule)
    kind: ClassVar[str] = ""
    routes: ClassVar[bool] = True
    reads: ClassVar[tuple[str, ...]] = ()  # the settings this kind uses (a config refuses the others, changed)

    @staticmethod
    def of(cfg: Any, where: str = "router.kind", rounds: int = 1) -> RouterKind:
        cls = ROUTERS.get(cfg.kind, where)
        return cls(exit=cfg.exit, capacity=cfg.capacity, balance=cfg.balance, aux=cfg.aux, compute=cfg.compute,
                   capacities=tuple(cfg.capacities), backprop=cfg.backprop, window=cfg.window,
                   rounds=max(int(rounds), 1))

    def scores(self, circuits: int) -> int:
        """Outputs of the scoring layer for ``circuits`` circuits."""
        return circuits

    def score_bias(self, circuits: int) -> list[float]:
        return [0.0] * self.scores(circuits)

    def select(self, s_BTS: Array, eligible_CBT: Array, active_BT: Array, running_BT: Array, count: Array,
               r: Array | int = 0, causal_inference: bool = False) -> tuple[Array, Array, Array, Array]:
        """Round ``r`` from the scores ``s`` and each token's eligible circuits ``eligible_CBT`` (within its
        loop count): (selected [C, B, T] bool, soft [C, B, T] = q - stop_gradient(q),
        still running [B, T], auxiliary loss []). ``causal_inference``: a causal model's evaluation or
        decoding (a token's choice may not read later tokens)."""
        raise NotImplementedError


def straight_through(q_CBT: Array, running_BT: Array, eligible_CBT: Array) -> Array:
    """q - stop_gradient(q): 0 in value, q's gradient; 0 for tokens not running and circuits not eligible."""
    return (q_CBT - jax.lax.stop_gradient(q_CBT)) * (running_BT[None] & eligible_CBT)


@ROUTERS.register("none")
@dataclass(frozen=True)
class NoRouter(RouterKind):
    routes = False


@ROUTERS.register("token_choice")
@dataclass(frozen=True)
class TokenChoice(RouterKind):
    reads = ("exit", "balance", "compute", "backprop", "window", "inputs")

    def scores(self, circuits: int) -> int:
        return circuits + int(self.exit)

    def score_bias(self, circuits: int) -> list[float]:
        # the exit option starts unlikely (bias -2): tokens first learn to run, then to stop
        return [0.0] * circuits + [-2.0] * int(self.exit)

    def select(self, s_BTS: Array, eligible_CBT: Array, active_BT: Array, running_BT: Array, count: Array,
               r: Array | int = 0, causal_inference: bool = False) -> tuple[Array, Array, Array, Array]:
        C = eligible_CBT.shape[0]
        allowed = jnp.concatenate([jnp.moveaxis(eligible_CBT, 0, -1), jnp.ones((*active_BT.shape, int(self.exit)), bool)],
                                  axis=-1)  # [B, T, C(+1)]
        probs = jax.nn.softmax(jnp.where(allowed, s_BTS, -1e9), axis=-1)
        choice = jnp.argmax(probs, axis=-1)
        sel = (choice[None] == jnp.arange(C)[:, None, None]) & running_BT[None]
        still = active_BT & ~(running_BT & (choice == C)) if self.exit else active_BT
        still = still & jnp.any(eligible_CBT, axis=0)  # a token past every circuit's count stops
        # [C, B, T]; the exit option learns through the softmax
        soft = straight_through(jnp.moveaxis(probs[..., :C], -1, 0), running_BT, eligible_CBT)
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
    reads = ("capacity", "capacities", "aux", "compute", "backprop", "window", "inputs")

    def schedule(self) -> tuple[float, ...]:
        """c_r for r = 0, 1, ...: ``capacities``, or MoR's linear capacity (R - r) / R over R rounds."""
        return self.capacities or tuple(self.capacity * (self.rounds - r) / self.rounds for r in range(self.rounds))

    def takes(self, r: Array | int, T: int) -> Array:
        """k_r = ceil(c_r T) [] int32: the tokens of a sequence each circuit takes at round ``r``."""
        caps = jnp.asarray(self.schedule(), jnp.float32)
        c = caps[jnp.minimum(jnp.asarray(r, jnp.int32), caps.shape[0] - 1)]
        return jnp.maximum(jnp.ceil(c * T - 1e-6), 1).astype(jnp.int32)

    def select(self, s_BTS: Array, eligible_CBT: Array, active_BT: Array, running_BT: Array, count: Array,
               r: Array | int = 0, causal_inference: bool = False) -> tuple[Array, Array, Array, Array]:
        C, T = eligible_CBT.shape[0], s_BTS.shape[1]
        scores = jax.nn.sigmoid(s_BTS)  # [B, T, C]
        if causal_inference:  # the auxiliary BCE's predictor: each token decides alone
            picked = jnp.moveaxis(scores > 0.5, -1, 0)
        else:  # the top k_r running tokens per circuit and sequence (ties broken by position) within their counts
            k_max = max(1, math.ceil(max(self.schedule()) * T - 1e-6))
            masked = jnp.where(running_BT[None] & eligible_CBT, jnp.moveaxis(scores, -1, 0), -1.0)  # [C, B, T]
            top, idx = jax.lax.top_k(masked, k_max)  # sorted: rank j < k_r is in round r's top k_r
            keep = (top >= 0) & (jnp.arange(k_max) < self.takes(r, T))
            picked = jnp.zeros(masked.shape, bool).at[
                jnp.arange(C)[:, None, None], jnp.arange(masked.shape[1])[None, :, None], idx].set(keep)
        sel = picked & running_BT[None] & eligible_CBT  # [C, B, T]
        soft = straight_through(jnp.moveaxis(scores, -1, 0), running_BT, eligible_CBT)
        still = active_BT & jnp.any(sel, axis=0)
        target = jnp.moveaxis(sel, 0, -1).astype(jnp.float32)
        bce = -(target * jnp.log(scores + 1e-6) + (1 - target) * jnp.log(1 - scores + 1e-6))
        loss = self.aux * jnp.sum(bce * running_BT[..., None]) / (count * C)
        loss = loss + self.compute * jnp.sum(scores * running_BT[..., None]) / (count * C)
        return sel, soft, still, loss
