"""The jitted train step.

Training state is explicit and pure: ``{"params": dict, "opt_state": optax state, "step": int32}``;
the model's structure (an nnx GraphDef) is static and merged with the params inside the step. The
step samples each circuit's loop count from (seed, step), so the counts are identical on every
process and replayed exactly after a resume.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from loopformer.config import ModelConfig
from loopformer.evaluation.metrics import answer_sums
from loopformer.model.loop import sample_loops
from loopformer.model.plan import Plan
from loopformer.model.transformer import forward_batch
from loopformer.train.losses import halting_beta, halting_terms
from loopformer.train.routing import Routing, freeze, routed_grads

Array = jax.Array
Batch = dict[str, Array]
State = dict[str, Any]
FINITE = "finite"  # metric: loss, gradient norm and update all finite at this step (a bool, kept on device)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, model: ModelConfig,
                    seed: int, grad_accum: int, lr_schedule: optax.Schedule, state_shardings: Any = None,
                    batch_sharding: jax.sharding.NamedSharding | None = None, total_steps: int = 1,
                    routing: Routing | None = None) -> Callable[[State, Batch], tuple[State, dict[str, Array]]]:
    """Build ``train_step(state, batch) -> (state, metrics)``, jitted with the state donated.

    ``metrics[FINITE]`` says whether this step's loss, gradient norm and update were all finite; the
    trainer collects it on device and checks it before logging, evaluating or saving (no host sync
    per step).

    ``model``'s loop schedules give each circuit's loop distribution and truncation depth; a halting
    circuit or a router adds its loss terms (`loopformer.train.losses`; ``total_steps`` sets the
    halting entropy schedule). The global batch [B, T] is split into ``grad_accum`` micro-batches run under
    ``lax.scan``; each micro-batch loss is normalised by the answer tokens of the *whole* batch, so the
    summed gradient equals the gradient of the full-batch mean loss exactly.

    On a device mesh (`loopformer.parallel`): ``state_shardings`` pins the state's layout in and out of
    the step (it never drifts between steps), and ``batch_sharding`` (rows over data/fsdp) keeps every
    micro-batch split over the same devices.

    ``routing`` (`loopformer.train.routing`; a mixture with ``route``s, batches with ``task`` [B]): each
    row's gradient reaches only its entry's route; parameters no entry may update stay frozen. None:
    every row updates every parameter (the step is exactly the unrouted one).
    """
    schedules = model.schedules()
    dists = {name: s.distribution() for name, s in schedules.items()}
    backprop = tuple((name, s.backprop) for name, s in schedules.items())
    halting = model.halting_circuit()
    # static lengths: the halting circuit's stash (every iteration up to its cap), the routed rounds' scan
    stash = max(halting.max_loops, halting.backprop) if halting is not None else 0
    bound = max((c.max_loops for s in model.stages if s.router.kind != "none" for c in s.circuits), default=0)

    def train_step(state: State, batch: Batch) -> tuple[State, dict[str, Array]]:
        step, params = state["step"], state["params"]
        loops = sample_loops(dists, seed, step)
        plan = Plan(loops=loops, gates={n: jnp.ones((), jnp.float32) for n in loops},
                    key=jax.random.fold_in(jax.random.key(seed), step), backprop=backprop, stash=stash, bound=bound)
        beta = halting_beta(halting.halting, step, total_steps) if halting is not None else 0.0
        total_tokens = jnp.maximum(batch["mask"].sum(), 1.0)
        micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)
        if batch_sharding is not None:
            spec = jax.sharding.PartitionSpec(None, *batch_sharding.spec)
            micro = jax.lax.with_sharding_constraint(micro, jax.sharding.NamedSharding(batch_sharding.mesh, spec))

        def loss_fn(p: Any, mb: Batch) -> tuple[Array, dict[str, Array]]:
            logits, diag = forward_batch(nnx.merge(graphdef, p), mb, plan)
            sums = answer_sums(logits, mb, 1.0 / total_tokens)
            objective = sums["loss_sum"]
            if halting is not None:
                term, logs = halting_terms(diag, halting.name, halting.halting, mb, loops[halting.name], beta,
                                           1.0 / total_tokens)
                objective = term + (objective if halting.halting.kind == "act" else 0.0)
                sums = sums | logs
            objective = objective + diag.aux_loss / grad_accum  # routers: means over each micro-batch
            return objective, sums | {"objective": objective, "aux_loss": diag.aux_loss / grad_accum}

        def accumulate(grads: Any, mb: Batch) -> tuple[Any, dict[str, Array]]:
            if routing is not None:  # one backward pass per route group, each masked to its route
                g, sums = routed_grads(lambda p: rows_fn(p, mb), params, mb["task"], routing)
            else:
                g, sums = jax.grad(loss_fn, has_aux=True)(params, mb)
            return jax.tree.map(jnp.add, grads, g), sums

        def rows_fn(p: Any, mb: Batch) -> tuple[Array, dict[str, Array]]:
            """The objective per row [b] (routing: no halting or router terms, refused by the config)."""
            logits, _ = forward_batch(nnx.merge(graphdef, p), mb, plan)
            sums = answer_sums(logits, mb, 1.0 / total_tokens)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, mb["targets"])
            rows = jnp.sum(ce * mb["mask"].astype(jnp.float32), axis=-1) / total_tokens
            return rows, sums | {"objective": sums["loss_sum"], "aux_loss": jnp.zeros((), jnp.float32)}

        zeros = jax.tree.map(jnp.zeros_like, params)
        if state_shardings is not None:  # gradients live sharded like their params (FSDP: reduce-scatter)
            zeros = jax.lax.with_sharding_constraint(zeros, state_shardings["params"])
        grads, sums = jax.lax.scan(accumulate, zeros, micro)
        sums = jax.tree.map(jnp.sum, sums)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        if routing is not None:
            updates = freeze(updates, routing.trainable(params))
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state, "step": step + 1}
        tokens, examples = jnp.maximum(sums["tokens"], 1.0), jnp.maximum(sums["examples"], 1.0)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(sums["loss_sum"]) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(updates))
        metrics = {"loss": sums["loss_sum"], "accuracy": sums["example_correct"] / examples,
                   "token_accuracy": sums["token_correct"] / tokens, "grad_norm": grad_norm,
                   "lr": lr_schedule(step), FINITE: finite}
        if halting is not None or bound:
            metrics["objective"], metrics["aux_loss"] = sums["objective"], sums["aux_loss"]
        metrics.update({f"halting/{k[8:]}": v / tokens for k, v in sums.items() if k.startswith("halting_")})
        metrics.update({f"loops/{n}": v for n, v in loops.items()})
        return new_state, metrics

    if state_shardings is None:
        return jax.jit(train_step, donate_argnums=0)
    return jax.jit(train_step, donate_argnums=0, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, None))


def init_state(params: Any, tx: optax.GradientTransformation) -> State:
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
