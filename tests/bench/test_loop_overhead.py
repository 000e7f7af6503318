"""bench/loop_overhead.py's baseline: the Python-unrolled loop computes what the model's own loop does."""

import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
import _common as C  # noqa: E402
import loop_overhead  # noqa: E402

from loopformer.model.plan import make_plan  # noqa: E402


def test_python_unrolled_matches_the_scan_loop_and_its_gradient():
    size = dict(C.SIZES["tiny"], seq=8, batch=2)
    n = 5
    cfg = C.model_config(size, depth=1, loops=f"fixed({n})", backprop=3)
    model, graphdef, params = loop_overhead.build(cfg, size)
    tokens = C.synthetic_batch(size)["inputs"]
    plan = make_plan(["X"], {"X": n})

    def loss(p):
        logits = nnx.merge(graphdef, nnx.State(p))(tokens, plan)[0]
        return (logits.astype(np.float32) ** 2).mean()

    ref_loss, ref_grad = jax.jit(jax.value_and_grad(loss))(params)
    with loop_overhead.python_unrolled(n):
        got_loss, got_grad = jax.jit(jax.value_and_grad(loss))(params)  # traced while the swap is active
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(got_grad), jax.tree.leaves(ref_grad), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
