"""Position schemes: abacus places against a reference loop, the random offset as a shift of the place
table, coupled RoPE as RoPE over the places, cached decoding of abacus and coupled models against
recomputing, and the config's checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from loopformer.config import load_config
from loopformer.data.sources import build_data
from loopformer.errors import ConfigError, DecodingError
from loopformer.model.plan import make_plan
from loopformer.model.transformer import build_model
from loopformer.runs.restore import make_model
from loopformer.variants.cache import CachePolicy
from loopformer.variants.position import digit_places
from tests.inference.test_decode import _prefill_then_steps, _reference
from tests.model.test_model import randomize_writes
from tests.variants.test_variants import SMALL, VOCAB, small_model

DIGITS = (10, 19)


def _reference_places(tokens, lo, hi, positions=None, carry=None):
    """p_t = p_{t-1} + 1 on a digit, else 0 (the scan digit_places has in closed form)."""
    out = np.zeros(tokens.shape, np.int32)
    for b, row in enumerate(tokens):
        p = 0 if carry is None else int(carry[b])
        for t, tok in enumerate(row):
            p = p + 1 if lo <= tok <= hi else 0
            if positions is not None:
                p = min(p, int(positions[b, t]) + 1)
            out[b, t] = p
    return out


def test_digit_places_equal_the_running_count():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 25, (6, 30)).astype(np.int32)  # about half digits: runs of every length
    carry = rng.integers(0, 4, 6).astype(np.int32)
    positions = np.concatenate([np.arange(12), np.arange(18)])[None].repeat(6, 0)  # two packed documents
    np.testing.assert_array_equal(digit_places(jnp.asarray(tokens), DIGITS), _reference_places(tokens, *DIGITS))
    np.testing.assert_array_equal(digit_places(jnp.asarray(tokens), DIGITS, carry_B=jnp.asarray(carry)),
                                  _reference_places(tokens, *DIGITS, carry=carry))
    np.testing.assert_array_equal(digit_places(jnp.asarray(tokens), DIGITS, jnp.asarray(positions)),
                                  _reference_places(tokens, *DIGITS, positions))
    # "12+345": 1 2 . 1 2 3
    assert digit_places(jnp.asarray([[11, 12, 3, 13, 14, 15]]), DIGITS).tolist() == [[1, 2, 0, 1, 2, 3]]


@nnx.jit
def _forward(model, toks, plan, positions=None):
    """The model's logits, compiled: one program per model structure (the eager forward is slow)."""
    return model(toks, plan, positions_BT=positions)[0]


def _abacus(*extra):
    return small_model("model.position=abacus", f"model.abacus_digits=[{DIGITS[0]}, {DIGITS[1]}]",
                       "model.abacus_size=24", *extra)


def test_abacus_adds_each_digits_place_and_ignores_positions():
    model = _abacus()
    toks = jnp.asarray([[1, 11, 12, 13, 3, 14, 15, 2]], jnp.int32)
    plan = make_plan(["X"], {"X": 2})
    a = _forward(model, toks, plan)
    b = _forward(model, toks, plan, jnp.arange(8)[None] + 17)  # NoPE attention: a shift changes nothing
    np.testing.assert_allclose(a, b, atol=1e-5)
    # the place embedding is what reads the digits' places: zero it and a digit's place no longer matters
    moved = jnp.asarray([[1, 11, 12, 3, 13, 14, 15, 2]], jnp.int32)
    assert float(jnp.abs(_forward(model, moved, plan)[0, -1] - a[0, -1]).max()) > 1e-4
    model.abacus.embedding.value = jnp.zeros_like(model.abacus.embedding.value)
    np.testing.assert_allclose(_forward(model, toks, plan), _forward(small_model("model.position=none"), toks, plan),
                               atol=1e-5)


def test_coupled_is_rope_over_each_tokens_digit_place():
    """A coupled model computes what the same weights under RoPE compute when given the digit places as
    positions (the causal mask still follows the sequence), so the sequence positions change nothing and a
    number's digits attend to each other by place, wherever the number stands."""
    coupled = small_model("model.position=coupled", f"model.abacus_digits=[{DIGITS[0]}, {DIGITS[1]}]")
    rope = small_model()
    nnx.update(rope, nnx.state(coupled))
    toks = jnp.asarray([[1, 11, 12, 13, 3, 14, 15, 2, 16, 17, 18, 19], [5, 6, 10, 10, 10, 10, 10, 4, 11, 3, 2, 12]],
                       jnp.int32)
    plan = make_plan(["X"], {"X": 2})
    got = _forward(coupled, toks, plan)
    np.testing.assert_allclose(got, _forward(rope, toks, plan, digit_places(toks, DIGITS)), atol=1e-5)
    np.testing.assert_allclose(got, _forward(coupled, toks, plan, jnp.arange(12)[None].repeat(2, 0) + 17), atol=1e-5)
    assert float(jnp.abs(got - _forward(rope, toks, plan)).max()) > 1e-3  # the sequence's RoPE differs


