"""The outer training loop: run directory, resume, train steps, periodic eval, checkpoints, logs.

    <run.dir>/<run.name>/
      config.yaml      resolved config (a resume refuses a different model)
      checkpoints/     orbax: params, optimizer, step, grain iterator state
      tb/              tensorboard events
      metrics.jsonl    one JSON object per logged step
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml
from flax import nnx

from loopformer.analysis.evaluate import Evaluator
from loopformer.config import Config, config_from_dict
from loopformer.data.pipeline import eval_batches, train_iterator
from loopformer.data.tasks import Task, make_task
from loopformer.errors import CheckpointError, ConfigError, DataError
from loopformer.model.transformer import LoopedTransformer, build_model
from loopformer.train.checkpoint import Checkpoints
from loopformer.train.metrics import MetricsWriter, ProgressLine
from loopformer.train.optim import learning_rate_schedule, make_optimizer
from loopformer.train.step import init_state, make_train_step

# Config sections that fix the shapes and meaning of a checkpoint: a resume must match them.
IDENTITY_KEYS = ("seed", "model", "data.task", "data.task_args")


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


# ----------------------------------------------------------------------------- run directory


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def _first_difference(a: Any, b: Any, path: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = _first_difference(x, y, f"{path}.{i}")
            if d:
                return d
        return None
    return None if a == b else f"{path}: {a!r} -> {b!r}"


def prepare_run_dir(cfg: Config) -> Path:
    """Create the run directory (clear error if it cannot be written) and check a resume's config."""
    run_dir = cfg.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run.dir: cannot write to {run_dir} ({e.strerror or e}); set run.dir=<a writable "
                          f"directory> or run.name=<another name>") from None
    saved = run_dir / "config.yaml"
    ckpt_dir = run_dir / "checkpoints"
    has_ckpt = ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    if saved.is_file() and has_ckpt:
        try:
            old = yaml.safe_load(saved.read_text()) or {}
        except yaml.YAMLError:
            raise CheckpointError(f"{saved} is corrupt; delete {run_dir} to start over") from None
        new = cfg.to_dict()
        for key in IDENTITY_KEYS:
            diff = _first_difference(_lookup(old, key), _lookup(new, key), key)
            if diff:
                raise CheckpointError(
                    f"{run_dir} holds a run with a different model/task ({diff}); resume it with its own "
                    f"config, or pick a new run.name (or delete {run_dir}) to start fresh")
    tmp = saved.with_suffix(".yaml.tmp")
    tmp.write_text(cfg.to_yaml())
    tmp.replace(saved)  # atomic: never a half-written config.yaml
    return run_dir


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config of an existing run (for the analysis commands)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"no run at {run_dir}: {path} is missing (train first, or point --run at a "
                              f"directory made by `loopformer train`)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise CheckpointError(f"{path} is corrupt (not YAML)") from None
    return config_from_dict(data)


# ----------------------------------------------------------------------------- building blocks


def make_task_for(cfg: Config) -> Task:
    task = make_task(cfg.data.task, **cfg.data.task_args)
    for key, (lo, hi) in [("data.train_difficulty", cfg.data.train_difficulty)] + [
            (f"data.eval_splits.{k}", v) for k, v in cfg.data.eval_splits.items()]:
        try:
            task.validate_difficulty(lo, hi)
        except DataError as e:
            raise ConfigError(f"{key}: {e}") from None
    return task


def make_model(cfg: Config, task: Task) -> LoopedTransformer:
    vocab = cfg.model.vocab_size or task.vocab_size
    if vocab < task.vocab_size:
        raise ConfigError(f"model.vocab_size ({vocab}) is smaller than task '{cfg.data.task}' needs "
                          f"({task.vocab_size}); set model.vocab_size=0 to take it from the task")
    return build_model(cfg.model, vocab, cfg.seed)


def make_eval_sets(cfg: Config, task: Task) -> dict[str, list[dict[str, np.ndarray]]]:
    return {name: eval_batches(task, name, (lo, hi), cfg.data.eval_examples, cfg.data.eval_batch_size, cfg.seed)
            for name, (lo, hi) in cfg.data.eval_splits.items()}


