"""``loopformer inspect``: what a run is, without restoring its weights: the architecture in the
``(X1)^n ⊕ ...`` notation, parameters per circuit and per path, the loop schedules, the checkpoints."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from loopformer import jsontext
from loopformer.cli.common import command, emit, run_flags
from loopformer.config import CircuitArch, CircuitBehaviour, LoopSchedule
from loopformer.errors import AnalysisError
from loopformer.evaluation.tables import format_table
from loopformer.model.describe import describe, notation
from loopformer.runs.layout import RunDir
from loopformer.runs.read import read_run
from loopformer.runs.restore import abstract_model


def _fields(obj: Any, cls: type) -> dict[str, Any]:
    return {f: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v)
            for f in cls.__dataclass_fields__ for v in [getattr(obj, f)]}


def _history(path: Path) -> list[dict[str, Any]]:
    """The records of ``config_changes.jsonl`` ([] without one); AnalysisError naming a line that is not one (the
    file edited or damaged by hand)."""
    if not path.is_file():
        return []
    fix = "fix or delete that line (the file is the run's history of settings; nothing else reads it)"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise AnalysisError(f"{path}: not UTF-8 text (bad byte at offset {e.start}); {fix.replace('that line', 'it')}"
                            ) from None
    history = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = jsontext.loads(line)
        except json.JSONDecodeError:
            record = None
        changes = record.get("changes") if isinstance(record, dict) else None
        if not (isinstance(record, dict) and isinstance(record.get("step"), int) and isinstance(changes, list)
                and all(isinstance(c, dict) and {"path", "old", "new"} <= c.keys() for c in changes)):
            raise AnalysisError(f"{path}:{number}: not a record of the run's changes ({{\"step\": N, \"changes\": "
                                f"[{{\"path\", \"old\", \"new\"}}, ...]}}); {fix}")
        history.append(record)
    return history


def inspect_run(path: str) -> dict[str, Any]:
    """The JSON document of `loopformer inspect`."""
    info = read_run(path)
    cfg = info.cfg
    model = abstract_model(cfg, info.data)  # type: ignore[arg-type]
    counts = model.param_counts()
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]
    params = {jax.tree_util.keystr(p, simple=True, separator="/"): list(x.shape) for p, x in flat}
    circuits = {}
    for s, stage in enumerate(cfg.model.stages):
        for c in stage.circuits:
            circuits[c.name] = {"stage": s, **_fields(c, CircuitArch), **_fields(c, CircuitBehaviour),
                                "params": counts[c.name], "schedule": _fields(c, LoopSchedule),
                                # from the run's difficulties where the count follows them (per_difficulty: the
                                # distribution alone said [its count at 1, max_loops]; #27 pass 38)
                                "training_mean": info.training_mean(c.name),
                                "typical_range": list(info.training_range(c.name)),
                                # the stage's router decides each token's rounds (it was left out of the document)
                                "router": dataclasses.asdict(stage.router) if stage.router.routes else None}
    history = _history(RunDir(info.path).changes)
    return {"run": str(info.path), "notation": notation(cfg.model), "symbolic": notation(cfg.model, {
                c.name: "n" if len(cfg.model.circuits()) == 1 else f"n_{c.name}" for c in cfg.model.circuits()}),
            "vocab_size": model.vocab_size, "d_model": cfg.model.d_model, "total_params": sum(counts.values()),
            "shared_params": counts["shared"], "circuits": circuits, "params": params,
            "steps": RunDir(info.path).checkpoint_steps(), "config_changes": history,
            "describe": describe(cfg.model, model.vocab_size, counts)}


def _text(doc: dict[str, Any]) -> str:
    lines = [doc["describe"], "", f"parameters by path ({len(doc['params'])} arrays):"]
    lines += ["  " + line for line in format_table(["path", "shape"], [[p, "x".join(map(str, s)) or "scalar"]
                                                                      for p, s in doc["params"].items()]).splitlines()]
    sched = [[n, c["schedule"]["loops"], c["schedule"]["max_loops"], c["schedule"]["eval_loops"],
              c["schedule"]["backprop"]] for n, c in doc["circuits"].items()]
    if sched:
        lines += ["", "loop schedules:"]
        lines += ["  " + line for line in format_table(["circuit", "train loops", "max", "eval", "backprop k"],
                                                       sched).splitlines()]
    for record in doc["config_changes"]:
        lines.append(f"changed at step {record['step']}: "
                     + "; ".join(f"{c['path']}: {c['old']!r} -> {c['new']!r}" for c in record["changes"]))
    steps = doc["steps"]
    lines += ["", f"checkpoints on disk: steps {', '.join(map(str, steps))}" if steps else "no checkpoints on disk"]
    return "\n".join(lines)


def _args(p: argparse.ArgumentParser) -> None:
    run_flags(p, examples=False, weights=False)


@command("inspect", "a run's architecture, parameters by circuit and path, loop schedules and checkpoints", _args)
def inspect_command(args: argparse.Namespace) -> int:
    def body() -> tuple[dict[str, Any], str]:
        doc = inspect_run(args.run)
        return doc, _text(doc)

    return emit(args, body)