def test_training_offset_shifts_every_rows_places_by_one_draw():
    """With position_offset K each row runs as the offset-free model whose place table is moved down by
    one o in 0..K (place p reads row p + o); rows draw different offsets; K = 0 adds nothing."""
    K = 3
    model = _abacus()
    rng = np.random.default_rng(1)
    toks = jnp.asarray(rng.integers(1, 22, (8, 10)), jnp.int32)
    key = jax.random.key(3)
    got = _forward(model, toks, make_plan(["X"], {"X": 2}, key=key, position_offset=K))
    np.testing.assert_array_equal(_forward(model, toks, make_plan(["X"], {"X": 2}, key=key, position_offset=0)),
                                  _forward(model, toks, make_plan(["X"], {"X": 2})))
    table = model.abacus.embedding.value
    found = []
    for o in range(K + 1):
        moved = _abacus()
        nnx.update(moved, nnx.state(model))
        moved.abacus.embedding.value = jnp.concatenate([table[o:], jnp.zeros((o, table.shape[1]))])
        want = _forward(moved, toks, make_plan(["X"], {"X": 2}))
        found.append(np.abs(np.asarray(got) - np.asarray(want)).max(axis=(1, 2)) < 1e-5)
    found = np.array(found)  # [K + 1, B]
    assert (found.sum(0) >= 1).all()  # every row is one of the shifts
    assert len({int(np.argmax(f)) for f in found.T}) > 1  # and not all rows draw the same


@pytest.mark.parametrize("scheme", [["model.position=abacus", "model.abacus_size=40"], ["model.position=coupled"]],
                         ids=["abacus", "coupled"])
def test_cached_decoding_of_a_place_reading_model_equals_recomputing(scheme):
    cfg = load_config("configs/text_bytes.yaml", [
        "model.d_model=32", "model.heads=2", "model.prelude=1", "model.coda=1", *scheme,
        f"model.abacus_digits=[{DIGITS[0]}, {DIGITS[1]}]",
        "model.stages.0.circuits.X.width=32", "model.stages.0.circuits.X.heads=2"])
    model = randomize_writes(build_model(cfg.model, VOCAB, 0))
    rng = np.random.default_rng(0)
    # digit runs that cross the prefill / step boundary (prefill covers 8 positions)
    tokens = jnp.asarray(np.where(rng.random((2, 24)) < 0.7, rng.integers(10, 20, (2, 24)),
                                  rng.integers(3, 10, (2, 24))), jnp.int32)
    lengths = jnp.asarray([6, 3])
    got = _prefill_then_steps(nnx.graphdef(model), nnx.state(model), tokens, lengths, make_plan(["X"], {"X": 3}),
                              CachePolicy.parse("full"))
    want = _reference(model, tokens, lengths, {"X": 3})
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def _numbers(lengths, rng):
    """BOS n_1 PLUS n_2 EQ n_3 (digits DIGITS, least significant first) with numbers of ``lengths``, and the
    numbers' digits (to write the same low places into longer numbers)."""
    nums = [rng.integers(DIGITS[0], DIGITS[1] + 1, n) for n in lengths]
    return nums, lambda nums: jnp.asarray([[1, *nums[0], 3, *nums[1], 4, *nums[2]]], jnp.int32)


def test_place_window_keeps_each_token_to_the_places_its_layers_reach():
    """With model.place_window W a token attends only to tokens at most W digit places from its own, so after L
    attention layers its output depends on places within L * W of it (non-digits sit at place 0): writing the
    numbers 8 digits longer, or changing their digits past place 8, leaves every token at places 0..4 as it was
    (4 layers: prelude, X's 2 blocks once, coda; W = 1), and without the window both change them."""
    rng = np.random.default_rng(0)
    nums, seq = _numbers([12, 12, 12], rng)
    longer = [np.concatenate([n, rng.integers(DIGITS[0], DIGITS[1] + 1, 8)]) for n in nums]
    changed = [np.concatenate([n[:8], rng.integers(DIGITS[0], DIGITS[1] + 1, 4)]) for n in nums]
    plan = make_plan(["X"], {"X": 1})
    for window, same in ((1, True), (0, False)):
        model = small_model("model.position=coupled", f"model.abacus_digits=[{DIGITS[0]}, {DIGITS[1]}]",
                            f"model.place_window={window}")
        base = _forward(model, seq(nums), plan)[0]
        places = np.asarray(digit_places(seq(nums), DIGITS))[0]
        near = np.flatnonzero(places <= 4)
        for other in (longer, changed):
            toks = seq(other)
            far_places = np.asarray(digit_places(toks, DIGITS))[0]
            got = _forward(model, toks, plan)[0]
            # the same token at the same place: its index in the longer sequence moves by 8 per number before it
            at = [int(np.flatnonzero((far_places == places[t]) & (np.cumsum(np.isin(np.asarray(toks[0]), [1, 3, 4]))
                                                                  == np.cumsum(np.isin(np.asarray(seq(nums)[0]),
                                                                                       [1, 3, 4]))[t]))[0])
                  for t in near]
            diff = float(jnp.abs(got[jnp.asarray(at)] - base[near]).max())
            assert (diff < 1e-5) if same else (diff > 1e-3), (window, diff)


