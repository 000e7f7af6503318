"""Exit rules: when a token stops iterating a circuit at inference (no training needed, except ``learned``).

A rule is checked after each iteration i (1-based) for every token still running; a token whose rule
fires stops and keeps its last state (copy-forward), so its neighbours keep reading a stable value.
The plan's loop count of the circuit is the cap (``max_loops``).

    latent_diff:EPS     ||h_i - h_{i-1}|| / ||h_i|| < EPS            (Huginn's default 0.03)
    kl:EPS              KL(p_i || p_{i-1}) < EPS on the next-token distributions read out through the
                        rest of the model after each iteration (Huginn: 5e-4 .. 1e-3)
    entropy_diff:EPS    |H(p_i) - H(p_{i-1})| < EPS (same readout)
    learned:q=Q         a circuit trained with a halting head: stop once the exit CDF
                        1 - prod_{j<=i} (1 - lambda_j) reaches Q

Options follow after commas: ``latent_diff:0.01,min=2,every=2`` (``min``: never stop before iteration
min; ``every``: check only every k-th iteration).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from loopformer.errors import PlanError

Array = jax.Array
KINDS = ("latent_diff", "kl", "entropy_diff", "learned")
READOUT_KINDS = ("kl", "entropy_diff")  # need the model's output distribution after every iteration
FORMS = "latent_diff:EPS, kl:EPS, entropy_diff:EPS or learned:q=Q, optionally followed by ,min=N and ,every=K"


@functools.partial(jax.tree_util.register_dataclass, data_fields=["threshold"],
                   meta_fields=["kind", "min_loops", "check_every"])
@dataclass(frozen=True)
class ExitRule:
    """A rule (static: kind, min_loops, check_every) and its threshold (traced inside a plan, so sweeping
    thresholds reuses one compiled program)."""

    kind: str
    threshold: float | Array
    min_loops: int = 1
    check_every: int = 1

    @staticmethod
    def parse(text: str) -> ExitRule:
        """``latent_diff:0.01``, ``kl:5e-4,min=2``, ``learned:q=0.5,every=2``; PlanError naming the forms."""
        m = re.fullmatch(r"\s*(\w+)\s*:\s*(?:q\s*=\s*)?([-+\d.eE]+)\s*((?:,\s*\w+\s*=\s*\d+\s*)*)", text or "")
        if not m or m.group(1) not in KINDS:
            raise PlanError(f"exit rule '{text}' is not one of {FORMS}")
        kind, options = m.group(1), {}
        if ("q=" in text.replace(" ", "")) != (kind == "learned"):
            raise PlanError(f"exit rule '{text}': write learned:q=Q for the halting head, and KIND:EPS for the others")
        for opt in filter(None, (o.strip() for o in m.group(3).split(","))):
            key, _, value = opt.partition("=")
            if key.strip() not in ("min", "every"):
                raise PlanError(f"exit rule '{text}': unknown option '{key.strip()}' (min=N, every=K)")
            options[key.strip()] = int(value)
        try:
            threshold = float(m.group(2))
        except ValueError:
            raise PlanError(f"exit rule '{text}': '{m.group(2)}' is not a number") from None
        rule = ExitRule(kind, threshold, options.get("min", 1), options.get("every", 1))
        if not (threshold > 0 and (kind != "learned" or threshold <= 1)):
            raise PlanError(f"exit rule '{text}': the threshold must be > 0" + (" and <= 1" if kind == "learned" else ""))
        if rule.min_loops < 1 or rule.check_every < 1:
            raise PlanError(f"exit rule '{text}': min and every must be >= 1")
        return rule

    @property
    def needs_readout(self) -> bool:
        return self.kind in READOUT_KINDS

    def __str__(self) -> str:
        value = f"{self.threshold:g}" if isinstance(self.threshold, int | float) else "<traced>"
        head = f"learned:q={value}" if self.kind == "learned" else f"{self.kind}:{value}"
        return head + (f",min={self.min_loops}" if self.min_loops > 1 else "") + (
            f",every={self.check_every}" if self.check_every > 1 else "")


def latent_change(h_prev: Array, h: Array) -> Array:
    """[...]: ||h - h_prev|| / ||h|| per token (over the last axis), in float32."""
    h, h_prev = h.astype(jnp.float32), h_prev.astype(jnp.float32)
    return jnp.linalg.norm(h - h_prev, axis=-1) / jnp.maximum(jnp.linalg.norm(h, axis=-1), 1e-12)


def kl_divergence(logits: Array, prev_logits: Array) -> Array:
    """[...]: KL(p || p_prev) of two logit arrays over their last axis."""
    lp, lq = jax.nn.log_softmax(logits.astype(jnp.float32)), jax.nn.log_softmax(prev_logits.astype(jnp.float32))
    return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


def entropy(logits: Array) -> Array:
    lp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.sum(jnp.exp(lp) * lp, axis=-1)
