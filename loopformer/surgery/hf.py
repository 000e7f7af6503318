"""Llama-family weights from a local Hugging Face folder (no download, no torch): ``config.json``, the
``*.safetensors`` files (read with `safetensors`, numpy) and ``tokenizer.json``.

Supported layouts: ``llama``, ``qwen2`` and ``mistral`` (model_type in config.json): RMSNorm with the
checkpoint's ``rms_norm_eps``, RoPE (rotate-half, frequencies theta^(-2i/H)) with its ``rope_theta``,
SwiGLU MLP, grouped-query attention, q/k/v biases (Qwen2), tied or untied output head. The model becomes
a plain loopformer model (every layer in the prelude, ``model.stages: []``):

    model.embed_tokens.weight [V, D]                 -> embed/embedding
    model.layers.i.input_layernorm.weight            -> prelude/attn_norm/scale [i]
    self_attn.{q,k,v}_proj.weight [out, D] (+ bias)  -> prelude/attn/qkv/kernel [i] = [q; k; v]^T (and bias)
    self_attn.o_proj.weight                          -> prelude/attn/out/kernel [i] (transposed)
    model.layers.i.post_attention_layernorm.weight   -> prelude/mlp_norm/scale [i]
    mlp.gate_proj, mlp.up_proj [F, D]                -> prelude/mlp/up/kernel [i] = [gate; up]^T
    mlp.down_proj [D, F]                             -> prelude/mlp/down/kernel [i] (transposed)
    model.norm.weight                                -> final_norm/scale
    lm_head.weight [V, D] (absent when tied)         -> head/kernel (transposed), or tied to the embedding

RoPE scaling ``linear`` and ``llama3`` become ``model.rope_scaling``. What the layout cannot express (dynamic
rope scaling, a head_dim other than hidden / heads, o_proj or MLP biases,
an activation other than SiLU, Qwen2's per-layer sliding windows) is refused with one line.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from loopformer import jsontext
from loopformer.config.schema import ModelConfig
from loopformer.errors import CheckpointError, ConfigError
from loopformer.model.transformer import build_model
from loopformer.runs.layout import not_a_file, unreadable
from loopformer.surgery.naming import fill
from loopformer.variants.position import ROPE_SCALINGS, RopeScaling

MODEL_TYPES = ("llama", "qwen2", "mistral")
CONFIG, TOKENIZER, GENERATION = "config.json", "tokenizer.json", "generation_config.json"


def read_config(folder: str | Path) -> dict[str, Any]:
    """The folder's config.json, checked for the files an import needs."""
    if not str(folder).strip():  # Path('') is the current directory: "--hf .: ... missing" named no input
        raise CheckpointError("--hf '': name a local Hugging Face model folder (config.json, *.safetensors, "
                              "tokenizer.json)")
    folder = Path(folder)
    if not os.path.isdir(folder):  # (a file, e.g. the folder's config.json, and a dangling link were "no such directory")
        what = not_a_file(folder)  # runs.layout's one wording (#27 pass 25)
        what = (f"{what} (point it at a local Hugging Face model folder" if what else
                f"is a file, not a folder (point it at the folder that holds it, {folder.parent}")
        raise CheckpointError(f"--hf {folder} {what} with config.json, *.safetensors and tokenizer.json)")
    if not os.access(folder, os.R_OK | os.X_OK):  # its files' checks were a PermissionError traceback
        raise CheckpointError(f"--hf {folder}: this user may not read the folder; make it readable (chmod -R u+rX "
                              f"{shlex.quote(str(folder))})")
    missing = [n for n in (CONFIG, TOKENIZER) if not (folder / n).is_file()]
    if not list(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise CheckpointError(f"--hf {folder}: {', '.join(missing)} missing (a Llama / Qwen2 / Mistral folder saved "
                              f"with save_pretrained(..., safe_serialization=True) has them)")
    hidden = unreadable(folder / CONFIG, folder / TOKENIZER, *folder.glob("*.safetensors"))
    if hidden:  # config.json was a traceback, a safetensors file "No such file or directory"
        raise CheckpointError(f"--hf {folder}: this user may not read {hidden.name}; make it readable (chmod -R u+rX "
                              f"{shlex.quote(str(folder))})")
    try:
        spec = jsontext.loads((folder / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{folder / CONFIG} is not valid JSON ({e})") from None
    if not isinstance(spec, dict):
        raise CheckpointError(f"{folder / CONFIG} is not a JSON object")
    return spec


def max_positions(spec: dict[str, Any]) -> int | None:
    """config.json's ``max_position_embeddings`` (the longest sequence the model was trained for), or None."""
    n = spec.get("max_position_embeddings")
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else None


def check_seq_len(spec: dict[str, Any], seq_len: int, where: str | Path) -> None:
    """ConfigError for a ``data.seq_len`` past the folder's ``max_position_embeddings``: positions the model never
    saw, whose attention can also run far past the memory (a run's later commands would fail on it)."""
    most = max_positions(spec)
    if most is not None and seq_len > most:
        raise ConfigError(f"data.seq_len={seq_len} is above max_position_embeddings {most} of {where}: the model "
                          f"was not trained on longer sequences; pass data.seq_len={most} or less")


def stop_ids(folder: str | Path, vocab: int) -> list[int]:
    """The token ids generation ends at: generation_config.json's ``eos_token_id`` (one id or a list, e.g. Llama
    3's end-of-text, end-of-message and end-of-turn); [] without the file or the key. Checked against ``vocab``."""
    path = Path(folder) / GENERATION
    if not path.is_file():
        return []
    try:
        spec = jsontext.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); fix or remove it") from None
    ids = spec.get("eos_token_id") if isinstance(spec, dict) else None
    ids = [] if ids is None else ids if isinstance(ids, list) else [ids]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids):
        raise CheckpointError(f"{path}: eos_token_id {spec.get('eos_token_id')!r} must be token ids in 0..{vocab - 1}; "
                              f"fix or remove it")
    return list(dict.fromkeys(ids))


def _field(spec: dict[str, Any], key: str, kind: type, default: Any, where: Path) -> Any:
    """config.json's ``key`` as ``kind`` (int: a whole number, float: a number, bool: true or false); ``default``
    when it is absent or null. CheckpointError for another type: `int("2")`, `float([1])` or `bool("false")`
    (true) would read it wrongly, or fail as a traceback."""
    value = spec.get(key)
    if value is None:
        return default
    if kind is bool:
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
            kind is float or float(value).is_integer())
    if not ok:
        want = {bool: "true or false", int: "a whole number", float: "a finite number"}[kind]
        raise CheckpointError(f"{where}: {key} must be {want}, got {value!r}")
    return kind(value)


