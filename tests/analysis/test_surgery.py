"""Ablation, sweeps and generation against the model itself: a removed circuit equals a model built
without it, a sweep reuses one program, greedy decoding is the argmax of the forward pass."""

import copy

import jax
import numpy as np
import pytest
from flax import nnx

from loopformer.analysis.ablate import ablate, mean_fill
from loopformer.analysis.evaluate import Evaluator
from loopformer.analysis.run import load_run, read_run
from loopformer.analysis.sweep import convergence, sweep
from loopformer.generate import generate_batch, generate_text, generate_tokens, make_logits_fn, tokenizer_of
from loopformer.model.transformer import build_model

from .conftest import EXAMPLES


@pytest.fixture(scope="module")
def run(run_dir):
    return load_run(read_run(run_dir))


@pytest.fixture(scope="module")
def eval_sets(run):
    return run.eval_sets(["train", "hard"], EXAMPLES)


def test_ablation_equals_the_model_built_without_the_circuit(run, eval_sets):
    # X and Y share one vmapped group (weights stacked [2, ...]); the model without Y keeps X's slice.
    small_cfg = copy.deepcopy(run.model.cfg)
    small_cfg.stages[0].circuits = small_cfg.stages[0].circuits[:1]
    small = nnx.eval_shape(lambda: build_model(small_cfg, run.model.vocab_size, 0))
    params = copy.copy(run.params)
    params["stages"] = {0: {"norm": run.params["stages"][0]["norm"],
                            "groups": {0: jax.tree.map(lambda a: a[:1], run.params["stages"][0]["groups"][0])}}}
    evaluator = Evaluator(small)
    for split, batches in eval_sets.items():
        ablated = run.evaluator.evaluate(run.params, batches, ablate=["Y"])
        without = evaluator.evaluate(params, batches, loops={"X": 2})
        full = run.evaluator.evaluate(run.params, batches)
        assert ablated["loss"] == pytest.approx(without["loss"], rel=1e-5), split
        assert ablated["accuracy"] == without["accuracy"]
        assert abs(ablated["loss"] - full["loss"]) > 1e-4  # Y matters in this model


def test_ablate_rows_and_mean_mode(run, eval_sets):
    zero = ablate(run, eval_sets, "zero")
    mean = ablate(run, eval_sets, "mean")
    assert [r["label"] for r in zero[:4]] == ["baseline", "-X", "-Y", "none"]
    by = {(r["split"], r["label"], r["mode"]): r for r in zero + mean}
    for split in eval_sets:
        base = by[split, "baseline", "zero"]
        assert base["delta_loss"] == 0 and base["kept"] == ["X", "Y"]
        assert by[split, "baseline", "mean"]["loss"] == base["loss"]
        assert by[split, "-X", "zero"]["delta_loss"] == pytest.approx(by[split, "-X", "zero"]["loss"] - base["loss"])
        assert by[split, "-X", "mean"]["loss"] != by[split, "-X", "zero"]["loss"]
    # The mean is taken over the batches without padding rows (the first of the two here).
    fill = mean_fill(run, eval_sets["train"])
    np.testing.assert_allclose(fill, run.evaluator.circuit_means(run.params, eval_sets["train"][:1]))
    assert fill.shape == (2, 16) and float(np.abs(fill).max()) > 0


def test_a_sweep_compiles_one_program_for_any_count(run, eval_sets):
    # 8 settings, counts up to 1000, at most one compile (none if an earlier test built the
    # program for this batch shape: the evaluator is shared by every command in the process).
    before = run.evaluator.compiles
    rows = sweep(run, {"hard": eval_sets["hard"]}, {"X": [1, 2, 7, 1000], "Y": [1, 3]})
    assert run.evaluator.compiles - before <= 1
    sweep(run, {"hard": eval_sets["hard"]}, {"X": [5, 9], "Y": [2]})
    assert run.evaluator.compiles - before <= 1
    assert [(r["loops"]["X"], r["loops"]["Y"]) for r in rows][:3] == [(1, 1), (1, 3), (2, 1)]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert len({round(r["loss"], 6) for r in rows}) > 4  # the counts change the output
    conv = convergence(run, {"hard": eval_sets["hard"]}, {"X": 4})
    stats = conv["hard"]["X"]
    assert set(conv["hard"]) == {"X"} and len(stats["rel_change"]) == len(stats["state_norm"]) == 4
    assert all(0 <= v <= 2 for v in stats["rel_change"])


def test_greedy_generation_is_the_argmax_of_the_forward_pass(run, eval_sets):
    fn = make_logits_fn(run.model)
    inputs = eval_sets["hard"][0]["inputs"]
    prompt = [int(t) for t in inputs[0, :10]]
    loops = run.model.loop_vector({"X": 5})
    new = generate_tokens(run.model, run.params, prompt, {"X": 5}, max_new_tokens=3, logits_fn=fn)
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
    out = generate_text(run.model, run.params, tok, "abcabcafed", max_new_tokens=3)
    assert len(out) == 3


def test_mean_fill_ignores_padding(run):
    """A circuit's mean output for mean ablation averages real tokens only: appending padding to every
    row (causal attention: earlier outputs unchanged) leaves it unchanged."""
    rng = np.random.default_rng(0)
    inputs = rng.integers(1, run.model.vocab_size, (4, 6)).astype(np.int32)
    batch = {"inputs": inputs, "targets": inputs, "mask": np.ones_like(inputs, np.float32)}
    padded = {k: np.pad(v, ((0, 0), (0, 5))) for k, v in batch.items()}
    np.testing.assert_allclose(run.evaluator.circuit_means(run.params, [padded]),
                               run.evaluator.circuit_means(run.params, [batch]), rtol=1e-5, atol=1e-6)


def test_per_example_correctness_matches_the_accuracy(run, eval_sets):
    """Evaluator.correct: one bool per real example (the padding rows of the last batch dropped),
    whose mean is evaluate()'s exact-match accuracy, at every loop count."""
    for n in (1, 4):
        for split in ("train", "hard"):
            correct = run.evaluator.correct(run.params, eval_sets[split], {"X": n})
            acc = run.evaluator.evaluate(run.params, eval_sets[split], {"X": n})["accuracy"]
            assert correct.shape == (EXAMPLES,) and correct.dtype == bool
            assert correct.mean() == pytest.approx(acc)
