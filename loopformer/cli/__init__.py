"""Train transformers with built-in looped circuits, then evaluate, ablate, sweep, decode and operate on them.

Command line: ``loopformer train | eval | ablate | sweep | generate | inspect | prepare | activity | rys |
convert | import | export`` (also ``python -m loopformer``). One module per command; nothing in the package imports this one.

User mistakes (bad config, missing run, unknown circuit) print one ``error:`` line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from loopformer.errors import DecodingError, LoopformerError

MODULES = ("train", "eval", "ablate", "sweep", "generate", "inspect", "prepare", "activity", "rys", "convert", "hf_import",
           "export")


def main(argv: list[str] | None = None) -> int:
    for name in MODULES:
        importlib.import_module(f"loopformer.cli.{name}")  # each registers its command
    from loopformer.cli.common import COMMANDS

    parser = argparse.ArgumentParser(prog="loopformer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except DecodingError as e:  # the model layer says why; the command line knows the way around it
        print(f"error: {e}; use --no-cache (recomputes the prefix every token)", file=sys.stderr)
        return 2
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
