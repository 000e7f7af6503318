"""The training objective's extra terms: what a model's parts ask for beyond cross-entropy on the answer
tokens. Each halting kind defines its own (`loopformer.variants.halting`); routers return theirs as the
forward pass's auxiliary loss.

Every term is a sum over the batch's answer tokens scaled by ``scale`` (1 / the whole batch's answer
tokens), so micro-batches add up to the full-batch mean exactly.
"""

from __future__ import annotations

import jax

from loopformer.model.plan import Diagnostics
from loopformer.variants.halting import Halting

Array = jax.Array


def halting_terms(diag: Diagnostics, name: str, rule: Halting, batch: dict[str, Array], n: Array,
                  progress: tuple[Array, int], scale: Array | float) -> tuple[Array, dict[str, Array]]:
    """(the halting circuit ``name``'s objective term: it replaces the plain CE unless ``rule.adds_to_ce``;
    sums for logging over the answer tokens). ``progress``: (this step, the run's total steps)."""
    report = diag.circuits[name]
    return rule.loss(report.exit_p, report.used, report.ponder, diag.step_logits, batch, n, *progress, scale)
