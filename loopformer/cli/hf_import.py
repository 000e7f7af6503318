"""``loopformer import``: a local Hugging Face Llama / Qwen2 / Mistral folder as a run."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from loopformer.cli.common import command, emit
from loopformer.config import load_config
from loopformer.config.load import parse_overrides
from loopformer.errors import ConfigError
from loopformer.runs.log import log
from loopformer.surgery.hf import (
    CONFIG,
    TOKENIZER,
    check_seq_len,
    import_folder,
    max_positions,
    model_config,
    read_config,
    stop_ids,
)

DEFAULT_TEXT = "asset:kjv_genesis_exodus.txt"
DEFAULT_SEQ_LEN = 128
# how the imported model runs, not what it is: the only model fields an override may set (config.json sets the rest)
RUNTIME_FIELDS = ("compute_dtype", "attention")


def _fixed(key: str, folder: Path) -> str | None:
    """What the folder fixes of the override ``key`` (a sentence), or None when import honours it."""
    keys = key.split(".")
    if keys[0] == "model" and (len(keys) != 2 or keys[1] not in RUNTIME_FIELDS):
        return (f"an imported model's architecture comes from {folder / CONFIG} (import honours only "
                f"model.{' and model.'.join(RUNTIME_FIELDS)} of the model section)")
    if keys[:2] in (["data", "tokenizer"], ["data", "vocab_size"]):
        return f"an imported run's tokenizer is {folder / TOKENIZER}, the one the weights were trained with"
    if keys[:2] == ["data", "task"]:
        return "an imported run is a text run (data.task=text), its data the --data files"
    if keys[:2] == ["data", "paths"]:  # it replaced --data's files with no word
        return "--data names the imported run's text (data.paths); give the files with --data"
    if keys[0] == "run":
        return "--out names the imported run's directory"
    return None


def check_overrides(overrides: list[str], folder: Path) -> None:
    """ConfigError for an override of what the folder fixes (the model but `RUNTIME_FIELDS`, the tokenizer, the
    task, the run directory): the imported run would drop it without a word, or pair the weights with another tokenizer."""
    for item, (key, _) in zip(overrides, parse_overrides(overrides), strict=True):
        why = _fixed(key, folder)
        if why:
            raise ConfigError(f"{item}: {why}; drop the override")


def _args(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Reads config.json, *.safetensors and tokenizer.json from DIR (nothing is downloaded) and writes a "
                "run with a plain model (every layer in the prelude) whose tokenizer is DIR/tokenizer.json; eval, "
                "generate, rys and convert then work on it.")
    p.add_argument("--hf", required=True, metavar="DIR", help="a local Hugging Face model folder")
    p.add_argument("--out", required=True, metavar="DIR", help="the run directory to write, e.g. runs/tiny_llama")
    p.add_argument("--data", action="append", metavar="PATH",
                   help=f"text the run evaluates on (data.paths; default the shipped {DEFAULT_TEXT})")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides (data.seq_len=512, train.lr=3e-5, model.compute_dtype=bfloat16, ...; the "
                        "architecture and tokenizer are the folder's)")


@command("import", "import a local Hugging Face Llama / Qwen2 / Mistral folder as a run", _args)
def import_command(args: argparse.Namespace) -> int:
    # the new run's checkpoint holds a fresh optimizer state: the trainer's part, imported only here
    from loopformer.train.newrun import out_dir, point_at, write_run

    def body() -> tuple[dict[str, Any], str]:
        target = out_dir(args.out)  # before reading any weights: an empty --out is refused at once
        spec = read_config(args.hf)  # the flag as given: Path('') is the current directory
        folder = Path(args.hf)
        check_overrides(args.overrides, folder)
        vocab = model_config(spec, folder / CONFIG).vocab_size
        stops = stop_ids(folder, vocab)
        paths = args.data or [DEFAULT_TEXT]
        seq_len = min(DEFAULT_SEQ_LEN, max_positions(spec) or DEFAULT_SEQ_LEN)
        # a blank line ends a document: "\\n\\n" in YAML's double quotes (a Python '\\n\\n' inside single quotes was
        # folded by YAML into one newline, so every line was a document)
        cfg = load_config(None, ["data.task=text", f"data.paths={paths!r}", "data.doc_separator=\"\\n\\n\"",
                                 f"data.tokenizer={str((folder / TOKENIZER).resolve())!r}",
                                 "data.prompt_format=tokenizer", f"data.stop_ids={stops}", f"data.seq_len={seq_len}",
                                 "data.batch_size=8", "data.eval_examples=64", "data.eval_batch_size=16",
                                 "data.val_fraction=0.1", "train.lr=1e-4", "train.warmup_steps=10",
                                 "model.stages=[]", *args.overrides])
        check_seq_len(spec, cfg.data.seq_len, folder)
        outside = [i for i in cfg.data.stop_ids if i >= vocab]  # the run was written, and generate refused it
        if outside:
            raise ConfigError(f"data.stop_ids {outside} are not token ids of {folder}'s model (vocabulary {vocab}); "
                              f"give ids below {vocab}, or drop data.stop_ids (the folder's generation_config.json "
                              f"sets them)")
        model, params, tokenizer = import_folder(folder)
        model.compute_dtype, model.attention = cfg.model.compute_dtype, cfg.model.attention  # overrides kept
        cfg.model = model
        out = write_run(point_at(cfg, target), params)
        log(f"wrote {out}")
        layers = model.prelude
        doc = {"run": str(out), "hf": str(args.hf), "layers": layers, "d_model": model.d_model, "heads": model.heads,
               "kv_heads": model.kv_head_count, "vocab_size": model.vocab_size, "tokenizer": str(tokenizer),
               "stop_ids": cfg.data.stop_ids}  # an override's (the folder's were reported over it)
        q = shlex.quote(str(out))
        text = (f"imported {args.hf} into {out}: {layers} layers, d_model {model.d_model}, {model.heads} heads "
                f"({model.kv_head_count} key/value), vocab {model.vocab_size}\n"
                f"  try: loopformer eval --run {q} · loopformer generate --run {q} --prompt 'In the beginning' · "
                f"loopformer rys --run {q}")
        return doc, text

    return emit(args, body)
