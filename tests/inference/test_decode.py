"""Cached decoding against recomputing the prefix: exact for the full policy, approximations measured
for the others; exits, sampling, stop tokens and one program per bucket."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from loopformer.config import load_config
from loopformer.errors import PlanError
from loopformer.evaluation.evaluator import loops_used
from loopformer.inference.decode import Decoder, Sampling, sample
from loopformer.inference.generate import generate_batch, logits_fn, until_eos
from loopformer.model.plan import make_plan
from loopformer.model.transformer import build_model
from loopformer.variants.cache import CachePolicy
from tests.model.test_model import randomize_writes

VOCAB = 40


@pytest.fixture(scope="module")
def model():
    """A text-shaped model: prelude, a 2-block circuit, coda, an untied head."""
    cfg = load_config("configs/text_bytes.yaml", [
        "model.d_model=32", "model.heads=2", "model.prelude=1", "model.coda=1",
        "model.stages.0.circuits.X.width=32", "model.stages.0.circuits.X.heads=2", "model.stages.0.circuits.X.window=3"])
    return randomize_writes(build_model(cfg.model, VOCAB, 0))


PROMPTS = [[1, 5, 9, 22, 30, 7], [1, 7, 8]]


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _decoded(graphdef, params, tokens_BT, lengths_B, plan, policy, loops=4):
    """Prefill of the first 8 positions, then one cached step per token (teacher-forced): the logits of every
    position after each prompt [B, T - 8, V], the token-iterations circuit X executed in the prefill and in the
    steps, and the iterations X ran in each step [T - 9, B]."""
    model = nnx.merge(graphdef, params)
    B, T = tokens_BT.shape
    P = 8
    cache = model.empty_cache(B, T, policy, {"X": loops})
    pos = jnp.broadcast_to(jnp.arange(P), (B, P))
    first = model.decode(tokens_BT[:, :P], pos, cache, plan, policy, last_B=lengths_B - 1)

    def step(carry, j):  # a scan, not a Python loop: one decode step to compile, not T - P - 1
        cache, computed = carry
        p = lengths_B + j
        out = model.decode(tokens_BT[jnp.arange(B), p][:, None], p[:, None], cache, plan, policy)
        return (out.cache, computed + out.computed["X"]), (out.logits[:, 0], out.loops["X"][:, 0])

    (_, computed), (rest, used) = jax.lax.scan(step, (first.cache, jnp.zeros((), jnp.float32)), jnp.arange(T - P - 1))
    # [B, T - P]: logits predicting the token after lengths - 1 + j
    logits = jnp.concatenate([first.logits[jnp.arange(B), lengths_B - 1][:, None], rest.swapaxes(0, 1)], 1)
    return logits, first.computed["X"], computed, used


def _prefill_then_steps(graphdef, params, tokens_BT, lengths_B, plan, policy, loops=4):
    """Logits of every position after the prompt, computed by prefill + one cached step per token."""
    return _decoded(graphdef, params, tokens_BT, lengths_B, plan, policy, loops)[0]


def _reference(model, tokens_BT, lengths_B, loops):
    full = logits_fn(model)(nnx.state(model), tokens_BT, loops)
    return jnp.stack([full[jnp.arange(2), lengths_B - 1 + j] for j in range(tokens_BT.shape[1] - 8)], 1)


def _tokens():
    rng = np.random.default_rng(0)
    buf = rng.integers(3, VOCAB, (2, 24)).astype(np.int32)
    for i, p in enumerate(PROMPTS):
        buf[i, : len(p)] = p
    return jnp.asarray(buf), jnp.asarray([len(p) for p in PROMPTS])


# full stays in the fast suite; the other policies (about 20 s each on 2 cores) run with the slow tests
@pytest.mark.parametrize("policy,exact", [("full", True)] + [pytest.param(p, e, marks=pytest.mark.slow) for p, e in
                                                             (("ring:4", True), ("ring:2", False), ("last", False),
                                                              ("first", False))])
def test_cached_logits_against_recompute(model, policy, exact):
    """full (and a ring as long as the loop) reproduce the recomputed logits to float32 precision; the
    sharing policies are approximations whose error is measured here, not hidden."""
    tokens, lengths = _tokens()
    plan = make_plan(["X"], {"X": 3})
    got = _prefill_then_steps(nnx.graphdef(model), nnx.state(model), tokens, lengths, plan, CachePolicy.parse(policy))
    want = _reference(model, tokens, lengths, {"X": 3})
    diff = float(jnp.abs(got - want).max())
    if exact:
        assert diff <= 1e-4
    else:
        assert 1e-4 < diff < 100  # different, and finite


def test_one_loop_makes_every_policy_exact(model):
    tokens, lengths = _tokens()
    plan = make_plan(["X"], {"X": 1})
    want = _reference(model, tokens, lengths, {"X": 1})
    for policy in ("last", "first", "ring:2"):
        got = _prefill_then_steps(nnx.graphdef(model), nnx.state(model), tokens, lengths, plan, CachePolicy.parse(policy))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_greedy_decoding_matches_recompute_and_is_one_program(model):
    params = nnx.state(model)
    dec = Decoder(nnx.graphdef(model), model.circuit_names, "full")
    out = dec(params, PROMPTS, {"X": 3}, 20)
    ref = generate_batch(logits_fn(model), params, PROMPTS, {"X": 3}, 20)
    assert out.tokens.tolist() == ref and out.lengths.tolist() == [20, 20]
    np.testing.assert_array_equal(out.loops["X"], 3)
    dec(params, PROMPTS, {"X": 4}, 17)  # same bucket of slots (4) and of lengths (32): no new program
    assert dec.compiles == 1
    dec(params, PROMPTS, {"X": 4}, 17, Sampling(temperature=0.7, top_k=5, top_p=0.9))
    assert dec.compiles == 1


def test_stop_token_ends_a_row(model):
    params = nnx.state(model)
    dec = Decoder(nnx.graphdef(model), model.circuit_names, "full")
    free = dec(params, PROMPTS, {"X": 3}, 12)
    eos = int(free.tokens[0, 4])  # whatever row 0 says fifth becomes its stop token
    stopped = dec(params, PROMPTS, {"X": 3}, 12, eos_id=eos)
    first = free.tokens[0].tolist().index(eos)
    assert stopped.lengths[0] == first + 1 and (stopped.tokens[0, first:] == eos).all()
    np.testing.assert_array_equal(stopped.tokens[0, : first + 1], free.tokens[0, : first + 1])
    # several stop ids (generation_config.json's eos_token_id list): a row ends at the first of any
    other = int(free.tokens[0, 2])
    both = dec(params, PROMPTS, {"X": 3}, 12, eos_id=[eos, other])
    first_any = min(free.tokens[0].tolist().index(t) for t in (eos, other))
    assert both.lengths[0] == first_any + 1
    assert until_eos(None, free.tokens[0].tolist(), [eos, other]) == free.tokens[0, :first_any].tolist()


def test_exits_while_decoding(model):
    params = nnx.state(model)
    dec = Decoder(nnx.graphdef(model), model.circuit_names, "full")
    tight = dec(params, PROMPTS, {"X": 6}, 10, exits={"X": "latent_diff:1e-9"})
    loose = dec(params, PROMPTS, {"X": 6}, 10, exits={"X": "latent_diff:1e9"})
    np.testing.assert_array_equal(loose.loops["X"], 1)
    assert float(tight.loops["X"].mean()) > 5
    with pytest.raises(PlanError, match="cannot run the exit rule kl of circuit X: it reads the output"):
        dec(params, PROMPTS, {"X": 6}, 10, exits={"X": "kl:1e-3"})
    with pytest.raises(PlanError, match="cannot run the exit rule context_diff of circuit X: a token waits for the "
                                        "tokens before it"):
        dec(params, PROMPTS, {"X": 6}, 10, exits={"X": "context_diff:1e-3"})


@pytest.mark.parametrize("depth", [1, 2])
def test_cached_exits_equal_recompute_with_mixed_exit_counts(depth):
    """One semantics for an exited token: it keeps its state, and later iterations read the keys and values
    of that frozen state, in the forward pass and in cached decoding alike. Slots a chunk's loop never
    reached (every token had stopped) are filled with those; with mixed exit counts the cached logits
    equal the recomputed ones."""
    cfg = load_config("configs/text_bytes.yaml", [
        "model.d_model=32", "model.heads=2", "model.prelude=1", "model.coda=1", f"model.stages.0.circuits.X.depth={depth}",
        "model.stages.0.circuits.X.width=32", "model.stages.0.circuits.X.heads=2"])
    m = randomize_writes(build_model(cfg.model, VOCAB, 0))
    tokens, lengths = _tokens()
    policy = CachePolicy.parse("full")
    for eps in (0.1, 0.2):
        plan = make_plan(["X"], {"X": 12}, exits={"X": f"latent_diff:{eps}"})
        full, diag = jax.jit(lambda p, t, plan: nnx.merge(nnx.graphdef(m), p)(t, plan))(nnx.state(m), tokens, plan)
        counts = np.unique(np.asarray(diag.circuits["X"].used))
        assert len(counts) > 1 and counts.max() < 12  # mixed exit counts, every token stopped before the cap
        want = jnp.stack([full[jnp.arange(2), lengths - 1 + j] for j in range(tokens.shape[1] - 8)], 1)
        got = _prefill_then_steps(nnx.graphdef(m), nnx.state(m), tokens, lengths, plan, policy, 12)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    if depth == 2:  # compaction asked for: a two-block circuit still runs masked, with the same logits and work
        masked = _decoded(nnx.graphdef(m), nnx.state(m), tokens, lengths, plan, policy, 12)
        forced = _decoded(nnx.graphdef(m), nnx.state(m), tokens, lengths, dataclasses.replace(plan, compact=True),
                          policy, 12)
        for a, b in zip(forced, masked, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _one_block(window=0):
    cfg = load_config("configs/text_bytes.yaml", [
        "model.d_model=32", "model.heads=2", "model.prelude=1", "model.coda=1", "model.stages.0.circuits.X.depth=1",
        "model.stages.0.circuits.X.width=32", "model.stages.0.circuits.X.heads=2",
        f"model.stages.0.circuits.X.window={window}"])
    return randomize_writes(build_model(cfg.model, VOCAB, 0))


@pytest.mark.parametrize("window", [0, 3], ids=["causal", "causal-window-3"])
def test_compacted_cached_decoding_gives_the_masked_and_recomputed_logits(window):
    """Compacted cached decoding (`Plan.compact`, one-block circuit, exits): in the prefill and in every step only
    the rows and tokens still running are computed, the frozen ones' keys and values (of the iteration after
    they stopped) reused for the later slots of the cache. Four rows whose tokens stop at different iterations:
    the logits equal the masked decoding's and the recomputed forward pass's to 1e-5, and fewer
    token-iterations run than masked, in the prefill and in the steps."""
    m = _one_block(window)
    rng = np.random.default_rng(3)
    B, T = 4, 20
    tokens = jnp.asarray(rng.integers(3, VOCAB, (B, T)), jnp.int32)
    lengths = jnp.asarray([8, 3, 6, 5], jnp.int32)
    policy = CachePolicy.parse("full")
    plan = make_plan(["X"], {"X": 12}, exits={"X": "latent_diff:0.1"})
    full, diag = jax.jit(lambda p, t, plan: nnx.merge(nnx.graphdef(m), p)(t, plan))(nnx.state(m), tokens, plan)
    assert np.asarray(diag.circuits["X"].used).max() < 12
    want = jnp.stack([full[jnp.arange(B), lengths - 1 + j] for j in range(T - 8)], 1)
    runs = {c: _decoded(nnx.graphdef(m), nnx.state(m), tokens, lengths, dataclasses.replace(plan, compact=c), policy, 12)
            for c in (True, False)}
    (lc, pc, sc, uc), (lm, pm, sm, um) = runs[True], runs[False]
    used = np.asarray(um)
    assert (used.min(1) < used.max(1)).sum() >= 3  # in most steps the rows' tokens stop at different iterations
    np.testing.assert_array_equal(np.asarray(uc), used)
    np.testing.assert_allclose(np.asarray(lc), np.asarray(lm), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lc), np.asarray(want), atol=1e-5, rtol=1e-5)
    assert float(pc) < float(pm) and float(sc) < float(sm)


def test_compacted_greedy_decoding_gives_the_same_tokens():
    """The Decoder with exits and compact on, off, and the recompute path: the same greedy tokens and loop
    counts; compacted runs fewer token-iterations (`Generated.computed`)."""
    m = _one_block()
    params, names = nnx.state(m), m.circuit_names
    exits = {"X": "latent_diff:0.1"}
    dec = Decoder(nnx.graphdef(m), names, "full")
    on = dec(params, PROMPTS, {"X": 12}, 16, exits=exits, compact=True)
    off = dec(params, PROMPTS, {"X": 12}, 16, exits=exits, compact=False)
    forward = jax.jit(lambda p, t, plan: nnx.merge(nnx.graphdef(m), p)(t, plan)[0])
    ref = generate_batch(lambda p, t, loops, seg=None: forward(p, t, make_plan(names, loops, exits=exits)), params,
                         PROMPTS, {"X": 12}, 16)
    assert on.tokens.tolist() == off.tokens.tolist() == ref
    np.testing.assert_array_equal(on.loops["X"], off.loops["X"])
    # the recompute path's iterations per new token (`ran`, #27 pass 22): those of cached decoding
    forward_used = jax.jit(lambda p, t, plan: _with_used(nnx.merge(nnx.graphdef(m), p)(t, plan), plan, t.shape))
    ran = {}
    again = generate_batch(lambda p, t, loops, seg=None: forward_used(p, t, make_plan(names, loops, exits=exits)),
                           params, PROMPTS, {"X": 12}, 16, ran=ran)
    assert again == ref and set(ran) == {"X"}
    np.testing.assert_array_equal(ran["X"], on.loops["X"])
    assert len(np.unique(on.loops["X"])) > 1
    assert on.computed["X"] < off.computed["X"]


def _with_used(out, plan, shape):
    logits, diag = out
    return logits, loops_used(diag, plan, shape)


def test_continuous_thinking_starts_from_the_last_state(model):
    """With continuous thinking a new token's circuit starts from the previous token's final state, which
    the cache keeps per row: the same step gives other logits than from the circuit's initial state."""
    policy, plan = CachePolicy.parse("full"), make_plan(["X"], {"X": 2})

    @jax.jit
    def step(params, continuous_state):
        m = nnx.merge(nnx.graphdef(model), params)
        cache = m.empty_cache(1, 8, policy, {"X": 2})
        cache = m.decode(jnp.asarray([[1, 5, 9]]), jnp.asarray([[0, 1, 2]]), cache, plan, policy).cache
        plain = m.decode(jnp.asarray([[4]]), jnp.asarray([[3]]), cache, plan, policy)[0]
        cont = m.decode(jnp.asarray([[4]]), jnp.asarray([[3]]), cache, plan, policy, continuous=True)[0]
        return plain, cont, cache.state["X"]

    plain, cont, state = step(nnx.state(model), None)
    assert float(jnp.abs(state).max()) > 0 and float(jnp.abs(plain - cont).max()) > 1e-3
    out = Decoder(nnx.graphdef(model), model.circuit_names, "full", continuous=True)(nnx.state(model), PROMPTS,
                                                                                       {"X": 2}, 8)
    assert out.tokens.shape == (2, 8)


