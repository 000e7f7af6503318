"""``loopformer train``: train a config from scratch, or resume its run directory."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from loopformer.cli.common import command
from loopformer.errors import ConfigError
from loopformer.runs.layout import CONFIG_FILE, RunDir

if TYPE_CHECKING:
    from loopformer.config import Config


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (e.g. configs/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=200")


def check_own_run(config: str | None, run_dir: Path, overrides: Sequence[str] = ()) -> None:
    """ConfigError when ``config`` is the config.yaml of a run directory other than the one it names: a copied
    run's config still points at the original, and training it would resume (and change) that one. A run named by
    the settings (``run.name=new``: a run's config as the template of another) is the user's choice."""
    if not config or any(o.split("=", 1)[0].strip() in ("run", "run.dir", "run.name") for o in overrides):
        return
    home = Path(config).expanduser().absolute().parent
    if (Path(config).name == CONFIG_FILE and RunDir(home).holds_run
            and home.resolve() != run_dir.expanduser().absolute().resolve()):
        # quoted for the shell: `run.name=my run` pasted as shown was two words, and the second was refused
        settings = " ".join(shlex.quote(s) for s in (f"run.dir={home.parent}", f"run.name={home.name}"))
        raise ConfigError(f"--config {config} is the config of the run in {home}, but its run.dir / run.name name "
                          f"{run_dir} (a copied or moved run?); training would resume that one. Add "
                          f"{settings} to train this copy")


def check_run_paths(config: str | None, cfg: Config, overrides: Sequence[str] = ()) -> None:
    """CheckpointError when ``config`` is a run's own config.yaml holding a relative corpus path (a run trained before
    its paths were kept absolute): it was read from the current directory, another directory's file of that name
    when the resume runs elsewhere. A path given as an override is the user's, relative to here."""
    from loopformer.runs.read import refuse_relative_corpus

    given = {o.split("=", 1)[0].strip() for o in overrides}
    if (config and Path(config).name == CONFIG_FILE and RunDir(Path(config).expanduser().absolute().parent).holds_run
            and not given & {"data", "data.paths", "data.mixture"}):
        refuse_relative_corpus(cfg, Path(config))


@command("train", "train a config from scratch, or resume its run directory", _args)
def train_command(args: argparse.Namespace) -> int:
    from loopformer.config import load_config
    from loopformer.train.trainer import train

    if not args.config and not args.overrides:  # it would train the defaults into runs/run, surely not what was meant
        raise ConfigError("train needs a config: loopformer train -c configs/quickstart.yaml (or key=value settings "
                          "over the defaults, e.g. run.name=mine)")
    cfg = load_config(args.config, args.overrides, once=True)
    check_own_run(args.config, cfg.run_dir, args.overrides)
    check_run_paths(args.config, cfg, args.overrides)
    train(cfg)
    return 0
