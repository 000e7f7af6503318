"""Halting kinds: a learned exit head and what it adds to a circuit (``halting: {kind: ...}``).

A circuit with a halting head reads lambda_t = sigmoid(w . norm(h_t) + b) after every iteration t = 1..n.
Over a horizon of n iterations (the loop count):

    none        no head
    ouro        p(t) = lambda_t prod_{j<t} (1 - lambda_j) for t < n, p(n) = prod_{j<n} (1 - lambda_j); training
                loss sum_t p(t) CE_t - beta H(p) (beta decays to beta_final); inference stops once the exit CDF
                1 - prod_{j<=t} (1 - lambda_j) reaches q
    pondernet   the same p and exit; loss sum_t p(t) CE_t + beta KL(p || Geometric(prior))
    act         (Graves 2016) N = the first t with sum_{j<=t} lambda_j >= 1 - eps (or n); p(t) = lambda_t for
                t < N, p(N) = R = 1 - sum_{j<N} lambda_j; the circuit writes sum_t p(t) out_t; loss CE of that
                + tau (N + R)

Stage II (Ouro, ``train.stage: gate``): with the LM frozen, only the head trains, on the per-step loss
improvement. From the per-token CE_t of every iteration (no gradient), continuing after t is worth
I_{t+1} = max(0, CE_t - CE_{t+1}); its target is w_t = sigmoid(k (I_{t+1} - gamma)), and the head's loss
is the BCE -[w_t log(1 - lambda_t) + (1 - w_t) log lambda_t], averaged over t = 1..n-1 (lambda_n is not
read: the n-th iteration always exits). Ouro pairs lambda_t with I_t, the step just taken; we pair it
with the step it decides (``gate_targets``).

Shapes: lambdas and p are [L, ...] over a stash of L >= n iterations (rows past n are zero). A new kind
is one class here: its head, exit distribution, inference stop test and loss terms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

from loopformer.errors import PlanError
from loopformer.variants.registry import Registry

Array = jax.Array
HALTINGS: Registry = Registry("halting kind")


@dataclass(frozen=True)
class Halting:
    """A circuit's halting kind with the settings of its ``HaltingConfig`` (hashable: a model keeps it as
    static structure)."""

    beta: float  # the settings and their defaults are HaltingConfig's (`Halting.of` copies them)
    beta_final: float
    prior: float
    tau: float
    eps: float
    q: float
    gate_k: float
    gate_gamma: float

    kind: ClassVar[str] = ""
    has_head: ClassVar[bool] = True  # adds the head lambda = sigmoid(w . norm(h) + b)
    head_bias: ClassVar[float] = 0.0  # b at initialisation
    mixes_output: ClassVar[bool] = False  # the circuit writes the p-weighted mixture of its iterations' writes
    adds_to_ce: ClassVar[bool] = False  # its loss term adds to the plain CE (else it replaces it)
    gate_stage: ClassVar[bool] = False  # lambda_t is an exit hazard: train.stage=gate (Ouro stage II) applies
    reads: ClassVar[tuple[str, ...]] = ()  # the settings this kind uses (a config refuses the others, changed)

    @staticmethod
    def of(cfg: Any, where: str = "halting.kind") -> Halting:
        """The kind ``cfg.kind`` with ``cfg``'s settings (``cfg``: a `HaltingConfig`)."""
        return HALTINGS.get(cfg.kind, where)(**{f.name: getattr(cfg, f.name) for f in fields(Halting)})

    def validate(self, path: str) -> None:
        """ConfigError (one line naming the field) on settings this kind cannot use."""

    # --- training: every iteration stashed
    def distribution(self, lambdas: Array, n: Array) -> tuple[Array, Array, Array | None]:
        """(p [L, ...], expected iterations [...], ponder cost [...] or None) from the head's lambdas."""
        raise NotImplementedError

    def loss(self, p: Array, used: Array, ponder: Array | None, step_logits: Array | None, batch: dict[str, Array],
             n: Array, step: Array, total_steps: int, scale: Array | float) -> tuple[Array, dict[str, Array]]:
        """(its objective term: sums over the answer tokens times ``scale``; sums to log)."""
        raise NotImplementedError

    def gate_loss(self, lambdas: Array, step_logits: Array, batch: dict[str, Array], n: Array,
                  scale: Array | float) -> tuple[Array, dict[str, Array]]:
        """Stage II's term (module docstring): the head's BCE against the per-step loss improvement, a sum
        over the answer tokens times ``scale``; no gradient reaches the per-step losses."""
        mask = batch["mask"].astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(jax.lax.stop_gradient(step_logits),
                                                             batch["targets"][None])  # [L, B, T]
        target, rows = gate_targets(ce, n, self.gate_k, self.gate_gamma)
        lam = jnp.clip(lambdas, 1e-6, 1 - 1e-6)
        bce = -(target * jnp.log1p(-lam) + (1 - target) * jnp.log(lam))  # [L, B, T]
        decided = jnp.maximum(jnp.sum(rows, axis=0), 1.0)  # [B, T]: the steps each token's gate decides
        per_token = jnp.sum(bce * rows, axis=0) / decided
        logs = {"halting_gate_bce": jnp.sum(per_token * mask),
                "halting_gate_continue": jnp.sum(jnp.sum(target * rows, axis=0) / decided * mask)}
        return jnp.sum(per_token * mask) * scale, logs

    # --- inference: the learned exit
    def default_q(self) -> float:
        """The exit threshold evaluation uses when none is given."""
        return float(self.q)

    def exit_init(self, shape: tuple[int, ...], out_width: int, dtype: Any) -> Any:
        return jnp.ones(shape, jnp.float32)  # survival prod (1 - lambda) so far

    def exit_step(self, i: Array, n: Array, lam: Array, active: Array, state: Any, write: Callable[[], Array],
                  q: Array) -> tuple[Array, Any]:
        """After iteration i: (whether each token stops, the new state). ``lam`` [...] the head's lambda
        (0 for tokens not running), ``write()`` the circuit's write of the new state, ``q`` the threshold."""
        survive = state * (1.0 - lam)
        return 1.0 - survive >= q, survive

    def exit_output(self, state: Any, out: Array) -> Array:
        """What the circuit writes after a learned exit (``out``: the write of its final state)."""
        return out