def test_sampling():
    logits = jnp.asarray([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 0.0]])
    key = jax.random.key(0)
    assert sample(logits, key, Sampling()).tolist() == [1, 2]
    assert sample(logits, key, Sampling(temperature=1.0, top_k=1)).tolist() == [1, 2]
    assert sample(logits, key, Sampling(temperature=1.0, top_p=0.01)).tolist() == [1, 2]
    draws = np.stack([sample(logits, jax.random.key(s), Sampling(temperature=1.0, top_k=2)) for s in range(200)])
    assert set(draws[:, 0]) == {1, 2}  # only the two likeliest
    draws = np.stack([sample(logits, jax.random.key(s), Sampling(temperature=1.0)) for s in range(200)])
    assert set(draws[:, 0]) == {0, 1, 2, 3}


@pytest.mark.parametrize("text,slots", [("full", 8), ("last", 1), ("ring:3", 3), ("first", 1), ("ring:6", 6),
                                        ("ring:10000", 8)])
def test_policies(text, slots):
    assert CachePolicy.parse(text).slots(5) == slots  # a ring longer than the full bucket is the full cache
    with pytest.raises(PlanError, match="not a cache policy"):
        CachePolicy.parse("all")
    with pytest.raises(PlanError, match=r"ring:K needs K in 1..10000"):
        CachePolicy.parse("ring:99999999999")


