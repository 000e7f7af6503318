"""Metrics of a batch's answers: cross-entropy, token accuracy, exact match per example, bits per byte.

A batch's answer tokens are where ``mask == 1``; an example counts as correct only if every one of
its answer tokens is the argmax (exact match). Sums are returned, so batches add up exactly.

One definition for both sides: the train step's loss is `answer_sums`'s, and the evaluator reports
the same sums (`summarize`); this module imports nothing of loopformer.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
Batch = dict[str, Array]


def rows_right(right_BT: Array, mask_BT: Array) -> Array:
    """bool [B]: rows with at least one answer token, all of them right."""
    return jnp.all(right_BT | (mask_BT == 0), axis=-1) & (mask_BT.sum(-1) > 0)


def exact_match(logits_BTV: Array, batch: Batch) -> Array:
    """bool [B]: every answer token (mask == 1) of the row is the argmax; False for rows without one."""
    return rows_right(jnp.argmax(logits_BTV, axis=-1) == batch["targets"], batch["mask"])


def answer_sums(logits_BTV: Array, batch: Batch, loss_scale: Array | float = 1.0) -> dict[str, Array]:
    """Sums over the answer tokens (mask == 1) of one batch: loss_sum (cross-entropy, times
    ``loss_scale``), tokens, token_correct, examples (rows with any answer token) and example_correct
    (rows whose every answer token is right)."""
    mask = batch["mask"].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])
    right_BT = jnp.argmax(logits_BTV, axis=-1) == batch["targets"]
    return {"loss_sum": jnp.sum(ce * mask) * loss_scale, "tokens": mask.sum(),
            "token_correct": jnp.sum(right_BT.astype(jnp.float32) * mask),
            "examples": (mask.sum(-1) > 0).astype(jnp.float32).sum(),
            "example_correct": rows_right(right_BT, mask).astype(jnp.float32).sum()}


def summarize(sums: dict[str, Array | float]) -> dict[str, float]:
    """`answer_sums` totals -> loss (per token), accuracy (exact match per example), token_accuracy."""
    tokens, examples = max(float(sums["tokens"]), 1.0), max(float(sums["examples"]), 1.0)
    return {"loss": float(sums["loss_sum"]) / tokens, "accuracy": float(sums["example_correct"]) / examples,
            "token_accuracy": float(sums["token_correct"]) / tokens}


def text_metrics(metrics: dict[str, float], bytes_per_token: float | None) -> dict[str, float]:
    """``metrics`` (mean ``loss`` in nats per token) + ``bits_per_byte`` = loss / bytes_per_token / ln 2
    (comparable across tokenizers) and ``perplexity`` = exp(loss); unchanged when ``bytes_per_token``
    is None (synthetic tasks)."""
    if bytes_per_token is None:
        return dict(metrics)
    return {**metrics, "bits_per_byte": metrics["loss"] / max(bytes_per_token, 1e-9) / math.log(2),
            "perplexity": math.exp(min(metrics["loss"], 700.0))}
