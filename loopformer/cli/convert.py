"""``loopformer convert``: a trained plain model becomes prelude + one looped circuit + coda (a new run)."""

from __future__ import annotations

import argparse
import copy
import shlex
from typing import Any

from loopformer.cli.common import command, emit, loop_count, positive, run_flags
from loopformer.evaluation.run import load_run
from loopformer.runs.log import log
from loopformer.runs.read import read_run
from loopformer.surgery.convert import (
    INJECTS,
    Recipe,
    as_flags,
    converted_config,
    converted_params,
    layout,
    parse_layers,
    parse_range,
)


def _args(p: argparse.ArgumentParser) -> None:
    p.epilog = ("The circuit is the plain layers B..C-1 at the full width, reading the raw stream and replacing it "
                "with its final state (output: replace), so at 1 loop the new model computes what the plain one "
                "did; at n loops the block runs n times. Train it on with a loop curriculum: "
                "loopformer train -c OUT/config.yaml train.steps=N 'model.stages.0.circuits.X.loops=uniform(1, 8)'.")
    run_flags(p, examples=False)
    p.add_argument("--core", required=True, metavar="B:C", help="the layers [B, C) that become the looped circuit")
    p.add_argument("--drop", action="append", default=[], metavar="LAYERS",
                   help="layers of the prelude or coda to remove, e.g. 4:10 or 3,5 (repeatable)")
    p.add_argument("--out", required=True, metavar="NAME",
                   help="the new run: a path, or a name placed beside --run")
    p.add_argument("--name", default="X", help="the circuit's name (default X)")
    p.add_argument("--inject", choices=tuple(INJECTS), default="none",
                   help="input injection: none (h_i = core(h_(i-1)), init input; default), add (re-adds the "
                        "core's input each loop, init zeros) or concat (a learned [h; x] adapter starting as [I; 0])")
    p.add_argument("--loops", default="uniform(1, 4)", help="the circuit's training loop counts (default uniform(1, 4))")
    p.add_argument("--eval-loops", type=loop_count, default=1, help="its default count at evaluation (default 1)")
    p.add_argument("--max-loops", type=loop_count, default=64, help="cap on training counts (default 64)")
    p.add_argument("--backprop", type=positive, default=4, help="truncated backprop depth k (default 4)")


@command("convert", "turn a trained plain model into prelude + one looped circuit + coda, as a new run", _args)
def convert_command(args: argparse.Namespace) -> int:
    # the new run's checkpoint holds a fresh optimizer state: the trainer's part, imported only here
    from loopformer.train.newrun import out_dir, point_at, write_run

    def body() -> tuple[dict[str, Any], str]:
        info = read_run(args.run)
        recipe = Recipe(core=parse_range(args.core, "--core"), drop=parse_layers(args.drop), name=args.name,
                        inject=args.inject, loops=args.loops, max_loops=args.max_loops, eval_loops=args.eval_loops,
                        backprop=args.backprop)
        pre, core, post = layout(info.cfg.model, recipe)  # checks the layers before restoring anything
        cfg = copy.deepcopy(info.cfg)
        cfg.model = converted_config(info.cfg.model, recipe)  # and the circuit's settings,
        with as_flags(recipe):  # with the run's data (per_difficulty's counts at its training range's hi)
            cfg.validate()
        target = out_dir(args.out, info.path)
        run = load_run(info, args.step, raw=args.raw_weights)
        cfg.model, params = converted_params(info.cfg.model, run.params, recipe)
        point_at(cfg, target)
        out = write_run(cfg, params, info.data)
        log(f"wrote {out}")
        c = cfg.model.circuits()[0]
        train = (f"loopformer train -c {shlex.quote(str(out / 'config.yaml'))} train.steps=N "
                 f"{shlex.quote(f'model.stages.0.circuits.{c.name}.loops={c.loops}')}")
        doc = {"run": str(out), "source": str(info.path), "step": run.step, "weights": run.weights,
               "layers": {"prelude": pre, "core": core, "coda": post, "dropped": sorted(recipe.drop)},
               "circuit": {"name": c.name, "depth": c.depth, "width": c.width, "inject": c.inject, "init": c.init,
                           "output": c.output, "loops": c.loops, "eval_loops": c.eval_loops}, "train": train}
        text = "\n".join([
            f"converted {info.path} @ step {run.step} into {out}:",
            f"  prelude layers {pre or '-'} · core {c.name} = layers {core} looped (train {c.loops}, eval "
            f"{c.eval_loops}) · coda layers {post or '-'}" + (f" · dropped {sorted(recipe.drop)}" if recipe.drop else ""),
            # with --drop it is another model: the line said it computes the plain one's (#27 pass 33)
            "  at 1 loop it computes what the plain model did"
            + (f" without layers {sorted(recipe.drop)} (dropped: not the same function)" if recipe.drop else "")
            + f"; train on with: {train}"])
        return doc, text

    return emit(args, body)