def test_grouped_query_attention_decodes_exactly_and_caches_only_kv_heads():
    """kv_heads < heads (and q/k/v biases): the cache holds the key/value heads only, and the full policy
    still reproduces the recomputed logits."""
    cfg = load_config("configs/text_bytes.yaml", [
        "model.d_model=32", "model.heads=4", "model.kv_heads=2", "model.qkv_bias=true", "model.prelude=1",
        "model.coda=1", "model.stages.0.circuits.X.width=32", "model.stages.0.circuits.X.heads=4",
        "model.stages.0.circuits.X.kv_heads=1"])
    gqa = randomize_writes(build_model(cfg.model, VOCAB, 0))
    assert gqa.prelude.attn.qkv.kernel.value.shape == (1, 32, (4 + 2 * 2) * 8)
    cache = gqa.empty_cache(2, 24, CachePolicy.parse("full"), {"X": 4})
    assert cache.prelude[0][0].shape[-2:] == (2, 8) and cache.circuits["X"][0][0].shape[-2] == 1
    tokens, lengths = _tokens()
    loops = {"X": 3}
    cached = _prefill_then_steps(nnx.graphdef(gqa), nnx.state(gqa), tokens, lengths,
                                 make_plan(["X"], loops), CachePolicy.parse("full"))
    assert np.abs(np.asarray(cached) - np.asarray(_reference(gqa, tokens, lengths, loops))).max() < 1e-4