def abstract_like(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


def restore_params(cfg: Config, step: int | None = None) -> tuple[LoopedTransformer, Any, int]:
    """Model structure and trained params of a run (latest checkpoint, or ``step``)."""
    task = make_task_for(cfg)
    model = make_model(cfg, task)
    params = nnx.to_pure_dict(nnx.state(model))
    state = init_state(params, make_optimizer(cfg.train))
    ckpts = Checkpoints(cfg.run_dir / "checkpoints", keep=cfg.train.keep_checkpoints, async_save=False)
    try:
        restored = ckpts.restore(abstract_like(state), None, step=step)
    finally:
        ckpts.close()
    return model, restored["params"], int(restored["step"])


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    eval: dict[str, dict[str, float]] = field(default_factory=dict)
    sweep: list[dict[str, Any]] = field(default_factory=list)


def evaluate_all(evaluator: Evaluator, params: Any, eval_sets: dict[str, list], loops: dict[str, int] | None = None
                 ) -> dict[str, dict[str, float]]:
    return {name: evaluator.evaluate(params, batches, loops) for name, batches in eval_sets.items()}


def train(cfg: Config) -> TrainResult:
    """Train ``cfg`` from scratch, or resume its run directory from the latest checkpoint."""
    run_dir = prepare_run_dir(cfg)
    task = make_task_for(cfg)
    model = make_model(cfg, task)
    log(model.describe())
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    tx = make_optimizer(cfg.train)
    state = init_state(params, tx)
    seq_len = task.seq_len(cfg.data.train_difficulty[1])
    if cfg.data.batch_size % jax.process_count():
        raise ConfigError(f"data.batch_size ({cfg.data.batch_size}) must be divisible by the number of "
                          f"processes ({jax.process_count()})")
    data_it = train_iterator(task, tuple(cfg.data.train_difficulty), cfg.data.batch_size // jax.process_count(),
                             cfg.seed, shard_index=jax.process_index(), shard_count=jax.process_count())
    ckpts = Checkpoints(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints,
                        async_save=cfg.train.async_checkpoint)
    start = ckpts.latest_step()
    if start is not None:
        state = ckpts.restore(abstract_like(state), data_it, step=start)
        log(f"resumed {run_dir} from step {start}")
    start = int(state["step"])
    circuits = model.circuit_names
    dists = [model.circuit_configs[n].distribution() for n in circuits]
    schedule = learning_rate_schedule(cfg.train)
    train_step = make_train_step(graphdef, tx, dists, circuits, cfg.seed, cfg.train.grad_accum, schedule)
    evaluator = Evaluator(model)
    eval_sets = make_eval_sets(cfg, task)
    writer = MetricsWriter(run_dir, enabled=jax.process_index() == 0)
    progress = ProgressLine(cfg.train.steps, start)
    result = TrainResult(run_dir, start)

    def run_eval(step: int) -> None:
        result.eval = evaluate_all(evaluator, state["params"], eval_sets)
        scalars = {f"eval/{split}/{k}": v for split, m in result.eval.items() for k, v in m.items() if k != "examples"}
        if cfg.eval.diagnostics:
            first = next(iter(eval_sets.values()))[0]
            for name, stats in evaluator.diagnostics(state["params"], first).items():
                for stat, values in stats.items():
                    scalars[f"diag/{name}/{stat}"] = values[-1]
        writer.scalars(step, scalars)
        log(f"eval @ {step}: " + "  ".join(f"{s}: loss {m['loss']:.3f} acc {100 * m['accuracy']:.1f}%"
                                           for s, m in result.eval.items()))

    window_start, window_steps = time.time(), 0
    try:
        for step in range(start, cfg.train.steps):
            batch = next(data_it)
            state, metrics = train_step(state, batch)
            window_steps += 1
            done = step + 1
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                metrics = jax.device_get(metrics)
                elapsed = time.time() - window_start
                tok_s = window_steps * cfg.data.batch_size * seq_len / max(elapsed, 1e-9)
                scalars = {f"train/{k}": float(v) for k, v in metrics.items() if not k.startswith("loops/")}
                scalars.update({k: float(v) for k, v in metrics.items() if k.startswith("loops/")})
                scalars["train/tokens_per_s"] = tok_s
                if not np.isfinite(scalars["train/loss"]):
                    raise FloatingPointError(f"loss is {scalars['train/loss']} at step {done}; lower train.lr or "
                                             f"raise train.warmup_steps")
                writer.scalars(done, scalars)
                log(progress.format(done, {"loss": scalars["train/loss"], "accuracy": scalars["train/accuracy"]},
                                    tok_s, scalars["train/lr"], {n: int(metrics[f"loops/{n}"]) for n in circuits}))
                window_start, window_steps = time.time(), 0
            if done % cfg.train.eval_every == 0 or done == cfg.train.steps:
                run_eval(done)
            if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
                ckpts.save(done, state, data_it)
            result.step = done
        if start >= cfg.train.steps:
            log(f"{run_dir} is already trained to step {start} (train.steps={cfg.train.steps}); "
                f"raise train.steps to continue")
            run_eval(start)
        if cfg.eval.sweep_loops:
            result.sweep = final_sweep(evaluator, state["params"], eval_sets, cfg, model)
            (run_dir / "final_sweep.json").write_text(json.dumps(result.sweep, indent=1))
    finally:
        ckpts.close()
        writer.close()
    return result


def final_sweep(evaluator: Evaluator, params: Any, eval_sets: dict[str, list], cfg: Config,
                model: LoopedTransformer) -> list[dict[str, Any]]:
    """Accuracy on every split with all circuits at each count in ``eval.sweep_loops``; prints a table."""
    rows = []
    for n in cfg.eval.sweep_loops:
        loops = {c: n for c in model.circuit_names}
        for split, metrics in evaluate_all(evaluator, params, eval_sets, loops).items():
            rows.append({"loops": n, "split": split, **metrics})
    log(format_sweep_table(rows, cfg))
    return rows


def format_sweep_table(rows: list[dict[str, Any]], cfg: Config) -> str:
    splits = list(dict.fromkeys(r["split"] for r in rows))
    counts = list(dict.fromkeys(r["loops"] for r in rows))
    acc = {(r["loops"], r["split"]): r["accuracy"] for r in rows}
    means = sorted({round(c.distribution().mean(), 1) for c in cfg.model.circuits()})
    header = ["loops"] + [f"{s} {tuple(cfg.data.eval_splits[s])}" for s in splits]
    lines = [f"accuracy vs loop count (every circuit at n; training mean {', '.join(map(str, means))}; "
             f"difficulty [lo, hi] per split)",
             " | ".join(f"{h:>14}" for h in header)]
    for n in counts:
        lines.append(" | ".join([f"{n:>14}"] + [f"{100 * acc[(n, s)]:>13.1f}%" for s in splits]))
    return "\n".join(lines)
