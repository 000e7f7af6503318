"""The outer training loop: run directory, resume, train steps, periodic eval, checkpoints, logs.

    <run.dir>/<run.name>/
      config.yaml      resolved config (a resume refuses a different model)
      checkpoints/     orbax: params, optimizer, step, grain iterator state
      tb/              tensorboard events
      metrics.jsonl    one JSON object per logged step
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml
from flax import nnx

from loopformer import parallel
from loopformer.analysis.evaluate import Evaluator
from loopformer.config import Config, config_from_dict
from loopformer.data.pipeline import eval_batches
from loopformer.data.sources import DataSource, TaskSource, build_data, text_metrics
from loopformer.data.tasks import Task
from loopformer.errors import CheckpointError, ConfigError
from loopformer.flops import FlopCounter, peak_flops
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
        probe = run_dir / f".write_test.{jax.process_index()}"
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
    if jax.process_index() == 0:
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
    """The synthetic task of ``cfg`` (ConfigError for data.task=text: use ``build_data``)."""
    return TaskSource(cfg).task


def make_model(cfg: Config, task: Task | DataSource) -> LoopedTransformer:
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


def restore_params(cfg: Config, step: int | None = None, data: DataSource | None = None
                   ) -> tuple[LoopedTransformer, Any, int]:
    """Model structure and trained params of a run (latest checkpoint, or ``step``).

    The model and train state are only *shaped* (``eval_shape``: no initialisation is computed),
    so opening a run is fast; the returned model is abstract: use it for its structure (graphdef,
    circuit names, config) and pass the returned params to it."""
    model = nnx.eval_shape(lambda: make_model(cfg, data if data is not None else build_data(cfg)))
    params = nnx.to_pure_dict(nnx.state(model))
    state = jax.eval_shape(lambda p: init_state(p, make_optimizer(cfg.train)), params)
    ckpts = Checkpoints(cfg.run_dir / "checkpoints", keep=cfg.train.keep_checkpoints, async_save=False)
    try:
        restored = ckpts.restore(state, None, step=step)
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


def evaluate_all(evaluator: Evaluator, params: Any, eval_sets: dict[str, list], loops: dict[str, int] | None = None,
                 bytes_per_token: dict[str, float | None] | None = None) -> dict[str, dict[str, float]]:
    """Metrics per split; with ``bytes_per_token`` (text) also bits_per_byte and perplexity."""
    bpt = bytes_per_token or {}
    return {name: text_metrics(evaluator.evaluate(params, batches, loops), bpt.get(name))
            for name, batches in eval_sets.items()}


def _eval_line(metrics: dict[str, float]) -> str:
    if "bits_per_byte" in metrics:
        return f"loss {metrics['loss']:.3f} bpb {metrics['bits_per_byte']:.3f}"
    return f"loss {metrics['loss']:.3f} acc {100 * metrics['accuracy']:.1f}%"


def train(cfg: Config) -> TrainResult:
    """Train ``cfg`` from scratch, or resume its run directory from the latest checkpoint."""
    parallel.initialize_distributed()  # multi-process runs only; before any JAX computation
    run_dir = prepare_run_dir(cfg)
    source = build_data(cfg)
    mesh = parallel.make_mesh(cfg.mesh)
    parallel.check_batch_size(cfg.data.batch_size, cfg.train.grad_accum, mesh)
    model = make_model(cfg, source)
    log(model.describe())
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    tx = make_optimizer(cfg.train)
    shardings = parallel.train_state_shardings(model, tx, mesh)
    state = parallel.shard_train_state(params, lambda p: init_state(p, tx), shardings)
    log(f"{parallel.describe_mesh(mesh)}; {parallel.describe_sharding(params, shardings['params'])}")
    seq_len = source.seq_len
    data_it = source.train_iterator(cfg.data.batch_size // jax.process_count(), cfg.seed,
                                    shard_index=jax.process_index(), shard_count=jax.process_count())
    if jax.process_index() == 0:
        source.save(run_dir)  # text: tokenizer.json, next to the checkpoints
    if source.describe():
        log(source.describe())
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
    train_step = make_train_step(graphdef, tx, dists, circuits, cfg.seed, cfg.train.grad_accum, schedule,
                                 state_shardings=shardings, batch_sharding=parallel.batch_sharding(mesh))
    evaluator = Evaluator(model)
    host_sets = source.eval_sets()
    bytes_per_token = {name: source.bytes_per_token(batches) for name, batches in host_sets.items()}
    eval_sets = {name: [parallel.put_global_batch(b, mesh) for b in batches] for name, batches in host_sets.items()}
    flop_counter = FlopCounter(cfg.model, model.vocab_size, seq_len, causal=cfg.model.causal)
    writer = MetricsWriter(run_dir, enabled=jax.process_index() == 0)
    progress = ProgressLine(cfg.train.steps, start)
    result = TrainResult(run_dir, start)

    def run_eval(step: int) -> None:
        result.eval = evaluate_all(evaluator, state["params"], eval_sets, None, bytes_per_token)
        scalars = {f"eval/{split}/{k}": v for split, m in result.eval.items() for k, v in m.items() if k != "examples"}
        by_loops = {n: evaluate_all(evaluator, state["params"], eval_sets, {c: n for c in circuits}, bytes_per_token)
                    for n in cfg.data.eval_loops}
        scalars.update({f"eval/{split}/loops_{n}/{k}": v for n, res in by_loops.items() for split, m in res.items()
                        for k, v in m.items() if k != "examples"})
        if cfg.eval.diagnostics:
            first = next(iter(eval_sets.values()))[0]
            for name, stats in evaluator.diagnostics(state["params"], first).items():
                for stat, values in stats.items():
                    scalars[f"diag/{name}/{stat}"] = values[-1]
        writer.scalars(step, scalars)
        log(f"eval @ {step}: " + "  ".join(f"{s}: {_eval_line(m)}" for s, m in result.eval.items()))
        for n, res in by_loops.items():
            log(f"  loops={n}: " + "  ".join(f"{s}: {_eval_line(m)}" for s, m in res.items()))

    window_start, window_steps, window_loops = time.time(), 0, []
    try:
        for step in range(start, cfg.train.steps):
            batch = parallel.put_batch(next(data_it), mesh)
            state, metrics = train_step(state, batch)
            window_steps += 1
            window_loops.append([metrics[f"loops/{n}"] for n in circuits])
            done = step + 1
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                metrics = jax.device_get(metrics)
                elapsed = time.time() - window_start
                tok_s = window_steps * cfg.data.batch_size * seq_len / max(elapsed, 1e-9)
                scalars = {f"train/{k}": float(v) for k, v in metrics.items() if not k.startswith("loops/")}
                scalars.update({k: float(v) for k, v in metrics.items() if k.startswith("loops/")})
                scalars["train/tokens_per_s"] = tok_s
                if bytes_per_token.get("train"):  # text: at the train eval windows' bytes per token
                    scalars["train/bits_per_byte"] = scalars["train/loss"] / bytes_per_token["train"] / math.log(2)
                step_flops = flop_counter.train(np.asarray(jax.device_get(window_loops), np.float64))
                peak, _ = peak_flops(cfg.model.compute_dtype)
                scalars["train/mfu"] = float(np.sum(step_flops)) * cfg.data.batch_size * seq_len / max(elapsed, 1e-9) / peak
                if not np.isfinite(scalars["train/loss"]):
                    raise FloatingPointError(f"loss is {scalars['train/loss']} at step {done}; lower train.lr or "
                                             f"raise train.warmup_steps")
                writer.scalars(done, scalars)
                shown = ({"loss": scalars["train/loss"], "bpb": scalars["train/bits_per_byte"]}
                         if "train/bits_per_byte" in scalars else
                         {"loss": scalars["train/loss"], "accuracy": scalars["train/accuracy"]})
                log(progress.format(done, shown,
                                    tok_s, scalars["train/lr"], {n: int(metrics[f"loops/{n}"]) for n in circuits}))
                window_start, window_steps, window_loops = time.time(), 0, []
            if cfg.train.eval_every and (done % cfg.train.eval_every == 0 or done == cfg.train.steps):
                run_eval(done)
            if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
                ckpts.save(done, state, data_it)
            result.step = done
        if start >= cfg.train.steps:
            log(f"{run_dir} is already trained to step {start} (train.steps={cfg.train.steps}); "
                f"raise train.steps to continue")
            if cfg.train.eval_every:
                run_eval(start)
        if cfg.eval.sweep_loops:
            result.sweep = final_sweep(evaluator, state["params"], eval_sets, cfg, model, bytes_per_token)
            if jax.process_index() == 0:
                (run_dir / "final_sweep.json").write_text(json.dumps(result.sweep, indent=1))
    finally:
        ckpts.close()
        writer.close()
    return result


def final_sweep(evaluator: Evaluator, params: Any, eval_sets: dict[str, list], cfg: Config,
                model: LoopedTransformer, bytes_per_token: dict[str, float | None] | None = None
                ) -> list[dict[str, Any]]:
    """Accuracy (text: also bits per byte) on every split with the circuits of ``eval.sweep_circuits``
    (default: all) at each count in ``eval.sweep_loops``, the others at their eval_loops; prints a table."""
    rows = []
    for n in cfg.eval.sweep_loops:
        loops = {c: n for c in cfg.eval.sweep_circuits or model.circuit_names}
        for split, metrics in evaluate_all(evaluator, params, eval_sets, loops, bytes_per_token).items():
            rows.append({"loops": n, "split": split, **metrics})
    log(format_sweep_table(rows, cfg))
    return rows


def format_sweep_table(rows: list[dict[str, Any]], cfg: Config) -> str:
    splits = list(dict.fromkeys(r["split"] for r in rows))
    counts = list(dict.fromkeys(r["loops"] for r in rows))
    swept = [c for c in cfg.model.circuits() if not cfg.eval.sweep_circuits or c.name in cfg.eval.sweep_circuits]
    means = sorted({round(c.distribution().mean(), 1) for c in swept})
    who = "every circuit" if len(swept) == len(cfg.model.circuits()) else "+".join(c.name for c in swept)
    if rows and "bits_per_byte" in rows[0]:
        bpb = {(r["loops"], r["split"]): r["bits_per_byte"] for r in rows}
        lines = [f"bits per byte vs loop count ({who} at n; training mean {', '.join(map(str, means))})",
                 " | ".join(f"{h:>10}" for h in ["loops", *splits])]
        lines += [" | ".join([f"{n:>10}"] + [f"{bpb[(n, s)]:>10.4f}" for s in splits]) for n in counts]
        return "\n".join(lines)
    acc = {(r["loops"], r["split"]): r["accuracy"] for r in rows}
    header = ["loops"] + [f"{s} {tuple(cfg.data.eval_splits[s])}" for s in splits]
    lines = [f"accuracy vs loop count ({who} at n; training mean {', '.join(map(str, means))}; "
             f"difficulty [lo, hi] per split)",
             " | ".join(f"{h:>14}" for h in header)]
    for n in counts:
        lines.append(" | ".join([f"{n:>14}"] + [f"{100 * acc[(n, s)]:>13.1f}%" for s in splits]))
    return "\n".join(lines)
