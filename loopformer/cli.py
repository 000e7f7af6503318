"""Command line: ``loopformer train | eval | ablate | sweep | generate`` (also ``python -m loopformer``).

User mistakes (bad config, missing run, unknown circuit) print one ``error:`` line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from loopformer.errors import LoopformerError

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, add_args: Callable[[argparse.ArgumentParser], None]) -> Callable:
    """Register a subcommand: ``add_args`` adds its flags; the decorated function runs it."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (help, add_args, run)
        return run

    return register


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (e.g. configs/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=200")


@command("train", "train a config from scratch, or resume its run directory", _train_args)
def _train(args: argparse.Namespace) -> int:
    from loopformer.config import load_config
    from loopformer.train.trainer import train

    train(load_config(args.config, args.overrides))
    return 0


# Modules whose import registers more subcommands (each keeps its own command code).
COMMAND_MODULES = ("loopformer.analysis.commands", "loopformer.data.commands")


def _load_subcommands() -> None:
    import importlib

    for module in COMMAND_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def main(argv: list[str] | None = None) -> int:
    _load_subcommands()
    parser = argparse.ArgumentParser(prog="loopformer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except LoopformerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
