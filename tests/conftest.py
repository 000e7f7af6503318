"""The one tiny config (`TINY`) and the runs the tests share.

`run_dir` (and the text and mixture runs): a checkpoint of randomised weights (every kernel ~
N(0, 1/fan_in), circuit writes included) rather than a few training steps: circuits then change the
output clearly, so ablations and loop counts have visible effects, and no train step has to compile.
The run directory is written with the trainer's own pieces (config.yaml by `prepare_run_dir`, orbax
checkpoint by `Checkpoints`). `run` is it loaded once for every test that reads it in-process.

`trained_run`: the tiny config trained by `train` itself for 4 steps, once per session, for the tests
that need a real run (resume, continue, the run directory's files, eval of a trained run). Tests read
it as it is; a test that trains on or damages a run works on a copy (`copy_run`).

Compiling dominates the suite's time on CPU, so before JAX starts this file sets two things (a
variable you set yourself wins): XLA's cheap compile settings (the tests check numbers, not speed; the
multi-device subprocesses of tests/test_parallel.py use the same) and JAX's persistent compilation
cache in .pytest_cache/jax (a program compiled once, by any test, any worker or an earlier run, is
read back instead of compiled again: every `train` call and every analysis command builds new jitted
functions, so without it each one compiled the same programs again).
"""

import os
import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from loopformer.config import load_config
from loopformer.data.sources import build_data
from loopformer.evaluation.run import load_run
from loopformer.model import plan as plan_module
from loopformer.runs.checkpoint import Checkpoints
from loopformer.runs.prepare import prepare_run_dir
from loopformer.runs.read import read_run
from loopformer.runs.restore import make_model
from loopformer.train import trainer
from loopformer.train.optim import make_optimizer
from loopformer.train.step import init_state
from loopformer.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
# Set before the first computation starts JAX's backend (importing jax, flax or loopformer does not).
# XLA CPU's fusion emitters (the default since JAX 0.5) compile a test-sized program about 1.6x slower than the
# classic ones and the suite is mostly compiling: off here, which changes no result a test checks.
FAST_XLA = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
            "--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = f"{FAST_XLA} {os.environ.get('XLA_FLAGS', '')}".strip()  # flags you set come later and win
