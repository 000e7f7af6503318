"""Answers of tasks with aligned labels come from one forward pass, not autoregressive decoding."""

import jax
import jax.numpy as jnp
import numpy as np

from loopformer.data.tasks import make_task
from loopformer.inference.generate import answer_examples


def test_aligned_task_answers_in_one_forward_pass():
    task = make_task("prefix_parity")
    rng = np.random.default_rng(0)
    exs = [task.example(rng, d, task.seq_len(6)) for d in (3, 6, 1)]
    batch = {k: np.stack([e[k] for e in exs]) for k in exs[0]}
    calls = []

    def oracle(params, tokens, loops, segment_ids):  # one-hot of the true labels; flips bit 2 when X runs once
        calls.append(tokens.shape)
        np.testing.assert_array_equal(segment_ids, batch["segment_ids"])  # padding is marked for the model
        labels = jnp.asarray(batch["targets"])
        labels = jnp.where((loops["X"] == 1) & (jnp.arange(labels.shape[1]) == 2), 7 - labels, labels)
        return jax.nn.one_hot(labels, task.vocab_size)

    out = answer_examples(oracle, None, task, batch, [{"X": 1}, {"X": 4}])
    assert len(calls) == 2  # one pass per loop setting, whatever the answer lengths
    for ex, e in zip(out, exs, strict=True):
        truth = task.solve(e["inputs"])
        assert ex["answer"]["tokens"] == truth
        one, four = ex["predictions"]
        assert four["tokens"] == truth and four["correct"]
        assert one["correct"] == (len(truth) < 2)  # bit 2 (label index 1) is wrong at 1 loop
