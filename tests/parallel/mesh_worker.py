"""Run in a subprocess with 8 CPU devices (``JAX_NUM_CPU_DEVICES=8``) by tests/test_parallel.py:

    python tests/parallel/mesh_worker.py 8,1,1 2,4,1 2,2,2

On each mesh given (data,fsdp,tensor), two train steps (AdamW, grad_accum 2) equal the
single-device run: loss and gradient norm of each step, the gradients themselves (after one step
Adam's first moment is exactly (1 - b1) x the clipped gradient, so comparing it compares every
gradient leaf), and the parameters after two steps. Parameters and optimizer state carry the
expected shardings. A checkpoint written on the first mesh restores onto the last one (onto one
device when only one mesh is given): new layout, same values, and the next step matches. One
compiled step per mesh keeps it quick. Exits non-zero on failure.
"""

import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from loopformer import parallel
from loopformer.config import MeshConfig, load_config
from loopformer.data.pipeline import train_iterator
from loopformer.data.sources import build_data
from loopformer.runs.checkpoint import Checkpoints, abstract_like
from loopformer.runs.restore import make_model
from loopformer.train.optim import learning_rate_schedule, make_optimizer
from loopformer.train.step import StepSettings, init_state, make_train_step

CONFIG = [
    "model.vocab_size=32", "model.d_model=32", "model.heads=2", "model.prelude=1", "model.coda=0", "model.mlp_ratio=2",
    # X and Y have one shape: they run batched (weights stacked [C=2, depth=1, ...] inside the step)
    "model.stages=[{circuits: [{name: X, depth: 1, width: 16, heads: 2, mlp_ratio: 2, loops: 'uniform(1, 3)', "
    "backprop: 2}, {name: Y, depth: 1, width: 16, heads: 2, mlp_ratio: 2, loops: 'uniform(2, 4)', backprop: 2}]}]",
    "data.task=pointer_chase", "model.window=0",
    "data.task_args={num_nodes: 5, num_symbols: 6}", "data.train_difficulty=[1, 2]", "data.eval_splits={train: [1, 2]}",
    "data.batch_size=16",
    "train.grad_accum=2", "train.warmup_steps=1", "train.steps=10", "train.progressive=0", "train.iteration_loss=0",
]


def close(a, b, what, rtol=2e-5, atol=2e-6):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if not np.allclose(x, y, rtol=rtol, atol=atol):
            raise AssertionError(f"{what}{jax.tree_util.keystr(path)}: max |diff| {np.abs(x - y).max():.3g}")


