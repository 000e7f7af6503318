"""`loopformer.surgery.export` without transformers: which models unroll, and the order of the layers."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from loopformer.config import load_config
from loopformer.errors import CheckpointError
from loopformer.model.transformer import build_model
from loopformer.surgery.convert import Recipe, converted_config
from loopformer.surgery.export import check_exportable, hf_config, hf_tensors, unrolled

PLAIN = ["model.stages=[]", "model.prelude=4", "model.coda=0", "model.mlp=swiglu", "model.norm=pre", "model.d_model=16",
         "model.heads=2"]


def plain():
    return load_config(None, PLAIN).model


def test_a_converted_model_unrolls_in_running_order():
    """prelude 1, circuit of layers 1-2, coda 1, at 3 loops: p0, c0, c1, c0, c1, c0, c1, k0 (attn norms tagged)."""
    cfg = converted_config(plain(), Recipe(core=(1, 3)))
    params = nnx.to_pure_dict(nnx.state(build_model(cfg, 40, 0)))
    params["prelude"]["attn_norm"]["scale"] = np.full((1, 16), 10.0)
    params["stages"][0]["circuits"]["X"]["blocks"]["attn_norm"]["scale"] = np.stack([np.full(16, 20.0), np.full(16, 21.0)])
    params["coda"]["attn_norm"]["scale"] = np.full((1, 16), 30.0)
    order = [float(layer["attn_norm/scale"][0]) for layer in unrolled(cfg, params, {"X": 3})]
    assert order == [10, 20, 21, 20, 21, 20, 21, 30]
    tensors = hf_tensors(cfg, params, {"X": 3})
    assert len({k.split(".")[2] for k in tensors if k.startswith("model.layers.")}) == 8
    qkv = np.asarray(params["prelude"]["attn"]["qkv"]["kernel"][0])  # [D, 3D]: q, k, v columns
    np.testing.assert_array_equal(tensors["model.layers.0.self_attn.k_proj.weight"], qkv[:, 16:32].T)


@pytest.mark.parametrize("change,why", [
    (dict(mlp="gelu"), "model.mlp is gelu"),
    (dict(norm="sandwich"), "model.norm is sandwich"),
    (dict(position="none"), "model.position is none"),
    (dict(window=4, qkv_bias=True), "model.window is 4 with q/k/v biases"),  # a window alone exports as Mistral
])
def test_what_does_not_unroll_is_one_line(change, why):
    with pytest.raises(CheckpointError, match=f"^cannot export: {why}"):
        check_exportable(dataclasses.replace(plain(), **change))


def test_circuits_that_inject_or_add_do_not_unroll():
    looped = converted_config(plain(), Recipe(core=(1, 3), inject="add"))
    with pytest.raises(CheckpointError, match=r"circuit X injects its input \(inject: add\)"):
        check_exportable(looped)
    check_exportable(converted_config(plain(), Recipe(core=(1, 3))))  # inject none, output replace: fine


def test_a_window_exports_as_mistral_when_its_circuits_share_it():
    windowed = converted_config(dataclasses.replace(plain(), window=4), Recipe(core=(1, 3)))
    check_exportable(windowed)  # convert gives the circuit the model's window
    spec = hf_config(windowed, 40, 8, None, 2048)
    assert (spec["model_type"], spec["architectures"], spec["sliding_window"]) == ("mistral", ["MistralForCausalLM"], 4)
    assert "sliding_window" not in hf_config(plain(), 40, 4, None, 2048)  # no window: Llama
    windowed.stages[0].circuits[0].window = 2
    with pytest.raises(CheckpointError, match=r"circuit X has its own attention window 2 \(the model's: 4\)"):
        check_exportable(windowed)
