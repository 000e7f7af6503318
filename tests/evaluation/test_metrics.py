"""Answer metrics: exact match per example, sums that add up over batches, bits per byte."""

import jax.numpy as jnp
import numpy as np
import pytest

from loopformer.metrics import answer_sums, exact_match, summarize, text_metrics


def test_sums_and_exact_match():
    targets = np.array([[1, 2, 0], [2, 2, 1], [0, 0, 0]])
    mask = np.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]], np.float32)  # the last row has no answer: padding
    right = np.array([[1, 2, 2], [2, 0, 1], [1, 1, 1]])  # row 0 right (its masked slot wrong), row 1 one wrong
    logits = 10 * jnp.eye(3)[right]
    batch = {"targets": targets, "mask": mask}
    np.testing.assert_array_equal(exact_match(logits, batch), [True, False, False])
    sums = answer_sums(logits, batch)
    assert float(sums["tokens"]) == 5 and float(sums["token_correct"]) == 4
    assert float(sums["examples"]) == 2 and float(sums["example_correct"]) == 1
    m = summarize(sums)
    assert m["accuracy"] == 0.5 and m["token_accuracy"] == 0.8
    assert m["loss"] == pytest.approx(10 / 5, rel=1e-3)  # one wrong token, cross-entropy ~ 10


def test_text_metrics():
    m = text_metrics({"loss": 2.0, "accuracy": 0.0}, 2.0)
    assert m["bits_per_byte"] == pytest.approx(2.0 / 2.0 / np.log(2)) and m["perplexity"] == pytest.approx(np.exp(2))
    assert text_metrics({"loss": 2.0}, None) == {"loss": 2.0}