def main(meshes: list[tuple[int, int, int]]) -> int:
    assert jax.device_count() == 8, jax.devices()
    t0 = time.time()
    cfg = load_config("configs/quickstart.yaml", CONFIG)
    data = build_data(cfg)
    task = data.task
    # Abstract model + random host values: no eager initialisation (hundreds of tiny compiles on CPU).
    model = nnx.eval_shape(lambda: make_model(cfg, data))
    graphdef, abstract = nnx.split(model)
    rng = np.random.default_rng(0)
    host_params = jax.tree_util.tree_map_with_path(
        lambda path, x: np.ones(x.shape, x.dtype) if "scale" in jax.tree_util.keystr(path)
        else (0.1 * rng.standard_normal(x.shape)).astype(x.dtype), nnx.to_pure_dict(abstract))
    tx = make_optimizer(cfg.train)
    it = train_iterator(task, tuple(cfg.data.train_difficulty), cfg.data.batch_size, cfg.seed)
    batches = [next(it) for _ in range(3)]

    def run(mesh):
        shardings = parallel.train_state_shardings(model, tx, mesh)
        state = parallel.shard_train_state(jax.tree.map(np.array, host_params), lambda p: init_state(p, tx), shardings)
        settings = StepSettings(cfg.model, learning_rate_schedule(cfg.train), cfg.seed, cfg.train.grad_accum)
        step = make_train_step(graphdef, tx, settings, state_shardings=shardings,
                               batch_sharding=parallel.batch_sharding(mesh))
        metrics, moments = [], None
        for b in batches[:2]:
            state, m = step(state, parallel.put_batch(b, mesh))
            metrics.append(jax.device_get(m))
            if moments is None:  # after step 1: mu = (1 - b1) * clip(grad)
                moments = jax.tree.map(np.asarray, state["opt_state"][1][0].mu)
        return {"metrics": metrics, "grads": moments, "state": state, "step": step, "shardings": shardings}

    ref = run(parallel.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]))
    print(f"single device: step losses {[float(m['loss']) for m in ref['metrics']]} ({time.time() - t0:.1f}s)",
          flush=True)
    runs = {}
    for shape in meshes:
        mesh = parallel.make_mesh(MeshConfig(*shape))
        out = runs[shape] = run(mesh)
        for m, r in zip(out["metrics"], ref["metrics"], strict=True):
            for k in ("loss", "grad_norm", "accuracy", "loops/X", "loops/Y"):
                np.testing.assert_allclose(m[k], r[k], rtol=1e-5, err_msg=f"{shape} {k}")
        close(out["grads"], ref["grads"], f"{shape} gradient ")
        close(out["state"]["params"], ref["state"]["params"], f"{shape} params after 2 steps ", rtol=1e-4, atol=1e-5)
        # Layouts: what the rules promise, for parameters and their Adam moments alike.
        p, sh = out["state"]["params"], out["shardings"]
        qkv = p["stages"][0]["circuits"]["Y"]["blocks"]["attn"]["qkv"]["kernel"]  # [D=1, w, 3w]
        emb = p["embed"]["embedding"]  # [vocab, d_model]
        want_qkv = {(8, 1, 1): P(), (2, 4, 1): P(None, "fsdp"), (2, 2, 2): P(None, "fsdp", "tensor")}[shape]
        want_emb = {(8, 1, 1): P(), (2, 4, 1): P(None, "fsdp"), (2, 2, 2): P("tensor", "fsdp")}[shape]
        assert qkv.sharding.spec == want_qkv, (shape, qkv.sharding.spec)
        assert emb.sharding.spec == want_emb, (shape, emb.sharding.spec)
        mu = out["state"]["opt_state"][1][0].mu
        assert mu["embed"]["embedding"].sharding.spec == want_emb, mu["embed"]["embedding"].sharding
        for x, s in zip(jax.tree.leaves(out["state"]), jax.tree.leaves(sh), strict=True):
            assert x.sharding == s, (x.sharding, s)
        print(f"mesh {shape}: equal to single device ({time.time() - t0:.1f}s)", flush=True)

    # Save on the first mesh, restore onto the last: new layout, same values, and the next step matches.
    source = meshes[0]
    target = runs[meshes[-1]] if len(meshes) > 1 else ref
    with tempfile.TemporaryDirectory() as tmp:
        with Checkpoints(tmp, async_save=False) as ckpts:
            ckpts.save(2, runs[source]["state"])
        with Checkpoints(tmp, async_save=False) as ckpts:
            restored = ckpts.restore(abstract_like(target["state"]))
    for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(target["shardings"]), strict=True):
        assert x.sharding == s, (x.sharding, s)
    close(restored, ref["state"], "restored ", rtol=1e-4, atol=1e-5)
    state, m = target["step"](restored, parallel.put_batch(batches[2], target["state"]["step"].sharding.mesh))
    _, r = ref["step"](ref["state"], parallel.put_batch(batches[2], ref["state"]["step"].sharding.mesh))
    np.testing.assert_allclose(m["loss"], r["loss"], rtol=1e-5)
    dest = meshes[-1] if len(meshes) > 1 else "one device"
    print(f"checkpoint {source} -> {dest}: restored and continued ({time.time() - t0:.1f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main([tuple(int(v) for v in arg.split(",")) for arg in sys.argv[1:]] or [(8, 1, 1), (2, 4, 1), (2, 2, 2)]))
