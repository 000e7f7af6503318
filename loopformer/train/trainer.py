"""The outer training loop: resume, train steps, periodic evaluation, checkpoints, logs.

The run directory (its layout, the resume rules: what may change, the lock) is `loopformer.runs`.
`train` starts or resumes a run (`_initial`, `_resume`) and hands the step loop to `_Loop`, which logs,
evaluates and saves at the configured steps.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shlex
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from loopformer import jsontext, parallel
from loopformer.config import Change, Config
from loopformer.data.sources import TEXT_TASK, DataSource, build_data, prepared_dir
from loopformer.data.text import META_FILE
from loopformer.errors import CheckpointError, ConfigError
from loopformer.evaluation.evaluator import Evaluator, evaluator_for
from loopformer.evaluation.tables import caps_note, format_table, score, score_name
from loopformer.flops import PEAK_ENV, FlopCounter, peak_flops, peak_override
from loopformer.metrics import text_metrics
from loopformer.model.attend import attention_overflow, memory_bytes, scores_bytes
from loopformer.model.describe import describe
from loopformer.model.plan import default_exit_cap, difficulty_rules, exit_caps, resolve_loops
from loopformer.model.transformer import LoopedTransformer
from loopformer.runs import stop
from loopformer.runs.checkpoint import Checkpoints, abstract_like
from loopformer.runs.layout import RunDir, replace_file
from loopformer.runs.lock import run_lock, shared
from loopformer.runs.log import log, log_to
from loopformer.runs.prepare import describe_change, make_run_dir, prepare_run_dir, record_changes, write_config
from loopformer.runs.restore import EMA_WEIGHTS, make_model
from loopformer.runs.scalars import MetricsWriter, read_metrics
from loopformer.train.optim import make_optimizer
from loopformer.train.progress import ProgressLine
from loopformer.train.step import FINITE, State, StepSettings, init_state, make_train_step
from loopformer.variants.exits import exit_rule

# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    eval: dict[str, dict[str, float]] = field(default_factory=dict)
    sweep: list[dict[str, Any]] = field(default_factory=list)


def evaluate_all(evaluator: Evaluator, params: Any, eval_sets: dict[str, list], loops: dict[str, int],
                 bytes_per_token: dict[str, float | None] | None = None,
                 by_difficulty: dict[str, tuple[float, float, int]] | None = None) -> dict[str, dict[str, float]]:
    """Metrics per split at ``loops`` (every circuit; ``by_difficulty``: those circuits' counts per example,
    as `Evaluator.evaluate`); with ``bytes_per_token`` (text) also bits_per_byte and perplexity."""
    bpt = bytes_per_token or {}
    out = {}
    for name, batches in eval_sets.items():
        m = evaluator.evaluate(params, batches, loops, by_difficulty=by_difficulty)
        mean_loops, computed = m.pop("mean_loops"), m.pop("computed_loops")
        out[name] = (text_metrics(m, bpt.get(name)) | {f"mean_loops/{c}": v for c, v in mean_loops.items()}
                     | {f"computed_loops/{c}": v for c, v in computed.items()})
    return out


def eval_weights(state: State) -> tuple[Any, str]:
    """The weights evaluation reads, and their name for the log: the EMA weights (train.ema) when the
    state holds them ("EMA weights"), else the params ("": the plain case is not named)."""
    return (state["ema"], EMA_WEIGHTS) if "ema" in state else (state["params"], "")


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


def _reading_corpus(cfg: Config) -> contextlib.AbstractContextManager:
    """A shared lock on the prepared corpus that data.paths names, for the training: `prepare --force` refuses to
    replace it meanwhile (it did, and the run went on, and resumed, on the new corpus without a word)."""
    corpus = prepared_dir(cfg) if cfg.data.task == TEXT_TASK else None
    return shared(corpus / META_FILE) if corpus is not None else contextlib.nullcontext()


def train(cfg: Config) -> TrainResult:
    """Train ``cfg`` from scratch, or resume its run directory from the latest checkpoint. The run
    directory is locked for the whole call (`loopformer.runs.lock.run_lock`): a second trainer on it
    stops with a ConfigError. Progress is logged to stdout."""
    parallel.initialize_distributed()  # multi-process runs only; before any JAX computation
    peak_override()  # a bad LOOPFORMER_PEAK_FLOPS, before anything is written (it failed at the first logged step)
    fresh = not cfg.run_dir.exists()
    with log_to("stdout"), _disk_full(cfg.run_dir), run_lock(make_run_dir(cfg)) as lock:
        try:
            with _reading_corpus(cfg):
                return _train(cfg)
        except BaseException:
            if fresh and jax.process_count() == 1:
                _discard_unused(cfg.run_dir, lock)
            raise


def _discard_unused(run_dir: Path, lock: Path) -> None:
    """Remove the run directory this call created when it holds no file but ``lock`` (a config refused for its
    data, memory or disk space before anything was written): the folder is not left behind. Called while
    holding the lock; the lock file is unlinked before it is released (as `exclusive(remove=True)` does)."""
    if any(p.is_file() and p != lock for p in run_dir.rglob("*")):
        return
    for child in run_dir.iterdir():
        if child != lock:
            shutil.rmtree(child, ignore_errors=True)
    with contextlib.suppress(OSError):  # something else appeared meanwhile: leave it
        lock.unlink()
        run_dir.rmdir()


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


@contextlib.contextmanager
def _disk_full(run_dir: Path) -> Iterator[None]:
    """A disk that fills (or turns read-only) while the run writes its metrics, tensorboard files, config or
    final sweep, as one CheckpointError naming the run directory; checkpoints say so themselves, before writing."""
    try:
        yield
    except OSError as e:
        if e.errno not in _DISK_FULL:
            raise
        what = f"writing {e.filename}" if e.filename else f"writing into {run_dir}"
        steps = RunDir(run_dir).checkpoint_steps()
        resumes = f"it resumes from step {max(steps)}" if steps else "it starts again (no checkpoint was written)"
        fix = "make it writable" if e.errno == errno.EROFS else f"free some space (df -h {shlex.quote(str(run_dir))})"
        raise CheckpointError(f"{what} failed ({e.strerror}); {fix} and train again: {resumes}") from None


@dataclass
class _Initial:
    """A freshly initialised train state and what it was built from."""

    model: LoopedTransformer
    graphdef: nnx.GraphDef
    params: Any  # the initial params (a pure dict)
    tx: optax.GradientTransformation
    shardings: Any  # of the train state, on the mesh
    state: State


def _initial(cfg: Config, source: DataSource, mesh: jax.sharding.Mesh) -> _Initial:
    """The model of ``cfg`` (described in the log) and its initial train state, sharded on ``mesh``."""
    model = make_model(cfg, source)
    beyond = [i for i in cfg.data.stop_ids if i >= model.vocab_size]
    if beyond:  # only `generate` reads them, and it refused them after the training (#27 pass 33)
        raise ConfigError(f"data.stop_ids {beyond} are not token ids of this model (vocabulary {model.vocab_size}), so "
                          f"`generate` could never stop at them; give ids below {model.vocab_size}, or [] (the "
                          f"tokenizer's end-of-text)")
    counts = model.param_counts()
    log(describe(cfg.model, model.vocab_size, counts))
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    tx = make_optimizer(cfg.train)
    ema = cfg.train.ema > 0
    _check_state_fits(cfg, sum(counts.values()), mesh)
    shardings = parallel.train_state_shardings(model, tx, mesh, ema=ema)
    state = parallel.shard_train_state(params, lambda p: init_state(p, tx, ema), shardings)
    log(f"{parallel.describe_mesh(mesh)}; {parallel.describe_sharding(params, shardings['params'])}")
    return _Initial(model, graphdef, params, tx, shardings, state)


def _train_iterator(cfg: Config, source: DataSource, run_dir: Path) -> Any:
    """This process's shard of the training stream; the data files (text: tokenizer.json) are saved
    with the run and the source described in the log."""
    data_it = source.train_iterator(cfg.data.batch_size // jax.process_count(), cfg.seed,
                                    shard_index=jax.process_index(), shard_count=jax.process_count())
    if jax.process_index() == 0:
        source.save(run_dir)  # text: tokenizer.json, next to the checkpoints
    if source.describe():
        log(source.describe())
    return data_it


def _resume(ckpts: Checkpoints, state: State, data_it: Any, cfg: Config, run_dir: Path,
            changes: list[Change]) -> tuple[State, int | None]:
    """(the state of the latest checkpoint, or ``state`` when there is none; that checkpoint's step).
    A resume that trains on logs and records what it changes (``changes``). EMA weights (train.ema)
    turned on where the checkpoint has none start from its params; turned off, they are dropped (both
    logged). A run already trained keeps the checkpoint's as they are, for its evaluation."""
    start = ckpts.latest_step()
    if start is None:
        return state, None
    trains_on = start < cfg.train.steps  # a rerun that trains nothing changes nothing
    saved = ckpts.saved_parts(start)
    wanted = {k: v for k, v in state.items() if k != "ema"}
    if "ema" in saved and ("ema" in state or not trains_on):
        wanted["ema"] = state["params"]  # restored onto the params' shapes and shardings
    # partial: a checkpoint's EMA weights that are not wanted are not read
    restored = ckpts.restore(abstract_like(wanted), data_it, step=start, partial="ema" in saved and "ema" not in wanted,
                             step_key="step")
    if trains_on:
        log(f"resumed {run_dir} from step {start}")
        for change in changes:
            log(f"  {describe_change(change)} from step {start}")
        if "ema" in state and "ema" not in saved:
            restored["ema"] = jax.tree.map(jnp.copy, restored["params"])
            log(f"  train.ema: checkpoint step {start} has no EMA weights; their average starts from its params")
        elif "ema" in saved and "ema" not in state:
            log(f"  train.ema: the EMA weights of checkpoint step {start} are dropped; evaluation uses the params")
        record_changes(run_dir, start, changes)
    return restored, start


@dataclass
class _Evals:
    """The eval splits, on device, and each split's text bytes per token (None: not text)."""

    sets: dict[str, list]
    bytes_per_token: dict[str, float | None]

    @classmethod
    def of(cls, source: DataSource, mesh: jax.sharding.Mesh) -> _Evals:
        host_sets = source.eval_sets()
        bytes_per_token = {name: source.bytes_per_token(batches) for name, batches in host_sets.items()}
        return cls({name: [parallel.put_global_batch(b, mesh) for b in batches] for name, batches in host_sets.items()},
                   bytes_per_token)


class _Window:
    """The steps since the last train log: wall time, count, and each step's loop counts (on device)."""

    def __init__(self) -> None:
        self.start, self.steps, self.loops = time.time(), 0, []

    def add(self, metrics: dict[str, Any], circuits: list[str]) -> None:
        self.steps += 1
        self.loops.append([metrics[f"loops/{n}"] for n in circuits])


def _train(cfg: Config) -> TrainResult:
    run_dir, changes = prepare_run_dir(cfg, write=False)  # config.yaml is written once everything accepted cfg
    read_metrics(run_dir)  # a metrics.jsonl damaged by hand is refused (naming its line) before anything is written
    source = build_data(cfg)
    mesh = parallel.make_mesh(cfg.mesh)
    parallel.check_batch_size(cfg.data.batch_size, cfg.train.grad_accum, mesh)
    _check_attention_fits(cfg, source, mesh)
    init = _initial(cfg, source, mesh)
    ckpts = Checkpoints(RunDir(run_dir).checkpoints, keep=cfg.train.keep_checkpoints,
                        async_save=cfg.train.async_checkpoint)
    if (ckpts.latest_step() or 0) < cfg.train.steps:  # before any step is trained and lost at the first save
        ckpts.check_room(init.state, str(run_dir))
    data_it = _train_iterator(cfg, source, run_dir)
    evaluator, evals = evaluator_for(init.model), _Evals.of(source, mesh)
    state, restored = _resume(ckpts, init.state, data_it, cfg, run_dir, changes)
    if cfg.train.stage == "gate" and restored is None:
        raise ConfigError(f"train.stage=gate trains the exit gate of a trained model, but {run_dir} has no checkpoint: "
                          f"train it first (train.stage=all), then resume with more train.steps and train.stage=gate")
    write_config(cfg, run_dir)  # data, model and checkpoint took it: a resume that failed left config.yaml as it was
    start = int(state["step"])
    settings = StepSettings.of(cfg)
    if settings.routing is not None:
        log(settings.routing.describe(init.params))
    train_step = make_train_step(init.graphdef, init.tx, settings, state_shardings=init.shardings,
                                 batch_sharding=parallel.batch_sharding(mesh))
    flop_counter = FlopCounter(cfg.model, init.model.vocab_size, source.seq_len, causal=cfg.model.causal)
    # Steps logged after the checkpoint we resume from (before a crash) are trained again: drop them.
    writer = MetricsWriter(run_dir, enabled=jax.process_index() == 0 and start < cfg.train.steps, resume_step=start)
    loop = _Loop(cfg, train_step, data_it, mesh, ckpts, _Divergence(restored), evaluator, evals, writer,
                 ProgressLine(cfg.train.steps, start), flop_counter, source.seq_len, init.model.circuit_names,
                 TrainResult(run_dir, start))
    try:
        state = loop.run(state, start)
        loop.finish(state, start)
    finally:
        ckpts.close()
        writer.close()
    return loop.result


def _check_state_fits(cfg: Config, params: int, mesh: jax.sharding.Mesh) -> None:
    """ConfigError, before the state is allocated, when the float32 params, AdamW's two moments, the gradient
    (and the EMA weights) cannot fit in the mesh's memory even spread evenly: XLA would wait for memory that never
    comes (a hang that ignores SIGTERM, seen with model.d_model=1000000)."""
    copies = 4 + (cfg.train.ema > 0)
    need, memory = 4 * params * copies, memory_bytes() * mesh.devices.size
    if need > memory:
        raise ConfigError(f"the model has {params:,} parameters: its training state ({copies} float32 copies: params, "
                          f"gradient, AdamW's two moments{', EMA' if copies > 4 else ''}) takes {need / 2**30:,.1f} GiB, "
                          f"more than the {memory / 2**30:,.0f} GiB of memory here; lower model.d_model or the "
                          f"layer counts")


def _check_attention_fits(cfg: Config, source: DataSource, mesh: jax.sharding.Mesh) -> None:
    """ConfigError, before anything is written, when one attention layer over a training or an eval batch would not
    fit in a device's memory (a lower bound of a step's need): a clear line instead of an out-of-memory traceback
    at the first step, or (an eval split of a synthetic task reaching past training's lengths) a traceback while its
    examples are built."""
    heads, dp = cfg.model.max_heads, parallel.data_parallel_size(mesh)
    micro = max(cfg.data.batch_size // cfg.train.grad_accum // dp, 1)
    for rows, what, seq_len, setting in ((micro, "data.batch_size", source.seq_len, 0),
                                         (cfg.data.eval_batch_size, "data.eval_batch_size", source.eval_seq_len, 1)):
        too_big = attention_overflow(rows, seq_len, heads)
        if not too_big:
            continue
        accum = " (or raise train.grad_accum)" if what == "data.batch_size" else ""
        fit = memory_bytes() // 2 // scores_bytes(1, seq_len, heads)  # rows of seq_len tokens that fit
        if fit < 1:  # not even one sequence: the length is what to lower (a batch of one does not fit either: the
            # line said "or data.batch_size", and a task's length at difficulty 1 was "lower data.train_difficulty"
            # where only its task_args set it; #27 pass 38)
            longest = math.isqrt(memory_bytes() // 2 // scores_bytes(1, 1, heads))  # tokens of one sequence that fit
            length = source.length_settings(longest)[setting]
            where = f"{length}={seq_len}" if length == "data.seq_len" else f"{length} (sequences of {seq_len:,} tokens)"
            raise ConfigError(f"{where}: {too_big}; lower {length}")
        length = source.length_settings()[setting]
        # the batch is what to lower (the longest sequence that fits a huge batch, "1 tokens", is no advice)
        total = fit * (cfg.train.grad_accum * dp if what == "data.batch_size" else 1)
        size = cfg.data.batch_size if what == "data.batch_size" else rows
        raise ConfigError(f"{what}={size}: attention over {seq_len:,} tokens in batches of {rows:,} needs about "
                          f"{scores_bytes(rows, seq_len, heads) / 2**30:,.0f} GiB, more than half of this machine's "
                          f"{memory_bytes() / 2**30:.0f} GiB; at {seq_len:,} tokens ({length}) at most {total:,} fit: "
                          f"lower {what}{accum}")
    window = cfg.iteration_window()
    if window:  # the logits after each of the window's W iterations, with their softmax and gradient: an
        # out-of-memory traceback at the first step (#27 pass 41)
        W, vocab = window[1], source.vocab_size
        need = 3 * 4 * W * micro * source.seq_len * vocab
        if need > memory_bytes() // 2:
            fit = max(memory_bytes() // 2 // (3 * 4 * micro * source.seq_len * vocab), 0)
            raise ConfigError(f"train.iteration_loss={W}: the logits after each of the last {W} iterations ({micro:,} "
                              f"rows of {source.seq_len:,} tokens over a vocabulary of {vocab:,}) need about "
                              f"{need / 2**30:,.0f} GiB, more than half of this machine's {memory_bytes() / 2**30:.0f} "
                              f"GiB; at most {fit:,} fit: lower train.iteration_loss (or data.batch_size)")


@dataclass
class _Loop:
    """The step loop and what it does at the configured steps: log, evaluate, save."""

    cfg: Config
    train_step: Callable[[State, Any], tuple[State, dict[str, Any]]]
    data_it: Any
    mesh: jax.sharding.Mesh
    ckpts: Checkpoints
    divergence: _Divergence
    evaluator: Evaluator
    evals: _Evals
    writer: MetricsWriter
    progress: ProgressLine
    flop_counter: FlopCounter
    seq_len: int
    circuits: list[str]
    result: TrainResult
    defaults: dict[str, int] = field(init=False)
    mfu_warned: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.defaults = resolve_loops({c.name: c.eval_loops for c in self.cfg.model.circuits()})

    def run(self, state: State, start: int) -> State:
        """Train from step ``start`` to train.steps; returns the last state."""
        t = self.cfg.train
        window = _Window()
        for step in range(start, t.steps):
            stop.check()  # a signal whose exception Python dropped still stops training here
            batch = parallel.put_batch(next(self.data_it), self.mesh)
            state, metrics = self.train_step(state, batch)
            done = step + 1
            self.divergence.add(done, metrics.pop(FINITE))
            window.add(metrics, self.circuits)
            last = done == t.steps
            evaluate = t.eval_every and (done % t.eval_every == 0 or last)
            save = done % t.checkpoint_every == 0 or last
            if done % t.log_every == 0 or last or evaluate or save:
                self.divergence.check()  # one host sync, only at these steps
            if done % t.log_every == 0 or last:
                self.log_train(done, metrics, window)
                window = _Window()
            if evaluate:
                self.evaluate(state, done)
            if save and self.ckpts.save(done, state, self.data_it):
                self.divergence.saved(done)
            self.result.step = done
        return state

    def finish(self, state: State, start: int) -> None:
        """After the steps: a run already trained says so (and evaluates); the final sweep."""
        cfg = self.cfg
        if start >= cfg.train.steps:
            log(f"{self.result.run_dir} is already trained to step {start} (train.steps={cfg.train.steps}); "
                f"raise train.steps to continue")
            if cfg.train.eval_every:
                self.evaluate(state, start)
        if cfg.eval.sweep_loops and not cfg.model.circuits():  # e.g. the quickstart's config with model.stages=[]
            log(f"no final sweep: eval.sweep_loops={cfg.eval.sweep_loops} sweeps circuits' loop counts, and this model "
                f"has none")
        elif cfg.eval.sweep_loops:
            params, weights = eval_weights(state)
            if weights:
                log(f"final sweep ({weights}):")
            self.result.sweep = final_sweep(self.evaluator, params, self.evals.sets, cfg,
                                            self.evals.bytes_per_token)
            if jax.process_index() == 0:
                path = RunDir(self.result.run_dir).final_sweep
                data = json.dumps(self.result.sweep, indent=1).encode()
                # a run trained on here has new weights, and so a new sweep; a rerun that trains nothing says what its
                # other eval settings replaced
                earlier = replaced_sweep(path, self.result.sweep) if start >= cfg.train.steps else None
                replace_file(path, data)
                if earlier:
                    log(earlier)

    def log_train(self, done: int, metrics: dict[str, Any], window: _Window) -> None:
        """Write the train scalars of step ``done`` and print the progress line."""
        metrics = jax.device_get(metrics)
        scalars = self.train_scalars(metrics, window)
        self.writer.scalars(done, scalars)
        shown = ({"loss": scalars["train/loss"], "bpb": scalars["train/bits_per_byte"]}
                 if "train/bits_per_byte" in scalars else
                 {"loss": scalars["train/loss"], "accuracy": scalars["train/accuracy"]})
        log(self.progress.format(done, shown, scalars["train/tokens_per_s"], scalars["train/lr"],
                                 {n: int(metrics[f"loops/{n}"]) for n in self.circuits}))

    def train_scalars(self, metrics: dict[str, Any], window: _Window) -> dict[str, float]:
        """train/* (the step's metrics, throughput, model FLOPs utilisation over ``window``) and loops/*."""
        cfg, seq_len = self.cfg, self.seq_len
        elapsed = time.time() - window.start
        tok_s = window.steps * cfg.data.batch_size * seq_len / max(elapsed, 1e-9)
        scalars = {f"train/{k}": float(v) for k, v in metrics.items() if not k.startswith("loops/")}
        scalars.update({k: float(v) for k, v in metrics.items() if k.startswith("loops/")})
        scalars["train/tokens_per_s"] = tok_s
        bytes_per_token = self.evals.bytes_per_token
        if bytes_per_token.get("train"):  # text: at the train eval windows' bytes per token
            scalars["train/bits_per_byte"] = scalars["train/loss"] / bytes_per_token["train"] / math.log(2)
        loops_seen = np.asarray(jax.device_get(window.loops), np.float64).reshape(window.steps, len(self.circuits))
        peak, source = peak_flops(cfg.model.compute_dtype)
        # the gate stage runs the LM forward only (no gradient reaches its weights)
        count = self.flop_counter.forward if cfg.train.stage == "gate" else self.flop_counter.train
        step_flops = float(np.sum(count(loops_seen)))
        scalars["train/mfu"] = step_flops * cfg.data.batch_size * seq_len / max(elapsed, 1e-9) / peak
        if scalars["train/mfu"] > 1 and source == PEAK_ENV and not self.mfu_warned:
            # past 100 % only a peak given below the device's own can give (a measured one varies with the load)
            self.mfu_warned = True
            log(f"warning: train/mfu is {scalars['train/mfu']:.3g} (past 100 %): {PEAK_ENV}={os.environ[PEAK_ENV]} "
                f"is below what this device does; give its peak per device in FLOP/s, or unset it")
        return scalars

    def evaluate(self, state: State, step: int) -> None:
        """The periodic evaluation (of `eval_weights`): every split at the default loops (``result.eval``)
        and at each count of data.eval_loops; a halting circuit's learned exit; diagnostics. Logged and written."""
        cfg, evals = self.cfg, self.evals
        params, weights = eval_weights(state)
        self.result.eval = evaluate_all(self.evaluator, params, evals.sets, self.defaults, evals.bytes_per_token,
                                        difficulty_rules(self.cfg.model))  # per_difficulty circuits: their rule
        scalars = {f"eval/{split}/{k}": v for split, m in self.result.eval.items() for k, v in m.items()
                   if k != "examples"}
        by_loops = {n: evaluate_all(self.evaluator, params, evals.sets, {c: n for c in self.circuits},
                                    evals.bytes_per_token) for n in cfg.data.eval_loops}
        scalars.update({f"eval/{split}/loops_{n}/{k}": v for n, res in by_loops.items() for split, m in res.items()
                        for k, v in m.items() if k != "examples"})
        scalars.update(self.learned_exit_scalars(params, step))
        scalars.update(self.diagnostic_scalars(params))
        self.writer.scalars(step, scalars)
        at = f"{step} ({weights})" if weights else step
        log(f"eval @ {at}: " + "  ".join(f"{s}: {_eval_line(m)}" for s, m in self.result.eval.items()))
        for n, res in by_loops.items():
            log(f"  loops={n}: " + "  ".join(f"{s}: {_eval_line(m)}" for s, m in res.items()))

    def learned_exit_scalars(self, params: Any, step: int) -> dict[str, float]:
        """A halting circuit (not act): accuracy and mean loops with its learned exit at its default
        quantile; the histogram of exit iterations is written at ``step``."""
        halting = self.cfg.model.halting_circuit()
        if halting is None or halting.halting.rule().mixes_output:
            return {}
        rule = {halting.name: exit_rule("learned", halting.halting.rule().default_q())}
        if rule[halting.name].first_stop() >= default_exit_cap(halting):
            return {}  # a cap of 1: no token can stop before it (`exit_caps` refuses the rule there)
        caps = self.defaults | exit_caps(self.cfg.model, rule, {})  # the same cap as eval --exit
        scalars = {}
        for split, batches in self.evals.sets.items():
            m = self.evaluator.evaluate(params, batches, caps, exits=rule)
            scalars[f"eval/{split}/learned/accuracy"] = m["accuracy"]
            scalars[f"eval/{split}/learned/mean_loops"] = m["mean_loops"][halting.name]
        first = next(iter(self.evals.sets.values()))
        hist = self.evaluator.examples(params, first, caps, exits=rule)["histogram"]
        self.writer.histogram(step, f"halting/{halting.name}/exit_iteration", hist[halting.name])
        return scalars

    def diagnostic_scalars(self, params: Any) -> dict[str, float]:
        """eval.diagnostics: each circuit's last-iteration statistics on the first eval batch."""
        if not (self.cfg.eval.diagnostics and self.circuits):
            return {}
        first = next(iter(self.evals.sets.values()))[0]
        return {f"diag/{name}/{stat}": values[-1]
                for name, stats in self.evaluator.diagnostics(params, first, self.defaults).items()
                for stat, values in stats.items()}


def final_sweep(evaluator: Evaluator, params: Any, eval_sets: dict[str, list], cfg: Config,
                bytes_per_token: dict[str, float | None] | None = None) -> list[dict[str, Any]]:
    """Accuracy (text: also bits per byte) on every split with the circuits of ``eval.sweep_circuits``
    (default: all) at each count in ``eval.sweep_loops``, the others at their eval_loops; prints a table."""
    defaults = {c.name: c.eval_loops for c in cfg.model.circuits()}
    swept = cfg.eval.sweep_circuits or list(defaults)
    rules = difficulty_rules(cfg.model)  # circuits not swept keep their rule; a swept one's rule is the row "auto"
    rows = []
    for n in [*cfg.eval.sweep_loops, *(["auto"] if any(c in rules for c in swept) else [])]:
        auto = n == "auto"
        loops = defaults if auto else resolve_loops(defaults, {c: n for c in swept})
        fixed = {c: r for c, r in rules.items() if auto or c not in swept}
        for split, metrics in evaluate_all(evaluator, params, eval_sets, loops, bytes_per_token, fixed).items():
            rows.append({"loops": n, "split": split, **metrics})
    with log_to("stdout"):  # the trainer's output, also when called on its own
        log(format_sweep_table(rows, cfg))
    return rows


def format_sweep_table(rows: list[dict[str, Any]], cfg: Config) -> str:
    """The end-of-training sweep: one row per loop count, one column per split."""
    splits = list(dict.fromkeys(r["split"] for r in rows))
    counts = list(dict.fromkeys(r["loops"] for r in rows))
    swept = [c for c in cfg.model.circuits() if not cfg.eval.sweep_circuits or c.name in cfg.eval.sweep_circuits]
    labels = {c.name: str(c.distribution()) if c.distribution().per_example else str(round(c.distribution().mean(), 1))
              for c in swept}
    # one value where they agree; else each circuit's by name (they were sorted as text without names: circuits A, B,
    # C of means 5, 2 and 1 read "training mean 1.0, 2.0, 5.0", A's as 1.0; #27 pass 40)
    means = (list(labels.values())[:1] if len(set(labels.values())) == 1
             else [f"{name} {label}" for name, label in labels.items()])
    who = "every circuit" if len(swept) == len(cfg.model.circuits()) else "+".join(c.name for c in swept)
    value = {(r["loops"], r["split"]): r for r in rows}
    what = {"bits/byte": "bits per byte", "accuracy": "accuracy"}.get(score_name(rows), "accuracy (bits per byte on "
                                                                                         "text splits)")
    ranges = cfg.data.split_ranges()
    title = (f"{what} vs loop count ({who} at n; training mean {', '.join(map(str, means))}"
             + caps_note(cfg.model, [c.name for c in cfg.model.circuits()], "; {}")
             + ("; difficulty [lo, hi] per split)" if any(ranges.get(s) for s in splits) else ")"))
    header = ["loops"] + [f"{s} {tuple(ranges[s])}" if ranges.get(s) else s for s in splits]
    cells = [[n] + [score(value[(n, s)]) for s in splits] for n in counts]
    return title + "\n" + format_table(header, cells)


def _sweep_held(rows: list[dict[str, Any]]) -> str:
    """What a final sweep holds, in a few words: its loop counts and splits."""
    loops = list(dict.fromkeys(str(r.get("loops")) for r in rows))
    splits = list(dict.fromkeys(str(r.get("split")) for r in rows))
    return f"loops {', '.join(loops)} on {', '.join(splits)}"


def replaced_sweep(path: Path, rows: list[dict[str, Any]]) -> str | None:
    """The line for a ``final_sweep.json`` that a rerun replaces with other rows, or None (no file, the same rows, or
    an earlier file that is not a sweep). A rerun with other eval settings replaced it without a word (#27 pass 40's
    leftover); the checkpoint is unchanged, so the line names what it held, and a rerun with the earlier settings
    writes it back (the weights are the same), where a copy kept aside would be one more file to go stale."""
    try:
        old = jsontext.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(old, list) or not all(isinstance(r, dict) for r in old) or old == json.loads(json.dumps(rows)):
        return None
    was, now = _sweep_held(old), _sweep_held(rows)
    what = f"it held {was}, now {now}" if was != now else f"its numbers changed ({now})"
    return (f"replaced {path.name}: {what} (the eval settings of this rerun; the weights are unchanged, so a rerun "
            f"with the earlier settings writes the earlier sweep back)")