@HALTINGS.register("none")
@dataclass(frozen=True)
class NoHalting(Halting):
    has_head = False
    reads = ()

    def exit_init(self, shape: tuple[int, ...], out_width: int, dtype: Any) -> Any:
        raise PlanError("exit rule learned:q=... needs a circuit trained with a halting head (halting.kind); "
                        "use latent_diff, kl or entropy_diff for this one")


def geometric_exit(lambdas: Array, n: Array) -> Array:
    """Ouro / PonderNet p [L, ...]: exit at t with probability lambda_t given it ran t steps; whatever
    survives step n - 1 exits at n."""
    L = lambdas.shape[0]
    t = jnp.arange(1, L + 1).reshape((L,) + (1,) * (lambdas.ndim - 1))
    lam = jnp.where(t < n, lambdas, jnp.where(t == n, 1.0, 0.0))  # the last step takes the rest
    survive = jnp.cumprod(1.0 - lam, axis=0)
    before = jnp.concatenate([jnp.ones_like(survive[:1]), survive[:-1]], axis=0)
    return lam * before


def act_exit(lambdas: Array, n: Array, eps: float) -> tuple[Array, Array]:
    """ACT's p [L, ...] and ponder cost N + R [...]."""
    L = lambdas.shape[0]
    t = jnp.arange(1, L + 1).reshape((L,) + (1,) * (lambdas.ndim - 1))
    lam = jnp.where(t <= n, lambdas, 0.0)
    cum = jnp.cumsum(lam, axis=0)
    before = cum - lam  # sum_{j<t} lambda_j
    halts_here = ((cum >= 1.0 - eps) | (t == n)) & (before < 1.0 - eps) & (t <= n)
    ran = (before < 1.0 - eps) & (t <= n)  # steps 1..N
    remainder = 1.0 - before
    p = jnp.where(halts_here, remainder, jnp.where(ran, lam, 0.0))
    steps = jnp.sum(ran, axis=0).astype(jnp.float32)  # N
    rest = jnp.sum(jnp.where(halts_here, remainder, 0.0), axis=0)  # R
    return p, steps + rest


def gate_targets(ce: Array, n: Array, k: float, gamma: float) -> tuple[Array, Array]:
    """Stage II's continuation targets from the per-step losses ``ce`` [L, ...] (row t - 1 is CE_t):
    (w [L, ...], with w_t = sigmoid(k (max(0, CE_t - CE_{t+1}) - gamma)) in row t - 1; the rows that
    count [L, ...], t = 1..n-1 (the last row and rows from n on are 0 in both)."""
    L = ce.shape[0]
    t = jnp.arange(1, L + 1).reshape((L,) + (1,) * (ce.ndim - 1))
    gain = jnp.maximum(ce[:-1] - ce[1:], 0.0)  # [L - 1, ...]: what iteration t + 1 improved
    gain = jnp.concatenate([gain, jnp.zeros_like(ce[:1])], axis=0)
    rows = jnp.broadcast_to(t < n, ce.shape).astype(ce.dtype)
    return jax.nn.sigmoid(k * (gain - gamma)) * rows, rows


def exit_entropy(p: Array) -> Array:
    """[...]: H(p) over the step axis."""
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-30)), 0.0), axis=0)


