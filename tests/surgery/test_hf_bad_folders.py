"""`loopformer import` on broken Hugging Face folders (written here with numpy and safetensors, no torch):
each gets one line naming the field or tensor (issue #27), and a good folder still imports."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from loopformer.cli import main
from loopformer.data.tokenizers import train_bpe
from loopformer.errors import CheckpointError
from loopformer.surgery.hf import import_folder, stop_ids

D, F, LAYERS, HEADS = 16, 32, 2, 2


def write_folder(folder: Path, vocab: int = 300, layers: int = LAYERS, config: dict | None = None,
                 tensors: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    """A tiny Llama folder: config.json, model.safetensors (random weights), a byte-level BPE tokenizer.json."""
    folder.mkdir(parents=True)
    spec = {"model_type": "llama", "hidden_size": D, "intermediate_size": F, "num_hidden_layers": layers,
            "num_attention_heads": HEADS, "vocab_size": vocab, "tie_word_embeddings": True} | (config or {})
    (folder / "config.json").write_text(json.dumps(spec))
    rng = np.random.default_rng(0)
    w = {"model.embed_tokens.weight": (vocab, D), "model.norm.weight": (D,)}
    for i in range(LAYERS if layers < 1 else layers):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
              p + "self_attn.q_proj.weight": (D, D), p + "self_attn.k_proj.weight": (D, D),
              p + "self_attn.v_proj.weight": (D, D), p + "self_attn.o_proj.weight": (D, D),
              p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D), p + "mlp.down_proj.weight": (D, F)}
    arrays = {k: rng.normal(size=s).astype(np.float32) for k, s in w.items() if k not in drop} | (tensors or {})
    save_file(arrays, str(folder / "model.safetensors"))
    text = "In the beginning God created the heaven and the earth. " * 40
    (folder / "tokenizer.json").write_text(train_bpe([text], 280).to_str())
    return folder


def test_a_good_numpy_folder_imports(tmp_path):
    cfg, params, _ = import_folder(write_folder(tmp_path / "good"))
    assert cfg.prelude == LAYERS and params["prelude"]["attn"]["qkv"]["kernel"].shape == (LAYERS, D, 3 * D)


L1 = "model.layers.1."


@pytest.mark.parametrize("kwargs,message", [
    (dict(config={"num_hidden_layers": 0}), r"config.json: num_hidden_layers must be >= 1, got 0"),
    (dict(tensors={L1 + "mlp.down_proj.weight": np.zeros((32, 50), np.float32)}),
     r"tensor layers.1.mlp.down_proj.weight has another shape: \[32, 50\], where config.json implies \[16, 32\]"),
    (dict(tensors={L1 + "mlp.down_proj.weight": np.zeros((F, D), np.float32)}),
     r"tensor layers.1.mlp.down_proj.weight is stored transposed: \[32, 16\], where config.json implies \[16, 32\]"),
    (dict(config={"num_hidden_layers": 1}),
     r"9 tensor\(s\) that config.json leaves unused \(layers.1.input_layernorm.weight, .*; it says 1 layers\)"),
    (dict(drop=(L1 + "self_attn.k_proj.weight",)), r"tensor layers.1.self_attn.k_proj.weight is missing"),
    (dict(vocab=200), r"tokenizer.json has token ids up to 279, but the model's vocabulary .* is 200"),
    # issue 27, pass 11: a field of another type was a traceback (float("abc")) or read wrongly (bool("false") is
    # true: tied embeddings), and rope_theta 0 became 10000
    (dict(config={"rope_theta": "abc"}), r"config.json: rope_theta must be a finite number, got 'abc'$"),
    (dict(config={"rms_norm_eps": [1]}), r"config.json: rms_norm_eps must be a finite number, got \[1\]$"),
    (dict(config={"tie_word_embeddings": "false"}), r"tie_word_embeddings must be true or false, got 'false'$"),
    (dict(config={"num_key_value_heads": "2"}), r"num_key_value_heads must be a whole number, got '2'$"),
    (dict(config={"hidden_size": 16.5}), r"hidden_size must be a whole number, got 16.5$"),
    (dict(config={"rope_theta": 0}), r"config.json: model.rope_base must be a finite number > 1, got 0.0$"),
])
def test_a_broken_folder_is_one_line(tmp_path, kwargs, message):
    folder = write_folder(tmp_path / "bad", **kwargs)
    with pytest.raises(CheckpointError, match=message):
        import_folder(folder)


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
def test_a_json_file_nested_too_deeply_is_one_line(tmp_path, name):
    """#27 pass 24: a config.json (or generation_config.json) nested past Python's recursion limit was a RecursionError
    traceback; it is malformed JSON like any other (`loopformer.jsontext`)."""
    folder = write_folder(tmp_path / "bad")
    (folder / name).write_text("[" * 100000)
    with pytest.raises(CheckpointError, match=rf"{name} is not valid JSON \(nested too deeply"):
        import_folder(folder) if name == "config.json" else stop_ids(folder, 300)


def test_a_tensor_in_two_safetensors_files_is_one_line(tmp_path):
    """#27 pass 14: a stale safetensors file beside the real one (another save, zeroed weights here) was read too,
    and whichever file sorted last gave the tensor: the import was silently another model's."""
    folder = write_folder(tmp_path / "two")
    save_file({"model.norm.weight": np.zeros(D, np.float32)}, str(folder / "zz-old.safetensors"))
    with pytest.raises(CheckpointError, match=r"zz-old.safetensors and .*/model.safetensors both hold tensor "
                                              r"model.norm.weight: one of them is from another save; move it out"):
        import_folder(folder)


