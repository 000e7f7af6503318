"""Loss and the jitted train step.

Training state is explicit and pure: ``{"params": dict, "opt_state": optax state, "step": int32}``;
the model's structure (an nnx GraphDef) is static and merged with the params inside the step.
The step samples each circuit's loop count from (seed, step), so the counts are identical on
every process and replayed exactly after a resume.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from loopformer.model.loop import LoopDistribution, sample_loop_counts

Array = jax.Array
Batch = dict[str, Array]
State = dict[str, Any]


def answer_sums(logits_BTV: Array, batch: Batch, loss_scale: Array | float = 1.0) -> dict[str, Array]:
    """Sums over answer tokens (mask == 1) of one batch:

    loss_sum (cross-entropy), tokens, token_correct, examples (rows with any answer token) and
    example_correct (rows whose every answer token is right: exact match).
    """
    mask = batch["mask"].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])
    right_BT = jnp.argmax(logits_BTV, axis=-1) == batch["targets"]
    has_answer = (mask.sum(-1) > 0).astype(jnp.float32)
    all_right = _rows_right(right_BT, mask).astype(jnp.float32)
    return {"loss_sum": jnp.sum(ce * mask) * loss_scale, "tokens": mask.sum(),
            "token_correct": jnp.sum(right_BT.astype(jnp.float32) * mask),
            "examples": has_answer.sum(), "example_correct": all_right.sum()}


def exact_match(logits_BTV: Array, batch: Batch) -> Array:
    """bool [B]: every answer token (mask == 1) of the row is the argmax; False for rows without one."""
    return _rows_right(jnp.argmax(logits_BTV, axis=-1) == batch["targets"], batch["mask"])


def _rows_right(right_BT: Array, mask_BT: Array) -> Array:
    """bool [B]: rows with at least one answer token, all of them right."""
    return jnp.all(right_BT | (mask_BT == 0), axis=-1) & (mask_BT.sum(-1) > 0)


def packing(batch: Batch) -> dict[str, Array | None]:
    """Model keywords of a packed text batch: its ``positions`` and ``segment_ids`` [B, T] (None if absent)."""
    return {"positions_BT": batch.get("positions"), "segment_ids_BT": batch.get("segment_ids")}


def summarize(sums: dict[str, Array | float]) -> dict[str, float]:
    """Turn `answer_sums` totals into loss / accuracy / token_accuracy."""
    tokens, examples = max(float(sums["tokens"]), 1.0), max(float(sums["examples"]), 1.0)
    return {"loss": float(sums["loss_sum"]) / tokens, "accuracy": float(sums["example_correct"]) / examples,
            "token_accuracy": float(sums["token_correct"]) / tokens}


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, dists: list[LoopDistribution],
                    circuit_names: list[str], seed: int, grad_accum: int,
                    schedule: optax.Schedule, state_shardings: Any = None,
                    batch_sharding: jax.sharding.NamedSharding | None = None,
                    ) -> Callable[[State, Batch], tuple[State, dict[str, Array]]]:
    """Build ``train_step(state, batch) -> (state, metrics)``, jitted with the state donated.

    The global batch [B, T] is split into ``grad_accum`` micro-batches run under ``lax.scan``;
    each micro-batch loss is normalised by the answer tokens of the *whole* batch, so the summed
    gradient equals the gradient of the full-batch mean loss exactly.

    On a device mesh (`loopformer.parallel`): ``state_shardings`` pins the state's layout in and
    out of the step (it never drifts between steps), and ``batch_sharding`` (rows over data/fsdp)
    keeps every micro-batch split over the same devices.
    """

    def train_step(state: State, batch: Batch) -> tuple[State, dict[str, Array]]:
        step, params = state["step"], state["params"]
        loops = sample_loop_counts(dists, seed, step)
        key = jax.random.fold_in(jax.random.key(seed), step)
        total_tokens = jnp.maximum(batch["mask"].sum(), 1.0)
        micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)
        if batch_sharding is not None:
            spec = jax.sharding.PartitionSpec(None, *batch_sharding.spec)
            micro = jax.lax.with_sharding_constraint(micro, jax.sharding.NamedSharding(batch_sharding.mesh, spec))

        def loss_fn(p: Any, mb: Batch) -> tuple[Array, dict[str, Array]]:
            logits, _ = nnx.merge(graphdef, p)(mb["inputs"], loops=loops, train=True, key=key, **packing(mb))
            sums = answer_sums(logits, mb, 1.0 / total_tokens)
            return sums["loss_sum"], sums

        def accumulate(grads: Any, mb: Batch) -> tuple[Any, dict[str, Array]]:
            g, sums = jax.grad(loss_fn, has_aux=True)(params, mb)
            return jax.tree.map(jnp.add, grads, g), sums

        zeros = jax.tree.map(jnp.zeros_like, params)
        if state_shardings is not None:  # gradients live sharded like their params (FSDP: reduce-scatter)
            zeros = jax.lax.with_sharding_constraint(zeros, state_shardings["params"])
        grads, sums = jax.lax.scan(accumulate, zeros, micro)
        sums = jax.tree.map(jnp.sum, sums)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state, "step": step + 1}
        tokens, examples = jnp.maximum(sums["tokens"], 1.0), jnp.maximum(sums["examples"], 1.0)
        metrics = {"loss": sums["loss_sum"], "accuracy": sums["example_correct"] / examples,
                   "token_accuracy": sums["token_correct"] / tokens, "grad_norm": optax.global_norm(grads),
                   "lr": schedule(step)}
        metrics.update({f"loops/{n}": loops[i] for i, n in enumerate(circuit_names)})
        return new_state, metrics

    if state_shardings is None:
        return jax.jit(train_step, donate_argnums=0)
    return jax.jit(train_step, donate_argnums=0, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, None))


def init_state(params: Any, tx: optax.GradientTransformation) -> State:
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
