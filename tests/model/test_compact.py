"""Compacted inference (`Plan.compact`): only the tokens still running are computed, the frozen tokens' keys
and values reused. It must give the masked loop's logits and loop counts, and execute fewer token-iterations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from loopformer.config import load_config
from loopformer.errors import PlanError
from loopformer.model.layers import stack_layers
from loopformer.model.plan import make_plan
from loopformer.model.transformer import build_model
from tests.model.test_model import randomize_writes

VOCAB = 40
X = "model.stages.0.circuits.X"


def _model(*overrides):
    cfg = load_config("configs/text_bytes.yaml", [
        "model.d_model=32", "model.heads=2", "model.prelude=1", "model.coda=1", f"{X}.depth=1", f"{X}.width=32",
        f"{X}.heads=2", *overrides])
    return randomize_writes(build_model(cfg.model, VOCAB, 0))


@functools.partial(jax.jit, static_argnums=(0,))
def _run(graphdef, params, tokens, segments, plan):
    logits, diag = nnx.merge(graphdef, params)(tokens, plan, segment_ids_BT=segments)
    return logits, diag.circuits["X"].used, diag.circuits["X"].computed


def _tokens(B=3, T=24, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, VOCAB, (B, T)), jnp.int32)


def _both(model, tokens, segments=None, **plan_kw):
    graphdef, params = nnx.split(model)
    out = {c: _run(graphdef, params, tokens, segments, make_plan(["X"], compact=c, **plan_kw)) for c in (True, False)}
    return out[True], out[False]


@pytest.mark.parametrize("overrides,eps", [
    ((), 0.01),  # causal, RoPE, additive injection
    (("model.causal=false", f"{X}.inject=concat", f"{X}.init=noise"), 0.1),
    (("model.position=coupled", "model.abacus_digits=[10, 19]"), 0.01),  # gathered tokens rotate by their places
], ids=["causal", "bidirectional-concat-noise", "coupled"])
def test_compacted_exits_give_the_masked_logits(overrides, eps):
    model = _model(*overrides)
    tokens = _tokens()
    (lc, uc, cc), (lm, um, cm) = _both(model, tokens, loops={"X": 16}, exits={"X": f"latent_diff:{eps}"})
    used = np.asarray(um)
    assert len(np.unique(used)) > 2 and used.min() < 16  # tokens stop at many different iterations
    np.testing.assert_array_equal(np.asarray(uc), used)
    np.testing.assert_allclose(np.asarray(lc), np.asarray(lm), atol=1e-5, rtol=1e-5)
    assert float(cc) < float(cm)


@pytest.mark.parametrize("causal", [True, False])
def test_compacted_context_diff_gives_the_masked_logits(causal):
    """context_diff stops tokens in sequence order (causal: the buffer gathers each row's running tail) or whole
    rows (bidirectional: the buffer gathers the running rows)."""
    model = _model(f"model.causal={str(causal).lower()}")
    (lc, uc, cc), (lm, um, cm) = _both(model, _tokens(B=3 if causal else 6), loops={"X": 16},
                                       exits={"X": "context_diff:0.02"})
    used = np.asarray(um)
    assert len(np.unique(used)) > 1 and used.min() < 16 and (np.diff(used, axis=-1) >= 0).all()
    if not causal:
        assert (used == used[:, :1]).all()
    np.testing.assert_array_equal(np.asarray(uc), used)
    np.testing.assert_allclose(np.asarray(lc), np.asarray(lm), atol=1e-5, rtol=1e-5)
    assert float(cc) < float(cm)


def test_compacted_per_token_counts_with_padding_and_packed_segments():
    """Per-token counts (no exit rule), padding (segment 0) and two packed documents: padding starts stopped;
    every real token's logits equal the masked loop's."""
    model = _model()
    tokens = _tokens(B=2, T=20, seed=1)
    segments = jnp.asarray([[1] * 8 + [2] * 8 + [0] * 4, [1] * 20], jnp.int32)
    counts = jnp.asarray(np.random.default_rng(2).integers(1, 9, (2, 20)), jnp.int32)
    (lc, uc, cc), (lm, um, _) = _both(model, tokens, segments, loops={"X": counts})
    real = np.asarray(segments) > 0
    np.testing.assert_allclose(np.asarray(lc)[real], np.asarray(lm)[real], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(uc)[real], np.asarray(counts)[real])
    assert (np.asarray(uc)[~real] == 0).all()  # padding never ran


def test_computed_counts_the_gathered_buffer_of_each_iteration():
    """Hand count: T = 16, buckets of 16, 8, 4, 2 tokens; token 0 of each row runs 6 iterations, the others 1.
    Iteration 1 computes all 16; iteration 2 the 16 that ran iteration 1 (15 of them only to store the keys
    and values of their final state); iterations 3-6 token 0 alone (bucket 2). Masked: 6 x 16 per row."""
    model = _model()
    B, T = 2, 16
    counts = jnp.ones((B, T), jnp.int32).at[:, 0].set(6)
    (lc, _, cc), (lm, _, cm) = _both(model, _tokens(B, T), loops={"X": counts}, compact_shares=(1, 2, 4, 8))
    np.testing.assert_allclose(np.asarray(lc), np.asarray(lm), atol=1e-5, rtol=1e-5)
    assert float(cc) == B * (16 + 16 + 4 * 2)
    assert float(cm) == B * 6 * 16


def test_finer_shares_fit_the_running_tokens_closer():
    """Hand count: T = 16, tokens 0-9 of each row run 6 iterations, the others 1. Shares 1, 1.5, 3, 8 give
    token buckets of 16, 11, 6 and 2: iterations 1-2 compute all 16 tokens of each row, iterations 3-6 the
    10 still running in a buffer of 11 (shares 1, 2, 4, 8 would take 16). The logits are the masked loop's."""
    model = _model()
    B, T = 2, 16
    counts = jnp.ones((B, T), jnp.int32).at[:, :10].set(6)
    (lc, _, cc), (lm, _, _) = _both(model, _tokens(B, T), loops={"X": counts}, compact_shares=(1, 1.5, 3, 8))
    np.testing.assert_allclose(np.asarray(lc), np.asarray(lm), atol=1e-5, rtol=1e-5)
    assert float(cc) == B * (16 + 16 + 4 * 11)


@pytest.mark.parametrize("shares", [(0.5, 1), (1, 1), (), (1, float("nan")), (1, float("inf"))])
def test_shares_below_one_repeated_or_none_are_refused(shares):
    with pytest.raises(PlanError, match=r"^compact_shares .*: give distinct finite shares of at least 1"):
        make_plan(["X"], {"X": 2}, compact_shares=shares)


@pytest.mark.parametrize("shares", [(2,), (2, 4, 8), (1.5, 3)])
def test_shares_without_one_are_refused(shares):
    """#27 pass 20: without 1 the largest buffer was smaller than the batch, and the rows and tokens past it were
    never run (a smaller loss, mean loops below the rule's, computed loops below the mean)."""
    with pytest.raises(PlanError, match=r"^compact_shares .*: include 1 \(a buffer of the whole batch"):
        make_plan(["X"], {"X": 2}, compact_shares=shares)


def test_deeper_circuits_and_fixed_counts_run_masked():
    """A two-block circuit's frozen token has later-layer keys and values that depend on its running
    neighbours, so it is never compacted; nor is a fixed count (every token runs every iteration)."""
    model = _model(f"{X}.depth=2")
    tokens = _tokens()
    (lc, _, cc), (lm, _, cm) = _both(model, tokens, loops={"X": 12}, exits={"X": "latent_diff:0.15"})
    np.testing.assert_array_equal(np.asarray(lc), np.asarray(lm))
    assert float(cc) == float(cm)
    (_, _, cc), _ = _both(_model(), tokens, loops={"X": 5})
    assert float(cc) == 5 * tokens.size


@pytest.mark.parametrize("overrides,span", [
    ((), 8),
    ((f"{X}.window=3",), 3),  # each token reads its 3-key window, not its row: index 5 of row 2 not index 3
    (("model.causal=false", f"{X}.window=2"), 3),  # one key each side
], ids=["causal", "window-3", "bidirectional-window-2"])
def test_a_flat_buffer_gathers_running_tokens_of_uneven_rows(overrides, span):
    """Hand count: B = 4, T = 8; row 0 runs 6 iterations on every token, rows 1-3 on token 0 only (and row 2 on
    token 5, in its second packed document), the others 1. Iterations 3-6 have 12 running tokens: rows by tokens
    would take 4 x 8 (row 0's 8 pad the others); the flat buffers of 32 / s tokens (32, 16, 8, 4) take 16, each
    token attending over its own row's keys and values (a windowed circuit's, the ``span`` keys around it),
    within its document and causally: the logits are the masked loop's."""
    model = _model(*overrides)
    assert stack_layers(model.stages[0].circuits["X"].blocks)[0].attn.flat_span(8) == span
    counts = jnp.ones((4, 8), jnp.int32).at[0].set(6).at[1:, 0].set(6).at[2, 5].set(6)
    segments = jnp.asarray([[1] * 8, [1] * 8, [1] * 4 + [2] * 4, [1] * 8], jnp.int32)
    (lc, uc, cc), (lm, um, cm) = _both(model, _tokens(4, 8), segments, loops={"X": counts},
                                       compact_shares=(1, 2, 4, 8))
    np.testing.assert_allclose(np.asarray(lc), np.asarray(lm), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(uc), np.asarray(um))
    assert float(cc) == 32 + 32 + 4 * 16
    assert float(cm) == 6 * 32


def test_rows_that_have_stopped_leave_the_buffer():
    """Hand count: B = 4, T = 8, one count per row (1, 1, 1, 6), as loops per difficulty give. Iterations 1-2
    compute every row (iteration 2 stores the final keys and values of the rows that stopped); iterations 3-6
    row 3 alone (R = 1 of the buckets 4, 2, 1). Masked: 6 x 32."""
    model = _model()
    counts = jnp.asarray([[1] * 8, [1] * 8, [1] * 8, [6] * 8], jnp.int32)
    (lc, _, cc), (lm, _, cm) = _both(model, _tokens(4, 8), loops={"X": counts}, compact_shares=(1, 2, 4, 8))
    np.testing.assert_allclose(np.asarray(lc), np.asarray(lm), atol=1e-5, rtol=1e-5)
    assert float(cc) == 32 + 32 + 4 * 8
    assert float(cm) == 6 * 32


def _while_loops(jaxpr) -> int:  # noqa: ANN001
    """The `while` primitives in a jaxpr, nested ones included: compacted inference runs one per phase."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "while"
        for sub in jax.core.jaxprs_in_params(eqn.params):
            count += _while_loops(sub)
    return count


@pytest.mark.parametrize("flat_bytes,phases", [(None, 4), (0, 12)], ids=["flat", "rows-by-tokens"])
def test_rows_by_tokens_buffers_only_where_no_flat_buffer_goes(monkeypatch, flat_bytes, phases):
    """B = 4, T = 8, shares 1, 2, 4, 8. Flat buffers of 16, 8 and 4 tokens hold any fresh set a rows-by-tokens
    buffer of their size holds, so evaluation compiles 4 phases (the whole batch and the three), not the 12
    rows-by-tokens ones (R of 4, 2, 1 by c of 8, 4, 2, 1); where no flat buffer may go (FLAT_KV_BYTES, here 0)
    the rows-by-tokens buffers run, and both give the masked loop's logits: one count per row (1, 1, 1, 6), so
    iterations 3-6 run row 3 alone, in 8 tokens either way."""
    import loopformer.model.circuit as circuit

    if flat_bytes is not None:
        monkeypatch.setattr(circuit, "FLAT_KV_BYTES", flat_bytes)
    _run.clear_cache()  # FLAT_KV_BYTES is read when the program is traced
    model = _model()
    graphdef, params = nnx.split(model)
    counts = jnp.asarray([[1] * 8, [1] * 8, [1] * 8, [6] * 8], jnp.int32)
    plan = make_plan(["X"], compact=True, loops={"X": counts}, compact_shares=(1, 2, 4, 8))
    jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(_tokens(4, 8), plan))(params)
    assert _while_loops(jaxpr.jaxpr) == phases
    (lc, _, cc), (lm, _, _) = _both(model, _tokens(4, 8), loops={"X": counts}, compact_shares=(1, 2, 4, 8))
    _run.clear_cache()
    np.testing.assert_allclose(np.asarray(lc), np.asarray(lm), atol=1e-5, rtol=1e-5)
    assert float(cc) == 32 + 32 + 4 * 8
