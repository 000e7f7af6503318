"""Registered variants: every family's table drives validation and parsing, and a new variant is one class
(a new exit rule and a new halting kind registered here run through the model with no other change)."""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from loopformer.config import load_config
from loopformer.errors import ConfigError, PlanError
from loopformer.model.plan import make_plan
from loopformer.model.transformer import build_model
from loopformer.train.losses import halting_terms
from loopformer.variants.cache import POLICIES, CachePolicy
from loopformer.variants.exits import EXITS, ExitRule, LatentDiff, Patience, exit_rule, register_exit
from loopformer.variants.halting import HALTINGS, _Geometric
from loopformer.variants.loops import LoopDistribution
from loopformer.variants.registry import Registry
from tests.model.test_model import randomize_writes

VOCAB = 40
SMALL = ["model.d_model=16", "model.heads=2", "model.prelude=1", "model.coda=1", "model.mlp_ratio=1",
         "model.stages.0.circuits.X.width=16", "model.stages.0.circuits.X.heads=2",
         "model.stages.0.circuits.X.mlp_ratio=1"]


def small_model(*extra):
    return randomize_writes(build_model(load_config("configs/text_bytes.yaml", [*SMALL, *extra]).model, VOCAB, 0))


@pytest.mark.parametrize("override,message", [
    ("model.stages.0.circuits.X.halting.kind=graves", "circuits.X.halting.kind: 'graves' is not one of none, ouro, "
                                                      "pondernet, act"),
    ("model.stages.0.router.kind=soft", "model.stages.0.router.kind: 'soft' is not one of none, token_choice, "
                                        "expert_choice"),
    ("model.stages.0.circuits.X.inject=mul", "circuits.X.inject: 'mul' is not one of add, concat, none"),
    ("model.stages.0.circuits.X.init=ones", "circuits.X.init: 'ones' is not one of zeros, input, noise"),
    ("model.position=alibi", "model.position: 'alibi' is not one of rope, none, abacus"),
    ("model.stages.0.circuits.X.loops='geometric(3)'", "circuits.X.loops: 'geometric(3)' is not a loop distribution; "
                                                      "use an int or 'fixed(n)', 'uniform(a, b)', "
                                                      "'poisson_lognormal(mean, sigma)'"),
])
def test_unknown_names_get_one_line_with_the_choices(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/text_bytes.yaml", [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_registry_refuses_a_name_twice():
    table = Registry("thing")
    table.register("a")(type("A", (), {}))
    with pytest.raises(ValueError, match="thing 'a' is registered twice"):
        table.register("a")(type("B", (), {}))
    assert table.names() == ("a",) and table.get("a").kind == "a"


@pytest.mark.parametrize("text", ["3", "fixed(3)", "uniform(2, 9)", "poisson_lognormal(8, 0.5)"])
def test_loop_distributions_round_trip(text):
    dist = LoopDistribution.parse(text, cap=16)
    assert str(LoopDistribution.parse(str(dist), cap=16)) == str(dist)
    draws = np.asarray(jax.vmap(dist.draw)(jax.random.split(jax.random.key(0), 256)))
    lo, hi = dist.typical_range()
    assert draws.min() >= 1 and draws.max() <= 16 and (lo <= np.median(draws) <= hi)


@pytest.mark.parametrize("text,message", [("uniform(2)", "wrong number of arguments"), ("uniform(5, 2)", "1 <= a <= b"),
                                          ("fixed(x)", "must be numbers"), ("fixed(2.5)", "integer n >= 1")])
def test_bad_loop_distributions(text, message):
    with pytest.raises(ValueError, match=message):
        LoopDistribution.parse(text)


def test_cache_policies_parse_and_print():
    assert [str(CachePolicy.parse(t)) for t in ("full", "last", "first", "ring:3")] == ["full", "last", "first", "ring:3"]
    assert POLICIES.names() == ("full", "last", "ring", "first")
    assert [CachePolicy.parse("ring:3").slots(8), CachePolicy.parse("full").slots(5), CachePolicy.parse("last").slots(8)] \
        == [3, 8, 1]
    ring = "ring:K needs K in 1..10000"
    for text, message in (("ring", ring), ("ring:0", ring), ("ring:-1", ring), ("full:2", "no argument"),
                          ("lru", "not a cache policy; use full, last, ring:K, first")):
        with pytest.raises(PlanError, match=message):
            CachePolicy.parse(text)


class _Probe:
    """An exit rule's view of a circuit where the write is the state and the readout the identity."""

    def __init__(self):
        self.readout, self.n = (lambda out: out), jnp.asarray(10)

    def emit(self, h):
        return h


def test_patience_stops_after_k_unchanged_predictions():
    rule = ExitRule.parse("patience:2")
    assert isinstance(rule, Patience) and str(rule) == "patience:2" and rule.needs_readout
    # top-1 of the states 0..5 (one token): 1, 0, 2, 2, 2, 2 -> unchanged at iterations 3 and 4: fires at 4
    tops = [1, 0, 2, 2, 2, 2]
    states = [jax.nn.one_hot(jnp.asarray([t]), 3) for t in tops]
    probe, state, fired = _Probe(), None, []
    state = rule.start(probe, states[0])
    for i in range(1, len(states)):
        fire, state = rule.stop(probe, jnp.asarray(i), states[i - 1], states[i], jnp.ones((1,), bool), state)
        fired.append(bool(fire[0]))
    assert fired == [False, False, False, True, True]


# --- a new exit rule: one class, registered; nothing else changes -----------------------------------------------
@register_exit("test_after")
class _After(ExitRule):
    """test_after:N: stop every token after N iterations (a rule whose answer is known)."""

    placeholder = "N"

    def stop(self, probe, i, h_prev, h, active, state):
        return jnp.broadcast_to(i >= self.threshold, active.shape), state



def test_a_new_exit_rule_runs_in_the_forward_pass_and_in_cached_decoding():
    from loopformer.inference.decode import Decoder

    model = small_model()
    toks = jnp.asarray(np.random.default_rng(0).integers(3, VOCAB, (2, 9)), jnp.int32)
    plan = make_plan(["X"], {"X": 8}, exits={"X": "test_after:3"})
    logits, diag = nnx.jit(lambda m, t, p: m(t, p))(model, toks, plan)
    np.testing.assert_array_equal(diag.circuits["X"].used, 3)
    fixed, _ = nnx.jit(lambda m, t, p: m(t, p))(model, toks, make_plan(["X"], {"X": 3}))
    np.testing.assert_allclose(logits, fixed, atol=1e-5)  # stopping after 3 of 8 is running 3
    out = Decoder(nnx.graphdef(model), model.circuit_names, "full")(nnx.state(model), [[1, 5, 9]], {"X": 8}, 4,
                                                                     exits={"X": "test_after:3"})
    np.testing.assert_array_equal(out.loops["X"], 3)


# --- a new halting kind: one class, registered; config, model and loss read it ------------------------------------
@HALTINGS.register("test_flat")
@dataclass(frozen=True)
class _Flat(_Geometric):
    """Ouro's exit distribution with no regulariser."""

    def regulariser(self, p, n, step, total_steps):
        return jnp.zeros(p.shape[1:])


def test_a_new_halting_kind_builds_a_head_and_its_loss():
    model = small_model("model.stages.0.circuits.X.halting.kind=test_flat")
    circuit = model.stages[0].circuits["X"]
    assert isinstance(circuit.halting, _Flat) and hasattr(circuit, "halt")
    toks = jnp.asarray(np.random.default_rng(1).integers(3, VOCAB, (2, 6)), jnp.int32)
    plan = make_plan(["X"], {"X": 3}, backprop={"X": 3}, stash=4)
    logits, diag = model(toks, plan)
    batch = {"targets": toks, "mask": jnp.ones(toks.shape)}
    term, logs = halting_terms(diag, "X", circuit.halting, batch, jnp.asarray(3), (jnp.asarray(0), 10), 1.0)
    # the expected per-step cross-entropy under the exit distribution, by hand
    import optax
    ce = optax.softmax_cross_entropy_with_integer_labels(diag.step_logits, toks[None])
    want = float(jnp.sum(diag.circuits["X"].exit_p * ce))
    assert float(term) == pytest.approx(want, rel=1e-5) and set(logs) == {"halting_steps", "halting_entropy"}
    np.testing.assert_allclose(diag.circuits["X"].exit_p.sum(0), 1.0, atol=1e-5)


def test_no_position_scheme_ignores_positions_and_rope_does_not():
    toks = jnp.asarray(np.random.default_rng(2).integers(3, VOCAB, (1, 6)), jnp.int32)
    plan = make_plan(["X"], {"X": 2})
    shifted = jnp.arange(6)[None] + 17
    for position, same in (("none", True), ("rope", False)):
        model = small_model(f"model.position={position}")
        a, _ = model(toks, plan)
        b, _ = model(toks, plan, positions_BT=shifted)
        # rope is relative: a constant shift keeps the logits; a scaled one changes them
        c, _ = model(toks, plan, positions_BT=jnp.arange(6)[None] * 3)
        np.testing.assert_allclose(a, b, atol=1e-4)
        assert (float(jnp.abs(a - c).max()) < 1e-5) == same


def test_exit_rules_registered():
    assert EXITS.names()[:6] == ("latent_diff", "kl", "entropy_diff", "learned", "patience", "context_diff")
    assert isinstance(ExitRule.parse("latent_diff:0.1,min=2"), LatentDiff)


@pytest.mark.parametrize("name", ["bad name", "x:y", "", "a-b"])
def test_an_exit_rule_name_that_exit_cannot_read_is_refused(name):
    """#27 pass 16: register_exit took any name; one that is not a word was listed among the forms by
    `--exit`'s error and could never be parsed ("exit rule 'bad name:0.1' is not one of ..., bad name:EPS")."""
    from loopformer.variants.exits import EXITS, ExitRule, register_exit

    with pytest.raises(ValueError, match="give letters, digits and _ only"):
        @register_exit(name)
        class Rule(ExitRule):
            pass
    assert name not in EXITS.names()


def test_exit_rule_kinds_have_distinct_tree_structures():
    """Two rules of different kinds with the same settings must never share a compiled program: a plan's tree
    structure (the jit cache key) carries the kind. With JAX's dataclass registration it did not (the
    structures compared equal), and kl was once scored with latent_diff's stop rule."""
    kinds = [k for k in EXITS.names() if k != "learned"] + ["learned"]
    structures = [jax.tree.structure(exit_rule(k, 1.0, 2, 3)) for k in kinds]
    for i, a in enumerate(structures):
        for j, b in enumerate(structures):
            assert (a == b) == (i == j), (kinds[i], kinds[j])
    rule = exit_rule("kl", 0.5, 2, 3)
    leaves, tree = jax.tree.flatten(rule)
    assert leaves == [0.5] and jax.tree.unflatten(tree, leaves) == rule
    assert jax.tree.structure(exit_rule("kl", 0.5)) == jax.tree.structure(exit_rule("kl", 1e-3))  # one program

    calls = []

    @jax.jit
    def kind_of(rule, x):
        calls.append(type(rule).kind)
        return x + rule.threshold

    for k in kinds:
        kind_of(exit_rule(k, 1.0), jnp.zeros(()))
    assert calls == kinds  # each kind traced its own program


def test_extending_md_quotes_the_rules_as_they_are():
    """#27 pass 39: docs/extending.md shows patience and PonderNet as "all of it", but its patience lacked `whole` and
    `earliest` (added since) and PonderNet its `reads`: every line of its Python blocks is a line of the source."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    source = {line.strip() for f in ("exits.py", "halting.py")
              for line in (root / "loopformer" / "variants" / f).read_text().splitlines()}
    blocks = re.findall(r"```python\n(.*?)```", (root / "docs" / "extending.md").read_text(), re.S)
    assert blocks
    missing = [line for block in blocks for line in block.splitlines() if line.strip() not in source]
    assert not missing, missing
