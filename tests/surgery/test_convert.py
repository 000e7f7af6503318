"""A plain model converted into prelude + looped core + coda computes the plain model at 1 loop, and at n
loops the core block run n times (the RYS duplication); bad recipes are one clear error."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from loopformer.config import ModelConfig
from loopformer.errors import CheckpointError, ConfigError
from loopformer.model.plan import make_plan
from loopformer.model.schedule import duplication, padded
from loopformer.model.transformer import build_model
from loopformer.surgery.convert import Recipe, converted_config, converted_params, parse_layers, parse_range
from loopformer.surgery.hf import import_folder
from tests.model.test_model import randomize_writes, tokens

PLAIN = ModelConfig(d_model=32, heads=4, kv_heads=2, qkv_bias=True, prelude=5, coda=1, stages=[], mlp="swiglu",
                    norm_eps=1e-5, window=3)


@pytest.fixture(scope="module")
def source():
    model = randomize_writes(build_model(PLAIN, 17, 0))
    return model, nnx.to_pure_dict(nnx.state(model))


def run(cfg, params, toks, loops=None, schedules=None):
    model = nnx.eval_shape(lambda: build_model(cfg, 17, 0))
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    names = list(model.circuit_names)
    plan = make_plan(names, loops or {n: 1 for n in names}, schedules=schedules)
    return np.asarray(nnx.jit(lambda m, t, p: m(t, p)[0])(model, toks, plan))


@pytest.mark.parametrize("inject", ["none", "add", "concat"])
def test_one_loop_is_the_plain_model(source, inject):
    _, params = source
    toks = tokens()
    cfg, new = converted_params(PLAIN, params, Recipe(core=(2, 4), inject=inject))
    c = cfg.circuits()[0]
    assert (cfg.prelude, cfg.coda, c.depth, c.width, c.output, c.kv_heads) == (2, 2, 2, 32, "replace", 2)
    np.testing.assert_allclose(run(cfg, new, toks), run(PLAIN, params, toks), atol=2e-5)


@pytest.mark.parametrize("inject", ["none", "concat"])
def test_n_loops_run_the_core_block_n_times(source, inject):
    _, params = source
    toks = tokens()
    cfg, new = converted_params(PLAIN, params, Recipe(core=(1, 4), inject=inject))
    for n in (2, 3):
        order = padded(duplication(5, 1, 4, n - 1), 12)  # the coda (layer 5) runs after the prelude
        np.testing.assert_allclose(run(cfg, new, toks, {"X": n}),
                                   run(dataclasses.replace(PLAIN), params, toks, schedules={"prelude": order}),
                                   atol=5e-5)


def test_a_converted_model_decodes_with_the_cache(source):
    """Cached greedy decoding of the converted model (a replace circuit) = recomputing the prefix."""
    from loopformer.inference.decode import decoder_for
    from loopformer.inference.generate import generate_batch, logits_fn

    _, params = source
    cfg, new = converted_params(PLAIN, params, Recipe(core=(2, 4), inject="concat"))
    model = nnx.eval_shape(lambda: build_model(cfg, 17, 0))
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, new)
    nnx.update(model, state)
    prompts = [[1, 5, 9, 3], [2, 7]]
    for n in (1, 3):
        ref = generate_batch(logits_fn(model), nnx.state(model), prompts, {"X": n}, 6)
        out = decoder_for(model)(nnx.state(model), prompts, {"X": n}, 6)
        assert out.tokens.tolist() == ref


def test_dropped_layers_are_removed(source):
    _, params = source
    cfg, new = converted_params(PLAIN, params, Recipe(core=(3, 5), drop=parse_layers(["1:3"])))
    assert (cfg.prelude, cfg.coda) == (1, 1)
    np.testing.assert_array_equal(new["prelude"]["attn"]["qkv"]["kernel"][0], params["prelude"]["attn"]["qkv"]["kernel"][0])
    np.testing.assert_array_equal(new["coda"]["mlp"]["up"]["kernel"][0], params["coda"]["mlp"]["up"]["kernel"][0])


@pytest.mark.parametrize("recipe,message", [
    (Recipe(core=(4, 9)), "not inside the model's 6 layers"),
    (Recipe(core=(1, 3), drop=frozenset({2})), "is in the core"),
    (Recipe(core=(1, 3), inject="gate"), "choose none, add or concat"),
])
def test_bad_recipes(recipe, message):
    with pytest.raises(ConfigError, match=message):
        converted_config(PLAIN, recipe)


def test_only_plain_models_convert():
    with pytest.raises(ConfigError, match="plain model"):
        converted_config(ModelConfig(), Recipe(core=(0, 1)))


def test_parsing():
    assert parse_range("2:4", "--core") == (2, 4)
    assert parse_layers(["4:6", "9,11"]) == {4, 5, 9, 11}
    with pytest.raises(ConfigError, match="START < END"):
        parse_range("4:2", "--core")
    # #27 pass 42: another script's digits read as layers (`--core ٣:٤` was layers 3 to 4, `--drop ٢` layer 2)
    with pytest.raises(ConfigError, match=r"^--core \u0663:\u0664: '\u0663' is a digit of another script \(U\+0663\)"):
        parse_range("\u0663:\u0664", "--core")
    with pytest.raises(ConfigError, match=r"^--drop 1,\uff15: '\uff15' is a digit of another script \(U\+FF15\)"):
        parse_layers(["1,\uff15"])
    # #27 pass 20: a layer named twice was merged with no word, where every other list flag refuses a repeat
    for items, layer in ((["3,3"], 3), (["0:3", "2"], 2), (["4:6,5:7"], 5)):
        with pytest.raises(ConfigError, match=rf"^--drop .* names layer {layer} twice; give each layer once$"):
            parse_layers(items)


def test_a_folder_without_weights_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="safetensors"):
        import_folder(tmp_path)
    with pytest.raises(CheckpointError, match=r"nope does not exist \(point it at a local Hugging Face model folder"):
        import_folder(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"config.json is a file, not a folder \(point it at the folder that "
                       r"holds it, "):  # #27 pass 19: it was "no such directory"
        import_folder(tmp_path / "config.json")
    (tmp_path / "link").symlink_to(tmp_path / "gone")  # #27 pass 25: it is there; it was "no such directory"
    with pytest.raises(CheckpointError, match=r"link is a symlink that leads nowhere \(or in a loop\) \(point it at"):
        import_folder(tmp_path / "link")
