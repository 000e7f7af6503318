"""The training objective's extra terms: what a model's parts ask for beyond cross-entropy on the answer
tokens. Each halting kind defines its own (`loopformer.variants.halting`); routers return theirs as the
forward pass's auxiliary loss.

Every term is a sum over the batch's answer tokens scaled by ``scale`` (1 / the whole batch's answer
tokens), so micro-batches add up to the full-batch mean exactly; the settling loss, which reads every real token,
is a mean per micro-batch divided by their number (as the routers' terms are).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from loopformer.model.plan import Diagnostics
from loopformer.train.routing import owner, path_keys
from loopformer.variants.halting import Halting

Array = jax.Array


def halting_terms(diag: Diagnostics, name: str, rule: Halting, batch: dict[str, Array], n: Array,
                  progress: tuple[Array, int], scale: Array | float) -> tuple[Array, dict[str, Array]]:
    """(the halting circuit ``name``'s objective term: it replaces the plain CE unless ``rule.adds_to_ce``;
    sums for logging over the answer tokens). ``progress``: (this step, the run's total steps)."""
    report = diag.circuits[name]
    return rule.loss(report.exit_p, report.used, report.ponder, diag.step_logits, batch, n, *progress, scale)


def iteration_terms(diag: Diagnostics, batch: dict[str, Array], n: Array, scale: Array | float
                    ) -> tuple[Array, dict[str, Array]]:
    """(the loss at each of a circuit's last W iterations, sums for logging): per answer token, the mean CE of
    the logits after iterations n, n - 1, ..., n - W + 1 (``diag.step_logits`` [W, B, T, V], row j after
    iteration n - j) over the rows with n - j >= 1 (or ``diag.step_valid``'s rows, where the model reports
    them: a routed bank's own rounds); summed over the answer tokens times ``scale``. ``n`` is the circuit's
    count, int32 [] or per token [B, T]. With W = 1 it is the plain CE."""
    logits = diag.step_logits
    W = logits.shape[0]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"][None])  # [W, B, T]
    j = jnp.arange(W).reshape((W,) + (1,) * (ce.ndim - 1))
    rows = jnp.asarray(n, jnp.int32) - j >= 1 if diag.step_valid is None else diag.step_valid
    valid = rows.astype(ce.dtype)  # [W, ...] broadcast to [W, B, T]
    per_token = jnp.sum(ce * valid, axis=0) / jnp.maximum(jnp.sum(jnp.broadcast_to(valid, ce.shape), axis=0), 1.0)
    total = jnp.sum(per_token * batch["mask"].astype(ce.dtype))
    return total * scale, {"iteration_loss": total * scale}


def settle_terms(diag: Diagnostics, name: str, batch: dict[str, Array], weight: float, micro_batches: int
                 ) -> tuple[Array, dict[str, Array]]:
    """(the settling loss, sums for logging): ``weight`` times the mean over the micro-batch's real tokens
    (``segment_ids`` > 0; all without them) of circuit ``name``'s ||h_n - h_{n-1}||^2 / ||h_n||^2
    (``diag.circuits[name].settle`` [B, T]), divided by ``micro_batches`` so that their terms add up to the
    mean over the batch's micro-batches. Unlike the CE it reads every real token, prompt included: an exit rule
    that waits for what a token reads (context_diff) waits for the prompt's states too."""
    change = diag.circuits[name].settle
    real = (batch["segment_ids"] > 0 if "segment_ids" in batch else jnp.ones(change.shape, bool)).astype(change.dtype)
    mean = jnp.sum(change * real) / jnp.maximum(jnp.sum(real), 1.0) / micro_batches
    return weight * mean, {"settle": mean}


def gate_terms(diag: Diagnostics, name: str, rule: Halting, batch: dict[str, Array], n: Array,
               scale: Array | float) -> tuple[Array, dict[str, Array]]:
    """(Ouro stage II's objective for the halting circuit ``name``: its head's BCE against the per-step
    loss improvement (`Halting.gate_loss`); sums for logging)."""
    return rule.gate_loss(diag.circuits[name].exit_lambda, diag.step_logits, batch, n, scale)


def gate_leaves(params: Any, circuit: str) -> Any:
    """Pytree of bools like ``params``: True on the halting head of ``circuit`` (the only leaves stage II
    trains)."""
    def is_gate(path: tuple, _: Any) -> bool:  # stages/S/circuits/NAME/halt/{kernel,bias}
        return owner(path) == circuit and "halt" in path_keys(path)

    return jax.tree_util.tree_map_with_path(is_gate, params)
