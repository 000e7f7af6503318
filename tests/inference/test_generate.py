"""Greedy decoding is the argmax of the forward pass; prompts batch; tokenizers plug in."""

import jax
import numpy as np
import pytest

from loopformer.inference.generate import generate_batch, generate_text, logits_fn, tokenizer_of
from tests.conftest import EXAMPLES


@pytest.fixture(scope="module")
def eval_sets(run):
    return run.eval_sets(["hard"], EXAMPLES)


def test_greedy_generation_is_the_argmax_of_the_forward_pass(run, eval_sets):
    fn = run.evaluator.logits
    inputs = eval_sets["hard"][0]["inputs"]
    prompt = [int(t) for t in inputs[0, :10]]
    loops = run.info.full_loops({"X": 5})
    new = generate_batch(fn, run.params, [prompt], loops, max_new_tokens=3)[0]
    # Greedy: each new token is the argmax of the forward pass over everything before it (the
    # padding after it does not matter: attention is causal; 32 = the buffer length used above).
    padded = np.zeros((1, 32), np.int32)
    padded[0, :13] = prompt + new
    logits = fn(run.params, jax.numpy.asarray(padded), loops)
    assert new == [int(t) for t in np.argmax(logits[0, len(prompt) - 1 : 12], axis=-1)]
    # Batched prompts of different lengths decode as they would alone; sampling is seeded.
    batch = [prompt, prompt[:4], [int(t) for t in inputs[1, :7]]]
    assert generate_batch(fn, run.params, batch, loops, 3)[0] == new
    a = generate_batch(fn, run.params, batch, loops, 3, temperature=1.0, seed=3)
    assert a == generate_batch(fn, run.params, batch, loops, 3, temperature=1.0, seed=3)


class CharTokenizer:
    """A stand-in for a text tokenizer: characters 'a'..'f' are ids 4..9."""

    def encode(self, text):
        return [ord(c) - ord("a") + 4 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 4 + ord("a")) if 4 <= i < 10 else "·" for i in ids)


def test_a_tokenizer_plugs_in(run):
    assert tokenizer_of(run.task) is None  # synthetic task
    tok = CharTokenizer()
    assert tokenizer_of(tok) is tok
    out = generate_text(run.evaluator.logits, run.params, tok, "abcabcafed", run.info.full_loops(), max_new_tokens=3)
    assert len(out) == 3


def test_a_standalone_logits_fn_matches_the_evaluators(run, eval_sets):
    tokens = jax.numpy.asarray(eval_sets["hard"][0]["inputs"][:2])
    loops = run.info.full_loops({"X": 3})
    np.testing.assert_allclose(logits_fn(run.model)(run.params, tokens, loops),
                               run.evaluator.logits(run.params, tokens, loops), rtol=1e-6, atol=1e-6)