def kl_to_geometric(p: Array, n: Array, prior: float) -> Array:
    """[...]: KL(p || Geometric(prior) truncated to 1..n and renormalised) (PonderNet's regulariser)."""
    L = p.shape[0]
    t = jnp.arange(1, L + 1).reshape((L,) + (1,) * (p.ndim - 1))
    q = jnp.where(t <= n, prior * (1.0 - prior) ** (t - 1), 0.0)
    q = q / jnp.sum(q, axis=0, keepdims=True)
    return jnp.sum(jnp.where(p > 0, p * (jnp.log(jnp.maximum(p, 1e-30)) - jnp.log(jnp.maximum(q, 1e-30))), 0.0), axis=0)


@dataclass(frozen=True)
class _Geometric(Halting):
    """Ouro and PonderNet: the geometric exit distribution, a per-step CE under it, and a regulariser."""

    gate_stage = True
    reads = ("beta", "q", "gate_k", "gate_gamma")

    def distribution(self, lambdas: Array, n: Array) -> tuple[Array, Array, Array | None]:
        p = geometric_exit(lambdas, n)
        t = jnp.arange(1, p.shape[0] + 1, dtype=jnp.float32).reshape((-1,) + (1,) * (p.ndim - 1))
        return p, jnp.sum(p * t, axis=0), None

    def regulariser(self, p: Array, n: Array, step: Array, total_steps: int) -> Array:
        raise NotImplementedError

    def loss(self, p: Array, used: Array, ponder: Array | None, step_logits: Array | None, batch: dict[str, Array],
             n: Array, step: Array, total_steps: int, scale: Array | float) -> tuple[Array, dict[str, Array]]:
        mask = batch["mask"].astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(step_logits, batch["targets"][None])  # [L, B, T]
        expected = jnp.sum(p * ce, axis=0)  # [B, T]
        reg = self.regulariser(p, n, step, total_steps)
        logs = {"halting_steps": jnp.sum(used * mask), "halting_entropy": jnp.sum(exit_entropy(p) * mask)}
        return jnp.sum((expected + reg) * mask) * scale, logs


@HALTINGS.register("ouro")
@dataclass(frozen=True)
class Ouro(_Geometric):
    reads = (*_Geometric.reads, "beta_final")

    def beta_at(self, step: Array, total_steps: int) -> Array:
        """The entropy weight: beta decays linearly to beta_final over training."""
        frac = jnp.clip(step / max(total_steps - 1, 1), 0.0, 1.0)
        return self.beta + (self.beta_final - self.beta) * frac

    def regulariser(self, p: Array, n: Array, step: Array, total_steps: int) -> Array:
        return -self.beta_at(step, total_steps) * exit_entropy(p)


@HALTINGS.register("pondernet")
@dataclass(frozen=True)
class PonderNet(_Geometric):
    reads = (*_Geometric.reads, "prior")

    def regulariser(self, p: Array, n: Array, step: Array, total_steps: int) -> Array:
        return self.beta * kl_to_geometric(p, n, self.prior)


@HALTINGS.register("act")
@dataclass(frozen=True)
class ACT(Halting):
    head_bias = -3.0  # starts by pondering (lambda ~ 0.05)
    reads = ("tau", "eps")
    mixes_output = True
    adds_to_ce = True

    def distribution(self, lambdas: Array, n: Array) -> tuple[Array, Array, Array | None]:
        p, ponder = act_exit(lambdas, n, self.eps)
        return p, ponder, ponder

    def loss(self, p: Array, used: Array, ponder: Array | None, step_logits: Array | None, batch: dict[str, Array],
             n: Array, step: Array, total_steps: int, scale: Array | float) -> tuple[Array, dict[str, Array]]:
        mask = batch["mask"].astype(jnp.float32)
        total = jnp.sum(ponder * mask)
        return self.tau * total * scale, {"halting_steps": jnp.sum(used * mask), "halting_ponder": total}

    def default_q(self) -> float:
        return 1.0 - float(self.eps)

    def exit_init(self, shape: tuple[int, ...], out_width: int, dtype: Any) -> Any:
        # the halting mass so far and the mixture of writes
        return jnp.zeros(shape, jnp.float32), jnp.zeros((*shape, out_width), dtype)

    def exit_step(self, i: Array, n: Array, lam: Array, active: Array, state: Any, write: Callable[[], Array],
                  q: Array) -> tuple[Array, Any]:
        total, mix = state
        fire = (total + lam >= q) | (i >= n)
        p = jnp.where(fire, 1.0 - total, lam) * active
        return fire, (total + lam, mix + p[..., None].astype(mix.dtype) * write())

    def exit_output(self, state: Any, out: Array) -> Array:
        return state[1]