def _rope(spec: dict[str, Any], where: Path) -> tuple[float, dict[str, Any]]:
    """(theta, model.rope_scaling) of a config.json: plain RoPE, or linear / llama3 scaling (`RopeScaling`)."""
    params = spec.get("rope_parameters") or {}
    scaling = spec.get("rope_scaling") or ({} if params.get("rope_type", "default") == "default" else params)
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    theta = 10000.0
    for source, key in ((spec, "rope_theta"), (params, "rope_parameters.rope_theta"),
                        (scaling, "rope_scaling.rope_theta")):
        if source.get("rope_theta") is not None:  # the first one given (0 included: it is refused, not replaced)
            theta = _field({key: source["rope_theta"]}, key, float, None, where)
            break
    if kind in (None, "default"):
        return theta, {}
    if kind == "dynamic":
        raise CheckpointError(f"{where}: rope scaling 'dynamic' is not supported: its frequencies change with the "
                              f"sequence length, so keys already in a decoding cache would no longer match (use a "
                              f"config with linear or llama3 scaling, or none)")
    if kind not in ROPE_SCALINGS:
        raise CheckpointError(f"{where}: rope scaling '{kind}' is not supported (plain, {', '.join(ROPE_SCALINGS)})")
    out = {"kind": kind, "factor": scaling.get("factor")}
    if kind == "llama3":
        out |= {"low_freq_factor": scaling.get("low_freq_factor"), "high_freq_factor": scaling.get("high_freq_factor"),
                "original_max": scaling.get("original_max_position_embeddings")}
    try:
        RopeScaling.of(out, "rope_scaling")
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return theta, out


