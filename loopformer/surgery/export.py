"""A run as a Hugging Face folder (`loopformer export`): config.json, model.safetensors and tokenizer.json
that ``transformers.AutoModelForCausalLM.from_pretrained`` loads with no remote code.

What exports: a Llama-layout model (SwiGLU, pre-norm RMSNorm, RoPE with optional linear / llama3 scaling,
causal attention; q/k/v biases make it Qwen2, a sliding window (``model.window``, as an imported Mistral's)
makes it Mistral, whose ``sliding_window`` w lets each query see itself and the w - 1 keys before it, as
loopformer's window does) whose looped circuits can be *unrolled* into plain layers
at given loop counts: one full-width circuit per stage, no input injection, its final state replacing the
stream (``output: replace``, as `loopformer convert` makes). The layers are written in the order they run:
prelude, each circuit's blocks repeated n times, coda; each repetition a copy of the tied weights (what
mergekit's passthrough merges write). The inverse of `loopformer.surgery.hf`'s mapping:

    embed/embedding                  -> model.embed_tokens.weight
    <stack>/attn/qkv/kernel [D, (N+2K)H] -> self_attn.{q,k,v}_proj.weight (rows of its transpose; biases likewise)
    <stack>/attn/out/kernel          -> self_attn.o_proj.weight (transposed)
    <stack>/mlp/up/kernel [D, 2F]    -> mlp.gate_proj.weight, mlp.up_proj.weight (gate first, transposed)
    <stack>/mlp/down/kernel          -> mlp.down_proj.weight (transposed)
    attn_norm, mlp_norm, final_norm  -> input_layernorm, post_attention_layernorm, model.norm
    head/kernel (untied)             -> lm_head.weight (transposed)

Anything else is refused in one line that says why.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from loopformer.config.schema import ModelConfig
from loopformer.errors import CheckpointError
from loopformer.runs.layout import dead_siblings, through_link, unwritable_target
from loopformer.runs.log import log
from loopformer.surgery.naming import circuit_prefix, flat

WRITTEN = re.compile(r"config\.json|model\.safetensors|tokenizer\.json")  # what write_folder puts in its folder
SUBLAYERS = ("attn_norm/scale", "attn/qkv/kernel", "attn/qkv/bias", "attn/out/kernel", "mlp_norm/scale",
             "mlp/up/kernel", "mlp/down/kernel")


def check_exportable(cfg: ModelConfig) -> None:
    """CheckpointError (one line, the first reason) unless ``cfg`` unrolls into a Llama / Qwen2 / Mistral layout."""
    why = ("model.mlp is gelu (the layout has SwiGLU)" if cfg.mlp != "swiglu" else
           "model.norm is sandwich (the layout normalises before each sublayer only)" if cfg.norm != "pre" else
           f"model.position is {cfg.position} (the layout has RoPE)" if cfg.position != "rope" else
           "model.causal is false (causal language models only)" if not cfg.causal else
           f"model.window is {cfg.window} with q/k/v biases (Mistral's layout has the window, Qwen2's the biases)"
           if cfg.window and cfg.qkv_bias else "")
    for s, stage in enumerate(cfg.stages):
        if why:
            break
        if len(stage.circuits) > 1 or stage.router.routes:
            routed = " with a router" if stage.router.routes else ""
            why = f"stage {s} runs {len(stage.circuits)} circuits side by side{routed}"
            break
        c = stage.circuits[0]
        why = (f"circuit {c.name} has width {c.width}, not the full {cfg.d_model}" if c.width != cfg.d_model else
               f"circuit {c.name} injects its input (inject: {c.inject})" if c.inject != "none" else
               f"circuit {c.name} adds to the stream (output: {c.output}), it does not replace it"
               if c.output != "replace" else
               f"circuit {c.name} starts from init {c.init}, not the stream" if c.init != "input" else
               f"circuit {c.name} has a halting head" if c.halting.has_head else
               f"circuit {c.name} has its own attention window {c.window or 'none'} (the model's: "
               f"{cfg.window or 'none'})" if c.window != cfg.window else
               f"circuit {c.name}'s heads or MLP differ from the model's" if (
                   c.heads, c.kv_head_count, c.mlp_hidden) != (cfg.heads, cfg.kv_head_count, cfg.mlp_hidden) else "")
    if why:
        raise CheckpointError(f"cannot export: {why}; transformers' Llama layout runs plain layers (loopformer "
                              f"convert makes circuits that unroll into them)")


def unrolled(cfg: ModelConfig, params: Any, loops: Mapping[str, int]) -> list[dict[str, np.ndarray]]:
    """The plain layers the model runs at ``loops`` (every circuit's count), in order: {sublayer: array}."""
    check_exportable(cfg)
    src = {k: np.asarray(v, np.float32) for k, v in flat(params).items()}

    def stack(prefix: str, depth: int) -> list[dict[str, np.ndarray]]:
        return [{sub: src[prefix + sub][i] for sub in SUBLAYERS if prefix + sub in src} for i in range(depth)]

    layers = stack("prelude/", cfg.prelude)
    for s, stage in enumerate(cfg.stages):
        c = stage.circuits[0]
        layers += stack(circuit_prefix(s, c.name) + "blocks/", c.depth) * int(loops[c.name])
    return layers + stack("coda/", cfg.coda)


def hf_tensors(cfg: ModelConfig, params: Any, loops: Mapping[str, int]) -> dict[str, np.ndarray]:
    """{Hugging Face name: array} of the unrolled model."""
    src = {k: np.asarray(v, np.float32) for k, v in flat(params).items()}
    H = cfg.d_model // cfg.heads
    q, kv = cfg.heads * H, cfg.kv_head_count * H
    out = {"model.embed_tokens.weight": src["embed/embedding"], "model.norm.weight": src["final_norm/scale"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = src["head/kernel"].T
    for i, layer in enumerate(unrolled(cfg, params, loops)):
        p = f"model.layers.{i}."
        qkv = layer["attn/qkv/kernel"].T  # [(N + 2K) H, D]: q, k, v rows
        up = layer["mlp/up/kernel"].T  # [2F, D]: gate, up rows
        F = up.shape[0] // 2
        out |= {p + "input_layernorm.weight": layer["attn_norm/scale"],
                p + "post_attention_layernorm.weight": layer["mlp_norm/scale"],
                p + "self_attn.q_proj.weight": qkv[:q], p + "self_attn.k_proj.weight": qkv[q : q + kv],
                p + "self_attn.v_proj.weight": qkv[q + kv :], p + "self_attn.o_proj.weight": layer["attn/out/kernel"].T,
                p + "mlp.gate_proj.weight": up[:F], p + "mlp.up_proj.weight": up[F:],
                p + "mlp.down_proj.weight": layer["mlp/down/kernel"].T}
        if "attn/qkv/bias" in layer:
            b = layer["attn/qkv/bias"]
            out |= {p + "self_attn.q_proj.bias": b[:q], p + "self_attn.k_proj.bias": b[q : q + kv],
                    p + "self_attn.v_proj.bias": b[q + kv :]}
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def hf_config(cfg: ModelConfig, vocab: int, layers: int, tokenizer: Any, max_positions: int) -> dict[str, Any]:
    """config.json of the unrolled model: Llama, Qwen2 with q/k/v biases, or Mistral with a sliding window."""
    kind = "qwen2" if cfg.qkv_bias else "mistral" if cfg.window else "llama"
    out = {"architectures": [{"qwen2": "Qwen2", "mistral": "Mistral", "llama": "Llama"}[kind] + "ForCausalLM"],
           "model_type": kind,
           "vocab_size": vocab, "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_hidden,
           "num_hidden_layers": layers, "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_head_count,
           "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_base,
           "max_position_embeddings": max_positions, "tie_word_embeddings": cfg.tie_embeddings,
           "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
           "bos_token_id": getattr(tokenizer, "bos_id", None), "eos_token_id": getattr(tokenizer, "eos_id", None)}
    if kind == "mistral":
        out["sliding_window"] = cfg.window
    r = cfg.rope_scaling
    if r:
        llama3 = {"low_freq_factor": float(r.get("low_freq_factor", 1.0)),
                  "high_freq_factor": float(r.get("high_freq_factor", 4.0)),
                  "original_max_position_embeddings": int(r.get("original_max", 8192))}
        out["rope_scaling"] = ({"rope_type": r["kind"], "factor": float(r.get("factor", 1.0))}
                               | (llama3 if r["kind"] == "llama3" else {}))
    return out


def export_bytes(cfg: ModelConfig, params: Any, loops: Mapping[str, int]) -> int:
    """Bytes of the float32 tensors `hf_tensors` makes of ``params`` at ``loops``, from their shapes alone
    (no copy is made): each circuit's blocks count once per loop."""
    size = {k: int(np.prod(np.shape(v))) for k, v in flat(params).items()}
    stacks = [("prelude/", 1), ("coda/", 1)] + [(circuit_prefix(s, st.circuits[0].name) + "blocks/",
                                                  int(loops[st.circuits[0].name])) for s, st in enumerate(cfg.stages)]
    n = size["embed/embedding"] + size["final_norm/scale"] + (0 if cfg.tie_embeddings else size["head/kernel"])
    n += sum(size.get(prefix + sub, 0) * times for prefix, times in stacks for sub in SUBLAYERS)
    return 4 * n


def _existing_parent(out: Path) -> Path:
    """The nearest folder above ``out`` that exists: where the folder (and its parents) will be made;
    CheckpointError when it is a file, which no folder can be made in."""
    parent = next(p for p in out.parents if p.exists())  # a relative path's last parent is "."
    if not parent.is_dir():
        raise CheckpointError(f"--out {out}: {parent} is a file, not a directory; choose an --out whose parents are "
                              f"directories")
    return parent


def check_out(out: Path) -> None:
    """CheckpointError (one line) unless the folder ``out`` can be written: new or an empty directory, in a
    writable directory. Cheap: the command calls it before any weight is read."""
    problem = unwritable_target(out, "folder", "hf")
    if problem:
        raise CheckpointError(problem)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file, not a directory; pick a new directory")
    if out.is_dir() and any(out.iterdir()):
        raise CheckpointError(f"--out {out} already exists and is not empty; pick a new directory")
    parent = _existing_parent(out)
    try:  # a read-only file system or directory: a probe says so for root too, where permission bits do not
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".write_test."):
            pass
    except OSError as e:
        raise CheckpointError(f"--out {out}: cannot write to {parent} ({e.strerror or e}); choose a writable "
                              f"directory") from None


def check_space(out: Path, need: int) -> None:
    """CheckpointError when the disk under ``out`` has fewer than ``need`` bytes free (before writing any)."""
    parent = _existing_parent(out)
    free = shutil.disk_usage(parent).free
    if free < need:
        raise CheckpointError(f"--out {out}: the export takes {need / 2**20:,.1f} MiB and {parent} has "
                              f"{free / 2**20:,.1f} MiB free (the unrolled layers grow with --loops); free some "
                              f"space (df -h {shlex.quote(str(parent))}), lower --loops, or choose another --out")


def prompt_tokenizer(text: str, bos: int | None) -> str:
    """The run's tokenizer.json ``text`` as the folder holds it: with ``bos`` (the id a run with
    data.prompt_format=documents puts before every document and every prompt), a post-processor that puts it before
    every text encoded with special tokens, so that transformers and `loopformer import` (prompt_format tokenizer)
    encode a prompt as `generate` on the run does. The file was copied as it was, without one: the exported model
    got prompts without the BOS it was trained with, and continued them otherwise (#27 pass 26)."""
    if bos is None:
        return text
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_str(text)
    name = tok.id_to_token(bos)
    tok.post_processor = processors.TemplateProcessing(single=f"{name} $A", pair=f"{name} $A {name}:1 $B:1",
                                                       special_tokens=[(name, bos)])
    return tok.to_str()


def write_folder(out: Path, config: dict[str, Any], tensors: dict[str, np.ndarray], tokenizer_json: Path,
                 bos: int | None = None) -> Path:
    """Write the folder atomically (a temporary sibling renamed into place); CheckpointError if ``out`` holds
    anything, cannot be written, or its disk has too little space for the tensors and the tokenizer (``bos``: the
    run's prompt BOS, written into the tokenizer's post-processor: `prompt_tokenizer`)."""
    from safetensors.numpy import save_file

    out = through_link(out)  # the rename into place failed on a link: "Not a directory"
    check_out(out)
    tokenizer = prompt_tokenizer(tokenizer_json.read_text(encoding="utf-8"), bos)
    check_space(out, sum(v.nbytes for v in tensors.values()) + len(tokenizer.encode("utf-8")))
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for leftover in dead_siblings(out, ("tmp",), WRITTEN):  # of an export killed with kill -9
            shutil.rmtree(leftover, ignore_errors=True)
            log(f"removed {leftover}, left by an interrupted export")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        # safetensors writes it readable by its owner only (0600): give it config.json's mode, the umask's
        os.chmod(tmp / "model.safetensors", (tmp / "config.json").stat().st_mode & 0o777)
        (tmp / "tokenizer.json").write_text(tokenizer, encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except Exception as e:  # an OSError, or safetensors' own error for a full disk
        shutil.rmtree(tmp, ignore_errors=True)
        why = getattr(e, "strerror", None) or str(e).split(": ")[-1]
        raise CheckpointError(f"--out {out}: writing the folder failed ({why}); nothing was written") from None
    except BaseException:  # Ctrl-C or SIGTERM mid-write: no half-written temporary folder left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