# the commands the tests start would each check these flags in a child process (`xla_flags_refused`, ~2 s): the
# suite's own start of the backend checks them once
os.environ["LOOPFORMER_XLA_FLAGS_CHECKED"] = os.environ["XLA_FLAGS"]
if not jax.config.jax_compilation_cache_dir:  # JAX_COMPILATION_CACHE_DIR, if you set it, is used as it is
    jax.config.update("jax_compilation_cache_dir", str(ROOT / ".pytest_cache" / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # every program, however quick
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # of any size
# No size limit (JAX's default): a limit turns on the cache's LRU eviction, which lists and stats every entry under a
# file lock at each write, ~0.3 s per write once the suite has written its ~2,000 programs (a quarter of the suite's
# time). Without the lock a pytest-xdist worker may read an entry the other is still writing: JAX then warns,
# compiles the program itself and carries on.
# A suite started as a background job without job control (`nohup ... &`, some CI runners) inherits SIGINT
# ignored, and Python then never delivers it: the tests of Ctrl-C handling need it delivered as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Compacted inference in two buffer sizes (the whole batch, a quarter of its rows and of its tokens) instead of
# 4 x 4 (`Plan.compact_shares`): every compacted program traces and compiles a branch per size, and the logits
# and counts the tests check do not depend on the sizes (the tests of the sizes themselves give theirs).
plan_module.COMPACT_SHARES = (1, 4)

# Two same-shape circuits (run batched under one vmap) on slices of a 16-wide stream.
TINY = [
    "model.d_model=16", "model.heads=2", "model.prelude=1", "model.coda=0", "model.mlp_ratio=1",
    "model.stages=[{circuits: ["
    "{name: X, depth: 1, width: 8, heads: 2, mlp_ratio: 1, loops: 'uniform(1, 3)', eval_loops: 2, backprop: 1}, "
    "{name: Y, depth: 1, width: 8, heads: 2, mlp_ratio: 1, loops: 'fixed(2)', eval_loops: 3, backprop: 1}]}]",
    "data.task=pointer_chase", "model.window=0",
    "data.task_args={num_nodes: 5, num_symbols: 6}", "data.train_difficulty=[1, 2]",
    "data.eval_splits={train: [1, 2], hard: [4, 4]}", "data.batch_size=8", "data.eval_examples=16",
    "data.eval_batch_size=32", "train.steps=3", "train.lr=0.03", "train.warmup_steps=1", "train.log_every=3",
    "train.eval_every=3", "train.checkpoint_every=3", "train.async_checkpoint=false", "eval.sweep_loops=[]",
    "eval.diagnostics=false", "train.progressive=0",  # the quickstart's progressive loss doubles a step's cost
    "train.iteration_loss=0", "train.iteration_loss_circuit=",  # the quickstart's window of 4: X here has backprop 1
]
# TINY's task settings back at their defaults: what a text run built from TINY adds (a text run refuses them)
TASK_DEFAULTS = ["data.task_args={}", "data.train_difficulty=[1, 4]", "data.eval_splits={train: [1, 4]}"]
EXAMPLES = 40  # per split in the tests: 2 batches of 32 (the last one padded)
STEP = 7


# The test files that take longest (on a 2-core CPU, of the fast suite and of the slow one), longest first. CI's
# pytest-xdist (--dist loadfile) hands whole files to the two workers in collection order, so a long file that
# is collected last runs alone at the end (the slow suite's router training did: ~100 s with one core idle).
# Collected first, the long files run side by side and the short ones fill in after them.
LONGEST_FIRST = ("train/test_router_training.py", "test_parallel.py", "train/test_ema.py", "model/test_adaptive.py",
                 "cli/test_commands.py", "inference/test_decode.py", "train/test_trainer.py", "train/test_recipes.py",
                 "model/test_model.py", "model/test_attend.py", "variants/test_position.py", "variants/test_variants.py")


def pytest_collection_modifyitems(config, items):
    rank = {ROOT / "tests" / f: i for i, f in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path, len(rank)))  # stable: the rest keep their order


def tiny_config(root, name="tiny", *extra):
    return load_config("configs/quickstart.yaml", [*TINY, f"run.dir={root}", f"run.name={name}", *extra])


def random_state(abstract, seed=1):
    """A train state shaped like ``abstract`` (no JAX compile): kernels ~ N(0, 1/fan_in), embeddings
    ~ N(0, 1), norm scales 1, optimizer state 0. At init the circuit writes are zero and change
    nothing; here every circuit changes the output."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = str(path[-1])
        if path[0].key == "params" and name in ("['kernel']", "['embedding']"):
            std = 1.0 / np.sqrt(x.shape[-2]) if name == "['kernel']" else 1.0
            return (std * rng.standard_normal(x.shape)).astype(x.dtype)
        if path[0].key == "params" and name == "['scale']":
            return np.ones(x.shape, x.dtype)
        return np.zeros(x.shape, x.dtype)

    return {**jax.tree_util.tree_map_with_path(leaf, abstract), "step": np.asarray(STEP, np.int32)}


def make_run(cfg):
    """Write a run directory as the trainer would (config, data files, checkpoint at STEP)."""
    prepare_run_dir(cfg)
    data, tx = build_data(cfg), make_optimizer(cfg.train)
    data.save(cfg.run_dir)
    abstract = jax.eval_shape(lambda: init_state(nnx.to_pure_dict(nnx.state(make_model(cfg, data))), tx))
    with Checkpoints(cfg.run_dir / "checkpoints", async_save=False) as ckpts:
        ckpts.save(STEP, jax.tree.map(jax.numpy.asarray, random_state(abstract)))
    return cfg.run_dir


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    return make_run(tiny_config(tmp_path_factory.mktemp("analysis_runs")))


@pytest.fixture(scope="session")
def run(run_dir):
    """`run_dir` loaded (model, params, evaluator): read it, do not change it."""
    return load_run(read_run(run_dir))


# `trained_run`: every step logged, checkpoints and evaluations (with diagnostics) at steps 2 and 4.
TRAINED = ["train.steps=4", "train.checkpoint_every=2", "train.eval_every=2", "train.log_every=1",
           "eval.diagnostics=true"]


def train_until_crash(cfg, step, monkeypatch):
    """Train ``cfg`` with a crash raised when the state reaches ``step`` (after the checkpoints before it),
    as a killed trainer would leave the run; the real train step is put back afterwards."""
    real = trainer.make_train_step

    def crashing(*a, **k):
        step_fn = real(*a, **k)

        def crashing_step(state, batch):
            if int(state["step"]) == step:
                raise RuntimeError("simulated crash")
            return step_fn(state, batch)
        return crashing_step

    monkeypatch.setattr(trainer, "make_train_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg)
    monkeypatch.setattr(trainer, "make_train_step", real)


def trained_config(root, name="trained", *extra):
    """`trained_run`'s config in ``root``/``name`` (``extra`` on top). The same settings compile the same
    programs, so training with them again reads every program from the compilation cache."""
    return tiny_config(root, name, *TRAINED, *extra)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """The tiny config trained by `train` for 4 steps (a TrainResult): read it, do not change it."""
    return train(trained_config(tmp_path_factory.mktemp("trained_runs")))


def copy_run(result, root, name="trained"):
    """A copy of a trained run in ``root``/``name`` with config.yaml saying so, as if it had been trained
    there (a resume sees no run.dir change); returns its directory."""
    dst = Path(root) / name
    shutil.copytree(result.run_dir, dst)
    (dst / "config.yaml").write_text(load_config(dst / "config.yaml", [f"run.dir={root}", f"run.name={name}"]).to_yaml())
    return dst


@pytest.fixture(scope="session")
def text_run_dir(tmp_path_factory):
    """A byte-level text run (the shipped corpus) with one 16-wide circuit."""
    return make_run(load_config("configs/text_bytes.yaml", [
        f"run.dir={tmp_path_factory.mktemp('analysis_runs')}", "run.name=text", "model.d_model=16", "model.heads=2",
        "model.prelude=1", "model.coda=0", "model.mlp_ratio=1", "model.stages.0.circuits.X.width=16",
        "model.stages.0.circuits.X.heads=2", "model.stages.0.circuits.X.mlp_ratio=1", "data.seq_len=32"]))


MIXTURE = [
    *TASK_DEFAULTS, "model.causal=false", "data.task=mixture",
    "data.mixture=[{task: prefix_parity, train_difficulty: [1, 4], eval_splits: {train: [1, 4], 2x: [8, 8]}, "
    "route: [X]}, {task: maze, task_args: {rows: 2}, train_difficulty: [1, 3], eval_splits: {train: [1, 3]}, route: [Y]}]",
]


@pytest.fixture(scope="session")
def mixture_run_dir(tmp_path_factory):
    """The tiny run's model on a routed mixture of prefix_parity and 2-row mazes (vocab 5 + 12)."""
    return make_run(tiny_config(tmp_path_factory.mktemp("analysis_runs"), "mixture", *MIXTURE))
