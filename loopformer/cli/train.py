"""``loopformer train``: train a config from scratch, or resume its run directory."""

from __future__ import annotations

import argparse

from loopformer.cli.common import command


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (e.g. configs/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=200")


@command("train", "train a config from scratch, or resume its run directory", _args)
def train_command(args: argparse.Namespace) -> int:
    from loopformer.config import load_config
    from loopformer.train.trainer import train

    train(load_config(args.config, args.overrides))
    return 0
