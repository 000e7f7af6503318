"""``loopformer export``: a run as a Hugging Face folder that ``transformers`` loads (`loopformer.surgery.export`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from loopformer.cli.common import command, emit, run_flags
from loopformer.cli.loopspec import parse_loops
from loopformer.errors import AnalysisError, CheckpointError
from loopformer.evaluation.run import load_run
from loopformer.inference.generate import tokenizer_of
from loopformer.runs.layout import RunDir, outside_runs
from loopformer.runs.log import log
from loopformer.runs.read import read_run
from loopformer.surgery.export import (
    check_exportable,
    check_out,
    check_space,
    export_bytes,
    hf_config,
    hf_tensors,
    write_folder,
)


def _args(p: argparse.ArgumentParser) -> None:
    p.epilog = ("A looped circuit is unrolled into plain layers at its count (--loops, default its eval_loops): "
                "each repetition a copy of its tied weights. Exports Llama-layout models (Qwen2 with q/k/v "
                "biases, Mistral with a sliding window): plain ones, imported ones, and those whose circuits "
                "`loopformer convert` made.")
    run_flags(p, examples=False)
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (new or empty)")
    p.add_argument("--loops", action="append", metavar="CIRCUIT=N", help="the count each circuit is unrolled at")


@command("export", "write a run as a Hugging Face folder (config.json, safetensors, tokenizer) that transformers "
                   "loads", _args)
def export_command(args: argparse.Namespace) -> int:
    def body() -> tuple[dict[str, Any], str]:
        if not args.out.strip():
            raise AnalysisError("--out '': name the folder to write, e.g. --out exported/NAME")
        out = outside_runs(Path(args.out).expanduser())
        check_out(out)  # before any weight is read: a --out that cannot be written is refused at once
        info = read_run(args.run)
        check_exportable(info.cfg.model)
        tokenizer_json = RunDir(info.path).tokenizer
        if not tokenizer_json.is_file() or '"kind": "bytes"' in tokenizer_json.read_text()[:200]:
            raise CheckpointError(f"cannot export {info.path}: it has no tokenizer.json that transformers reads (byte-"
                                  f"tokenizer and synthetic-task runs); train with data.tokenizer=bpe or a file")
        loops = info.full_loops({c: v[0] for c, v in parse_loops(args.loops, info.circuits, grid=False).items()})
        run = load_run(info, args.step, raw=args.raw_weights)
        # from the shapes, before the unrolled copies are made: --loops 10000 would fill the memory, then the disk
        check_space(out, export_bytes(info.cfg.model, run.params, loops) + tokenizer_json.stat().st_size)
        tensors = hf_tensors(info.cfg.model, run.params, loops)
        layers = len({k.split(".")[2] for k in tensors if k.startswith("model.layers.")})
        config = hf_config(info.cfg.model, run.model.vocab_size, layers, tokenizer_of(info.data),
                           max(info.cfg.data.seq_len, 2048))
        # a run that trains each document as BOS ids EOS puts BOS before its prompts: so must the folder's tokenizer
        bos = tokenizer_of(info.data).bos_id if info.cfg.data.prompt_format == "documents" else None
        out = write_folder(out, config, tensors, tokenizer_json, bos)
        log(f"wrote {out}")
        doc = {**run.provenance(), "out": str(out), "loops": loops, "layers": layers,
               "model_type": config["model_type"], "files": sorted(p.name for p in out.iterdir())}
        text = (f"exported {info.path} @ step {run.step} as a {config['model_type']} model of {layers} layers"
                + (f" (circuits unrolled at {json.dumps(loops)})" if loops else "") + f" into {out}\n"
                f"  load it: transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")  # a Python literal
        return doc, text

    return emit(args, body)
