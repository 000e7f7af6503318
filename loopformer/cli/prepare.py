"""``loopformer prepare``: tokenize a text corpus once into ArrayRecord shards for training."""

from __future__ import annotations

import argparse
import shlex
import time

from loopformer.cli.common import command, integer
from loopformer.data.prepare import CHUNK_TOKENS, SHARD_TOKENS, check_sizes
from loopformer.errors import ConfigError

# the data settings a prepared corpus is made of (the others, data.seq_len, data.batch_size, ..., are training's)
READS = ("task", "paths", "format", "text_field", "doc_separator", "tokenizer", "vocab_size", "val_fraction")


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config whose data section names the corpus (data.paths, "
                                          "data.tokenizer, data.vocab_size, data.val_fraction, data.doc_separator)")
    p.add_argument("--out", "-o", required=True, help="directory to write (then train with data.paths=[DIR])")
    p.add_argument("--force", action="store_true", help="replace --out if it holds a corpus an earlier prepare wrote "
                                                         "(nothing else is ever deleted)")
    p.add_argument("--chunk-tokens", type=integer, default=CHUNK_TOKENS, help="tokens per ArrayRecord record")
    p.add_argument("--shard-tokens", type=integer, default=SHARD_TOKENS, help="tokens per shard file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.paths=[corpus/*.txt]")


@command("prepare", "tokenize a text corpus once into ArrayRecord shards for training", _args)
def prepare_command(args: argparse.Namespace) -> int:
    from loopformer.config import load_config
    from loopformer.config.load import parse_overrides
    from loopformer.data.prepare import prepare_corpus
    if not args.out.strip():  # it was the current directory ("." already exists; with --force, "remove . yourself")
        raise ConfigError(f"--out {args.out!r}: name the directory to write, e.g. --out prepared/NAME")
    check_sizes(args.chunk_tokens, args.shard_tokens, ("--chunk-tokens", "--shard-tokens"))  # the flags' names
    for item, (key, _) in zip(args.overrides, parse_overrides(args.overrides), strict=True):
        if key.split(".")[0] != "data":  # the config is a training config: the rest of it is for train
            raise ConfigError(f"{item}: prepare reads the data section alone (data.paths, data.tokenizer, ...), so "
                              f"{key} would not be used; drop it")
        if "." in key and key.split(".")[1] not in READS:  # data.seq_len: accepted and ignored
            raise ConfigError(f"{item}: prepare reads {', '.join(f'data.{k}' for k in READS)}; {key} is read when "
                              f"training on the prepared corpus, so here it would not be used; drop it")
    cfg = load_config(args.config, args.overrides, once=True)
    t0 = time.time()
    meta = prepare_corpus(cfg, args.out, force=args.force, chunk_tokens=args.chunk_tokens,
                          shard_tokens=args.shard_tokens, progress=True)
    for split, info in meta["splits"].items():
        print(f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens, {info['bytes']:,} bytes "
              f"in {len(info['files'])} shard(s)")
    print(f"wrote {args.out} ({meta['tokenizer']} tokenizer, vocab {meta['vocab_size']}) in {time.time() - t0:.1f}s; "
          f"train with {shlex.quote(f'data.paths=[{args.out}]')}")
    return 0