def model_config(spec: dict[str, Any], where: str | Path = CONFIG) -> ModelConfig:
    """The plain loopformer model of a Hugging Face config.json (dict)."""
    where = Path(where)
    kind = spec.get("model_type")
    if kind not in MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type '{kind}' is not one of {', '.join(MODEL_TYPES)}")
    required = [_field(spec, key, int, None, where) for key in ("hidden_size", "num_attention_heads",
                                                              "num_hidden_layers", "intermediate_size", "vocab_size")]
    d, heads, layers, hidden, vocab = required
    for name, value in (("hidden_size", d), ("num_attention_heads", heads), ("num_hidden_layers", layers),
                        ("intermediate_size", hidden), ("vocab_size", vocab)):
        if value is None:
            raise CheckpointError(f"{where}: missing field '{name}'")
        if value < 1:
            raise CheckpointError(f"{where}: {name} must be >= 1, got {value}")
    kv = _field(spec, "num_key_value_heads", int, None, where) or heads
    head_dim = _field(spec, "head_dim", int, None, where)
    if head_dim is not None and head_dim * heads != d:
        raise CheckpointError(f"{where}: head_dim {head_dim} x {heads} heads != hidden_size {d} (not supported)")
    if spec.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act '{spec.get('hidden_act')}' is not supported (SwiGLU with SiLU only)")
    if _field(spec, "mlp_bias", bool, False, where) or (kind == "llama" and _field(spec, "attention_bias", bool, False,
                                                                                  where)):
        raise CheckpointError(f"{where}: biases on o_proj or the MLP (attention_bias / mlp_bias) are not supported")
    window = 0
    if kind == "qwen2" and _field(spec, "use_sliding_window", bool, False, where):
        raise CheckpointError(f"{where}: use_sliding_window (per-layer windows) is not supported")
    if kind == "mistral":
        window = _field(spec, "sliding_window", int, 0, where)
    theta, rope_scaling = _rope(spec, where)
    cfg = ModelConfig(vocab_size=vocab, d_model=d, heads=heads, kv_heads=0 if kv == heads else kv,
                      qkv_bias=kind == "qwen2", mlp_ratio=hidden / d, mlp="swiglu", norm="pre", prelude=layers, coda=0,
                      stages=[], tie_embeddings=_field(spec, "tie_word_embeddings", bool, False, where), window=window,
                      rope_base=theta, rope_scaling=rope_scaling,
                      norm_eps=_field(spec, "rms_norm_eps", float, 1e-6, where))
    if cfg.mlp_hidden != hidden:
        raise CheckpointError(f"{where}: intermediate_size {hidden} is not round(mlp_ratio * hidden_size)")
    try:
        cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return cfg


def read_tensors(folder: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder's *.safetensors files, as numpy (bf16 via ml_dtypes)."""
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    source: dict[str, Path] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="numpy") as f:
                names = list(f.keys())
                for name in names:
                    out[name] = f.get_tensor(name)
        except Exception as e:  # a truncated or foreign file
            raise CheckpointError(f"{path}: cannot read it as safetensors ({type(e).__name__}: {e})") from None
        twice = [n for n in names if n in source]  # a stale copy beside the real files: the last one read won
        if twice:
            raise CheckpointError(f"{path} and {source[twice[0]]} both hold tensor {twice[0]}: one of them is from "
                                  f"another save; move it out of the folder")
        source |= dict.fromkeys(names, path)
    return out


