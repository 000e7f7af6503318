"""``loopformer import``: a local Hugging Face Llama / Qwen2 / Mistral folder as a run."""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from loopformer.cli.common import command, emit
from loopformer.config import load_config
from loopformer.runs.log import log
from loopformer.surgery.hf import import_folder, stop_ids

DEFAULT_TEXT = "asset:kjv_genesis_exodus.txt"


def _args(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Reads config.json, *.safetensors and tokenizer.json from DIR (nothing is downloaded) and writes a "
                "run with a plain model (every layer in the prelude) whose tokenizer is DIR/tokenizer.json; eval, "
                "generate, rys and convert then work on it.")
    p.add_argument("--hf", required=True, metavar="DIR", help="a local Hugging Face model folder")
    p.add_argument("--out", required=True, metavar="DIR", help="the run directory to write, e.g. runs/tiny_llama")
    p.add_argument("--data", action="append", metavar="PATH",
                   help=f"text the run evaluates on (data.paths; default the shipped {DEFAULT_TEXT})")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (data.seq_len=512, ...)")


@command("import", "import a local Hugging Face Llama / Qwen2 / Mistral folder as a run", _args)
def import_command(args: argparse.Namespace) -> int:
    # the new run's checkpoint holds a fresh optimizer state: the trainer's part, imported only here
    from loopformer.train.newrun import out_dir, point_at, write_run

    def body() -> tuple[dict[str, Any], str]:
        target = out_dir(args.out)  # before reading any weights: an empty --out is refused at once
        model, params, tokenizer = import_folder(args.hf)
        stops = stop_ids(args.hf, model.vocab_size)
        paths = args.data or [DEFAULT_TEXT]
        cfg = load_config(None, ["data.task=text", f"data.paths={paths!r}", "data.doc_separator='\n\n'",
                                 f"data.tokenizer={str(tokenizer.resolve())!r}", "data.prompt_format=tokenizer",
                                 f"data.stop_ids={stops}", "data.seq_len=128",
                                 "data.batch_size=8", "data.eval_examples=64", "data.eval_batch_size=16",
                                 "data.val_fraction=0.1", "train.lr=1e-4", "train.warmup_steps=10",
                                 "model.stages=[]", *args.overrides])
        cfg.model = model
        out = write_run(point_at(cfg, target), params)
        log(f"wrote {out}")
        layers = model.prelude
        doc = {"run": str(out), "hf": str(args.hf), "layers": layers, "d_model": model.d_model, "heads": model.heads,
               "kv_heads": model.kv_head_count, "vocab_size": model.vocab_size, "tokenizer": str(tokenizer),
               "stop_ids": stops}
        q = shlex.quote(str(out))
        text = (f"imported {args.hf} into {out}: {layers} layers, d_model {model.d_model}, {model.heads} heads "
                f"({model.kv_head_count} key/value), vocab {model.vocab_size}\n"
                f"  try: loopformer eval --run {q} · loopformer generate --run {q} --prompt 'In the beginning' · "
                f"loopformer rys --run {q}")
        return doc, text

    return emit(args, body)