def test_cached_decoding_refuses_a_place_window_in_one_line():
    """A cache holds earlier tokens' keys by sequence position, not their places: decoding says so and names
    the recompute path once (the command line adds it: it was said twice), before tracing anything."""
    model = small_model("model.position=coupled", f"model.abacus_digits=[{DIGITS[0]}, {DIGITS[1]}]",
                        "model.place_window=1")
    with pytest.raises(DecodingError, match=r"model\.place_window=1 compares$"):
        model.check_decoding(make_plan(["X"], {"X": 2}))


@pytest.mark.parametrize("overrides,message", [
    (["model.place_window=2"], "model.place_window=2 compares digit places, which only model.position=abacus or "
                               "coupled reads"),
    (["model.position=coupled", "model.place_window=-1"], "model.place_window must be 0"),
    (["model.position_offset=4"], "model.position_offset=4 only moves abacus places: model.position=rope is "
                                  "shift-invariant"),
    (["model.abacus_digits=[3, 12]"], "model.abacus_digits=[3, 12] is read only by model.position=abacus or coupled"),
    (["model.position=coupled", "model.position_offset=4"], "model.position_offset=4 only moves abacus places: "
                                                            "model.position=coupled rotates by digit places"),
    (["model.position=coupled", "model.abacus_size=40"], "model.abacus_size=40 is read only by model.position=abacus"),
    (["model.position=abacus", "model.abacus_digits=[5]"], "model.abacus_digits must be [lo, hi]"),
    (["model.position=abacus", "model.abacus_size=8", "model.position_offset=7"],
     "model.position_offset must be an integer in 0 .. abacus_size - 2 = 6"),
])
def test_bad_position_settings_get_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        load_config("configs/text_bytes.yaml", overrides)


def _task_cfg(task, *extra):
    return load_config("configs/quickstart.yaml", [f"data.task={task}", "data.train_difficulty=[1, 8]",
                                                   "data.eval_splits={train: [1, 8], 2x: [16, 16]}",
                                                   "model.stages.0.circuits.X.loops=uniform(2, 4)",
                                                   "model.position=abacus", *extra])


def test_abacus_takes_the_datas_digits_and_checks_the_table_holds_its_places():
    cfg = _task_cfg("addition", "model.causal=true")
    assert make_model(cfg, build_data(cfg)).digits == (4, 13)
    cfg = _task_cfg("prefix_parity")
    assert make_model(cfg, build_data(cfg)).digits == (3, 4)
    # addition's 2x split reaches place 17 (16 digits and the carry); with an offset of 8 that needs 26 rows
    cfg = _task_cfg("addition", "model.causal=true", "model.abacus_size=25", "model.position_offset=8")
    with pytest.raises(ConfigError, match=r"model.abacus_size=25 holds places up to 24, but the data's numbers reach "
                                          r"place 17 \(\+ position_offset 8 in training\); raise model.abacus_size to "
                                          r">= 26"):
        make_model(cfg, build_data(cfg))
    cfg = _task_cfg("maze", "data.task_args={rows: 2}")
    with pytest.raises(ConfigError, match=r"model.position=abacus: the data \(maze\) has no digit tokens"):
        make_model(cfg, build_data(cfg))
    cfg = load_config("configs/text_bytes.yaml", ["model.position=abacus", *SMALL])
    assert make_model(cfg, build_data(cfg)).digits == (3 + ord("0"), 3 + ord("9"))
    # coupled reads the same digits, and has no place table to fill (any length of number)
    cfg = _task_cfg("addition", "model.causal=true", "model.position=coupled")
    assert make_model(cfg, build_data(cfg)).digits == (4, 13)
    cfg = _task_cfg("maze", "data.task_args={rows: 2}", "model.position=coupled")
    with pytest.raises(ConfigError, match=r"model.position=coupled: the data \(maze\) has no digit tokens"):
        make_model(cfg, build_data(cfg))
