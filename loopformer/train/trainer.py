"""The outer training loop: resume, train steps, periodic evaluation, checkpoints, logs.

The run directory's layout and the resume rules (what may change) are `loopformer.train.runs`.
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
from flax import nnx

from loopformer import parallel
from loopformer.config import Config
from loopformer.data.sources import build_data
from loopformer.evaluation.evaluator import Evaluator, evaluator_for
from loopformer.evaluation.metrics import text_metrics
from loopformer.evaluation.tables import format_table
from loopformer.flops import FlopCounter, peak_flops
from loopformer.model.describe import describe
from loopformer.model.exits import ExitRule
from loopformer.model.plan import resolve_loops
from loopformer.train.checkpoint import Checkpoints
from loopformer.train.metrics import MetricsWriter, ProgressLine
from loopformer.train.optim import learning_rate_schedule, make_optimizer
from loopformer.train.routing import Routing
from loopformer.train.runs import (
    abstract_like,
    describe_change,
    make_model,
    make_run_dir,
    prepare_run_dir,
    record_changes,
    run_lock,
)
from loopformer.train.step import FINITE, init_state, make_train_step


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    eval: dict[str, dict[str, float]] = field(default_factory=dict)
    sweep: list[dict[str, Any]] = field(default_factory=list)


def evaluate_all(evaluator: Evaluator, params: Any, eval_sets: dict[str, list], loops: dict[str, int],
                 bytes_per_token: dict[str, float | None] | None = None) -> dict[str, dict[str, float]]:
    """Metrics per split at ``loops`` (every circuit); with ``bytes_per_token`` (text) also bits_per_byte
    and perplexity."""
    bpt = bytes_per_token or {}
    out = {}
    for name, batches in eval_sets.items():
        m = evaluator.evaluate(params, batches, loops)
        mean_loops = m.pop("mean_loops")
        out[name] = text_metrics(m, bpt.get(name)) | {f"mean_loops/{c}": v for c, v in mean_loops.items()}
    return out


def _eval_line(metrics: dict[str, float]) -> str:
    if "bits_per_byte" in metrics:
        return f"loss {metrics['loss']:.3f} bpb {metrics['bits_per_byte']:.3f}"
    return f"loss {metrics['loss']:.3f} acc {100 * metrics['accuracy']:.1f}%"


class _Divergence:
    """Each step's on-device ``finite`` flag, collected without a host sync and checked (one sync)
    before anything is logged, evaluated or saved: a NaN or inf is reported at the step it happened,
    and no checkpoint after it is written, so the last good checkpoint is never rotated out by a bad one."""

    def __init__(self, last_saved: int | None):
        self.flags: list[tuple[int, Any]] = []
        self.last_saved = last_saved

    def add(self, step: int, finite: Any) -> None:
        self.flags.append((step, finite))

    def check(self) -> None:
        flags = [bool(f) for f in jax.device_get([f for _, f in self.flags])]
        steps = [s for s, _ in self.flags]
        self.flags = []
        if all(flags):
            return
        bad = steps[flags.index(False)]
        kept = (f"the last checkpoint, step {self.last_saved}, is kept and a rerun resumes from it"
                if self.last_saved is not None else "no checkpoint was written, so a rerun starts from scratch")
        raise FloatingPointError(f"training diverged at step {bad}: the loss or gradient is NaN or inf; nothing "
                                 f"from it was saved ({kept}); lower train.lr or raise train.warmup_steps "
                                 f"(or train.grad_clip) and rerun")

    def saved(self, step: int) -> None:
        self.last_saved = step


def train(cfg: Config) -> TrainResult:
    """Train ``cfg`` from scratch, or resume its run directory from the latest checkpoint. The run
    directory is locked for the whole call (`loopformer.train.runs.run_lock`): a second trainer on it
    stops with a ConfigError."""
    parallel.initialize_distributed()  # multi-process runs only; before any JAX computation
    with run_lock(make_run_dir(cfg)):
        return _train(cfg)


def _train(cfg: Config) -> TrainResult:
    run_dir, changes = prepare_run_dir(cfg)
    source = build_data(cfg)
    mesh = parallel.make_mesh(cfg.mesh)
    parallel.check_batch_size(cfg.data.batch_size, cfg.train.grad_accum, mesh)
    model = make_model(cfg, source)
    log(describe(cfg.model, model.vocab_size, model.param_counts()))
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
        if start < cfg.train.steps:  # a rerun that trains nothing changes nothing
            log(f"resumed {run_dir} from step {start}")
            for change in changes:
                log(f"  {describe_change(change)} from step {start}")
            record_changes(run_dir, start, changes)
    divergence = _Divergence(start)
    start = int(state["step"])
    training = start < cfg.train.steps
    circuits = model.circuit_names
    defaults = resolve_loops({c.name: c.eval_loops for c in cfg.model.circuits()})
    routing = Routing.of(cfg)
    if routing is not None:
        log(routing.describe(params))
    train_step = make_train_step(graphdef, tx, cfg.model, cfg.seed, cfg.train.grad_accum,
                                 learning_rate_schedule(cfg.train), state_shardings=shardings,
                                 batch_sharding=parallel.batch_sharding(mesh), total_steps=cfg.train.steps,
                                 routing=routing)
    evaluator = evaluator_for(model)
    host_sets = source.eval_sets()
    bytes_per_token = {name: source.bytes_per_token(batches) for name, batches in host_sets.items()}
    eval_sets = {name: [parallel.put_global_batch(b, mesh) for b in batches] for name, batches in host_sets.items()}
    flop_counter = FlopCounter(cfg.model, model.vocab_size, seq_len, causal=cfg.model.causal)
    # Steps logged after the checkpoint we resume from (before a crash) are trained again: drop them.
    writer = MetricsWriter(run_dir, enabled=jax.process_index() == 0 and training, resume_step=start)
    progress = ProgressLine(cfg.train.steps, start)
    result = TrainResult(run_dir, start)

    def run_eval(step: int) -> None:
        result.eval = evaluate_all(evaluator, state["params"], eval_sets, defaults, bytes_per_token)
        scalars = {f"eval/{split}/{k}": v for split, m in result.eval.items() for k, v in m.items() if k != "examples"}
        by_loops = {n: evaluate_all(evaluator, state["params"], eval_sets, {c: n for c in circuits}, bytes_per_token)
                    for n in cfg.data.eval_loops}
        scalars.update({f"eval/{split}/loops_{n}/{k}": v for n, res in by_loops.items() for split, m in res.items()
                        for k, v in m.items() if k != "examples"})
        halting = cfg.model.halting_circuit()
        if halting is not None and halting.halting.kind != "act":  # the learned exit at its default quantile
            rule = {halting.name: ExitRule("learned", halting.halting.q)}
            for split, batches in eval_sets.items():
                m = evaluator.evaluate(state["params"], batches, defaults, exits=rule)
                scalars[f"eval/{split}/learned/accuracy"] = m["accuracy"]
                scalars[f"eval/{split}/learned/mean_loops"] = m["mean_loops"][halting.name]
            hist = evaluator.examples(state["params"], next(iter(eval_sets.values())), defaults, exits=rule)["histogram"]
            writer.histogram(step, f"halting/{halting.name}/exit_iteration", hist[halting.name])
        if cfg.eval.diagnostics and circuits:
            first = next(iter(eval_sets.values()))[0]
            for name, stats in evaluator.diagnostics(state["params"], first, defaults).items():
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
            done = step + 1
            divergence.add(done, metrics.pop(FINITE))
            window_steps += 1
            window_loops.append([metrics[f"loops/{n}"] for n in circuits])
            last = done == cfg.train.steps
            evaluate = cfg.train.eval_every and (done % cfg.train.eval_every == 0 or last)
            save = done % cfg.train.checkpoint_every == 0 or last
            if done % cfg.train.log_every == 0 or last or evaluate or save:
                divergence.check()  # one host sync, only at these steps
            if done % cfg.train.log_every == 0 or last:
                metrics = jax.device_get(metrics)
                elapsed = time.time() - window_start
                tok_s = window_steps * cfg.data.batch_size * seq_len / max(elapsed, 1e-9)
                scalars = {f"train/{k}": float(v) for k, v in metrics.items() if not k.startswith("loops/")}
                scalars.update({k: float(v) for k, v in metrics.items() if k.startswith("loops/")})
                scalars["train/tokens_per_s"] = tok_s
                if bytes_per_token.get("train"):  # text: at the train eval windows' bytes per token
                    scalars["train/bits_per_byte"] = scalars["train/loss"] / bytes_per_token["train"] / math.log(2)
                loops_seen = np.asarray(jax.device_get(window_loops), np.float64).reshape(window_steps, len(circuits))
                peak, _ = peak_flops(cfg.model.compute_dtype)
                step_flops = float(np.sum(flop_counter.train(loops_seen)))
                scalars["train/mfu"] = step_flops * cfg.data.batch_size * seq_len / max(elapsed, 1e-9) / peak
                writer.scalars(done, scalars)
                shown = ({"loss": scalars["train/loss"], "bpb": scalars["train/bits_per_byte"]}
                         if "train/bits_per_byte" in scalars else
                         {"loss": scalars["train/loss"], "accuracy": scalars["train/accuracy"]})
                log(progress.format(done, shown,
                                    tok_s, scalars["train/lr"], {n: int(metrics[f"loops/{n}"]) for n in circuits}))
                window_start, window_steps, window_loops = time.time(), 0, []
            if evaluate:
                run_eval(done)
            if save and ckpts.save(done, state, data_it):
                divergence.saved(done)
            result.step = done
        if start >= cfg.train.steps:
            log(f"{run_dir} is already trained to step {start} (train.steps={cfg.train.steps}); "
                f"raise train.steps to continue")
            if cfg.train.eval_every:
                run_eval(start)
        if cfg.eval.sweep_loops:
            result.sweep = final_sweep(evaluator, state["params"], eval_sets, cfg, bytes_per_token)
            if jax.process_index() == 0:
                (run_dir / "final_sweep.json").write_text(json.dumps(result.sweep, indent=1))
    finally:
        ckpts.close()
        writer.close()
    return result


def final_sweep(evaluator: Evaluator, params: Any, eval_sets: dict[str, list], cfg: Config,
                bytes_per_token: dict[str, float | None] | None = None) -> list[dict[str, Any]]:
    """Accuracy (text: also bits per byte) on every split with the circuits of ``eval.sweep_circuits``
    (default: all) at each count in ``eval.sweep_loops``, the others at their eval_loops; prints a table."""
    defaults = {c.name: c.eval_loops for c in cfg.model.circuits()}
    rows = []
    for n in cfg.eval.sweep_loops:
        loops = resolve_loops(defaults, {c: n for c in cfg.eval.sweep_circuits or defaults})
        for split, metrics in evaluate_all(evaluator, params, eval_sets, loops, bytes_per_token).items():
            rows.append({"loops": n, "split": split, **metrics})
    log(format_sweep_table(rows, cfg))
    return rows


def format_sweep_table(rows: list[dict[str, Any]], cfg: Config) -> str:
    """The end-of-training sweep: one row per loop count, one column per split."""
    splits = list(dict.fromkeys(r["split"] for r in rows))
    counts = list(dict.fromkeys(r["loops"] for r in rows))
    swept = [c for c in cfg.model.circuits() if not cfg.eval.sweep_circuits or c.name in cfg.eval.sweep_circuits]
    means = sorted({round(c.distribution().mean(), 1) for c in swept})
    who = "every circuit" if len(swept) == len(cfg.model.circuits()) else "+".join(c.name for c in swept)
    value = {(r["loops"], r["split"]): r for r in rows}
    if rows and "bits_per_byte" in rows[0]:
        title = f"bits per byte vs loop count ({who} at n; training mean {', '.join(map(str, means))})"
        header = ["loops", *splits]
        cells = [[n] + [f"{value[(n, s)]['bits_per_byte']:.4f}" for s in splits] for n in counts]
    else:
        title = (f"accuracy vs loop count ({who} at n; training mean {', '.join(map(str, means))}; "
                 f"difficulty [lo, hi] per split)")
        ranges = cfg.data.split_ranges()
        header = ["loops"] + [f"{s} {tuple(ranges[s])}" if ranges.get(s) else s for s in splits]
        cells = [[n] + [f"{100 * value[(n, s)]['accuracy']:.1f}%" for s in splits] for n in counts]
    return title + "\n" + format_table(header, cells)