def hf_params(tensors: dict[str, np.ndarray], cfg: ModelConfig, where: str | Path = "") -> dict[str, np.ndarray]:
    """{loopformer path: array} of the Hugging Face ``tensors`` for the plain model ``cfg``. CheckpointError
    naming the tensor for one that is missing, has another shape (or is stored transposed), or that the
    config leaves unused (e.g. a layer beyond num_hidden_layers)."""
    t = {k.removeprefix("model."): v for k, v in tensors.items()}
    used: set[str] = set()
    D, V, F = cfg.d_model, cfg.vocab_size, cfg.mlp_hidden
    hd = D // cfg.heads
    q, kv = cfg.heads * hd, cfg.kv_head_count * hd
    shapes = {"embed_tokens.weight": (V, D), "norm.weight": (D,), "lm_head.weight": (V, D),
              "input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
              "self_attn.q_proj.weight": (q, D), "self_attn.k_proj.weight": (kv, D), "self_attn.v_proj.weight": (kv, D),
              "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
              "self_attn.o_proj.weight": (D, q), "mlp.gate_proj.weight": (F, D), "mlp.up_proj.weight": (F, D),
              "mlp.down_proj.weight": (D, F)}

    def get(name: str) -> np.ndarray:
        if name not in t:
            raise CheckpointError(f"{where}: tensor {name} is missing from the safetensors files")
        want, got = shapes[name.split(".", 2)[-1] if name.startswith("layers.") else name], tuple(t[name].shape)
        if got != want:
            how = "is stored transposed" if got == want[::-1] else "has another shape"
            raise CheckpointError(f"{where}: tensor {name} {how}: {list(got)}, where config.json implies {list(want)}")
        used.add(name)
        return np.asarray(t[name], np.float32)

    def stack(f: Any) -> np.ndarray:
        return np.stack([f(f"layers.{i}.") for i in range(cfg.prelude)])

    out = {
        "embed/embedding": get("embed_tokens.weight"),
        "final_norm/scale": get("norm.weight"),
        "prelude/attn_norm/scale": stack(lambda p: get(p + "input_layernorm.weight")),
        "prelude/mlp_norm/scale": stack(lambda p: get(p + "post_attention_layernorm.weight")),
        "prelude/attn/qkv/kernel": stack(lambda p: np.concatenate(
            [get(p + f"self_attn.{n}_proj.weight") for n in "qkv"]).T),
        "prelude/attn/out/kernel": stack(lambda p: get(p + "self_attn.o_proj.weight").T),
        "prelude/mlp/up/kernel": stack(lambda p: np.concatenate(
            [get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]).T),
        "prelude/mlp/down/kernel": stack(lambda p: get(p + "mlp.down_proj.weight").T),
    }
    if cfg.qkv_bias:
        out["prelude/attn/qkv/bias"] = stack(lambda p: np.concatenate([get(p + f"self_attn.{n}_proj.bias")
                                                                       for n in "qkv"]))
    if not cfg.tie_embeddings:
        out["head/kernel"] = get("lm_head.weight").T
    # rotary inverse frequencies are recomputed, and a tied head may be saved as a copy of the embedding
    unused = sorted(n for n in t if n not in used and not n.endswith("rotary_emb.inv_freq")
                    and not (cfg.tie_embeddings and n == "lm_head.weight"))
    if unused:
        raise CheckpointError(f"{where}: {len(unused)} tensor(s) that config.json leaves unused ({', '.join(unused[:3])}"
                              + (", ..." if len(unused) > 3 else "") + f"; it says {cfg.prelude} layers): fix "
                              f"config.json or the safetensors files")
    return out


def import_folder(folder: str | Path) -> tuple[ModelConfig, Any, Path]:
    """(model config, params pytree, tokenizer.json path) of a local Hugging Face folder."""
    folder = Path(folder)
    spec = read_config(folder)
    cfg = model_config(spec, folder / CONFIG)
    tensors = read_tensors(folder)
    if not cfg.tie_embeddings and "lm_head.weight" not in tensors and "model.lm_head.weight" not in tensors:
        cfg.tie_embeddings = True  # saved without a head: it is the embedding
    flat = hf_params(tensors, cfg, folder)
    _check_tokenizer(folder / TOKENIZER, cfg.vocab_size)
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build_model(cfg, cfg.vocab_size, 0))))
    return cfg, fill(abstract, flat, f"--hf {folder}"), folder / TOKENIZER


def _check_tokenizer(path: Path, vocab: int) -> None:
    """CheckpointError unless ``path`` is a tokenizer whose ids all have a row in the model's ``vocab``-row
    embedding (a model may have more rows than the tokenizer has tokens, padded for speed; not fewer)."""
    import tokenizers as hf

    try:
        tok = hf.Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on a bad file
        raise CheckpointError(f"{path}: not a tokenizers file ({str(e).splitlines()[0]})") from None
    ids = tok.get_vocab(with_added_tokens=True).values()
    top = max(ids, default=-1) + 1
    if top > vocab:
        raise CheckpointError(f"{path} has token ids up to {top - 1}, but the model's vocabulary (config.json "
                              f"vocab_size, the embedding's rows) is {vocab}: they belong to different models; use "
                              f"the tokenizer the weights were trained with")
