"""Tiny runs shared by the analysis and command tests.

Its checkpoint holds randomised weights (every kernel ~ N(0, 1/fan_in), circuit writes included)
rather than a few training steps: circuits then change the output clearly, so ablations and loop
counts have visible effects, and no train step has to compile. The run directory is written with
the trainer's own pieces (config.yaml by `prepare_run_dir`, orbax checkpoint by `Checkpoints`);
tests/cli/test_end_to_end.py (slow) covers a run made by `train` itself.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from loopformer.config import load_config
from loopformer.data.sources import build_data
from loopformer.runs.checkpoint import Checkpoints
from loopformer.runs.prepare import prepare_run_dir
from loopformer.runs.restore import make_model
from loopformer.train.optim import make_optimizer
from loopformer.train.step import init_state

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
    "eval.diagnostics=false",
]
EXAMPLES = 40  # per split in the tests: 2 batches of 32 (the last one padded)
STEP = 7


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
def text_run_dir(tmp_path_factory):
    """A byte-level text run (the shipped corpus) with one 16-wide circuit."""
    return make_run(load_config("configs/text_bytes.yaml", [
        f"run.dir={tmp_path_factory.mktemp('analysis_runs')}", "run.name=text", "model.d_model=16", "model.heads=2",
        "model.prelude=1", "model.coda=0", "model.mlp_ratio=1", "model.stages.0.circuits.X.width=16",
        "model.stages.0.circuits.X.heads=2", "model.stages.0.circuits.X.mlp_ratio=1", "data.seq_len=32"]))


MIXTURE = [
    "model.causal=false", "data.task=mixture",
    "data.mixture=[{task: prefix_parity, train_difficulty: [1, 4], eval_splits: {train: [1, 4], 2x: [8, 8]}, "
    "route: [X]}, {task: maze, task_args: {rows: 2}, train_difficulty: [1, 3], eval_splits: {train: [1, 3]}, route: [Y]}]",
]


@pytest.fixture(scope="session")
def mixture_run_dir(tmp_path_factory):
    """The tiny run's model on a routed mixture of prefix_parity and 2-row mazes (vocab 5 + 12)."""
    return make_run(tiny_config(tmp_path_factory.mktemp("analysis_runs"), "mixture", *MIXTURE))