def test_the_command_says_it_in_one_line_and_writes_nothing(tmp_path, capsys):
    folder = write_folder(tmp_path / "bad", config={"num_hidden_layers": 1})
    assert main(["import", "--hf", str(folder), "--out", str(tmp_path / "run")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "leaves unused" in line and not (tmp_path / "run").exists()
    assert main(["import", "--hf", str(folder), "--out", ""]) == 2
    assert "--out '': name the new run's directory" in capsys.readouterr().err


def test_generation_config_stop_ids_reach_the_run_and_bad_ones_are_one_line(tmp_path, capsys):
    """generation_config.json's eos_token_id (a list, as Llama 3 instruct models ship it) becomes the run's
    data.stop_ids, which `generate` ends rows at; ids outside the vocabulary are refused at import."""
    folder = write_folder(tmp_path / "good")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7, 5]}))
    assert main(["import", "--hf", str(folder), "--out", str(tmp_path / "run"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stop_ids"] == [5, 7]
    assert "stop_ids:\n  - 5\n  - 7" in (tmp_path / "run" / "config.yaml").read_text()
    assert main(["generate", "--run", str(tmp_path / "run"), "--prompt", "In the", "--max-new-tokens", "4",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stop_ids"] == [5, 7]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 300}))
    assert main(["import", "--hf", str(folder), "--out", str(tmp_path / "run2")]) == 2
    assert "generation_config.json: eos_token_id 300 must be token ids in 0..299" in capsys.readouterr().err
    # an override past the vocabulary wrote a run that generate refused (#27 pass 7); one within it is reported
    (folder / "generation_config.json").unlink()
    assert main(["import", "--hf", str(folder), "--out", str(tmp_path / "run3"), "data.stop_ids=[5000]"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"error: data.stop_ids [5000] are not token ids of {folder}'s model (vocabulary 300); give ids "
                    f"below 300, or drop data.stop_ids (the folder's generation_config.json sets them)")
    assert not (tmp_path / "run3").exists()
    assert main(["import", "--hf", str(folder), "--out", str(tmp_path / "run4"), "data.stop_ids=[9]", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stop_ids"] == [9]
