"""The jitted train step.

Training state is explicit and pure: ``{"params": dict, "opt_state": optax state, "step": int32}``
(with train.ema, also ``"ema"``: the EMA weights, shaped like the params, updated after each step);
the model's structure (an nnx GraphDef) is static and merged with the params inside the step. The
step samples each circuit's loop count from (seed, step), so the counts are identical on every
process and replayed exactly after a resume.

A step is: sample the loop counts (`_LoopPlan`), split the batch into micro-batches, sum their
gradients (`_gradients`, each micro-batch's loss from `_Objective`), apply the optimizer
(`_update`) and report (`_metrics`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from loopformer.config import CircuitConfig, Config, ModelConfig
from loopformer.metrics import answer_sums
from loopformer.model.loop import sample_loops
from loopformer.model.plan import Plan, make_plan
from loopformer.model.transformer import forward_batch
from loopformer.train.losses import gate_leaves, gate_terms, halting_terms, iteration_terms, settle_terms
from loopformer.train.optim import learning_rate_schedule
from loopformer.train.routing import Routing, freeze, routed_grads

Array = jax.Array
Batch = dict[str, Array]
State = dict[str, Any]
FINITE = "finite"  # metric: loss, gradient norm and update all finite at this step (a bool, kept on device)


@dataclass(frozen=True)
class StepSettings:
    """What a train step is built from, besides the model's structure and the optimizer.

    ``model``: its loop schedules give each circuit's loop distribution and truncation depth; a halting
    circuit or a router adds its loss terms (`loopformer.train.losses`). ``lr_schedule``: the learning
    rate logged as ``lr``. ``seed``: loop counts are sampled from (seed, step). ``grad_accum``: micro-
    batches per step. ``total_steps``: sets the halting entropy schedule. ``routing``
    (`loopformer.train.routing`; a mixture with ``route``s, batches with ``task`` [B]): each row's
    gradient reaches only its entry's route; parameters no entry may update stay frozen. None: every
    row updates every parameter (the step is exactly the unrouted one).
    """

    model: ModelConfig
    lr_schedule: optax.Schedule
    seed: int = 0
    grad_accum: int = 1
    total_steps: int = 1
    routing: Routing | None = None
    progressive: float = 0.0  # alpha of the progressive loss (train.progressive)
    progressive_circuits: tuple[str, ...] = ()  # the circuits it truncates
    ema: float = 0.0  # decay of the EMA weights (train.ema; 0: off): the state's "ema" follows the params
    stage: str = "all"  # train.stage: "gate" trains only the halting head, on Ouro's stage II objective
    iteration_loss: tuple[str, int] | None = None  # (circuit, W): the loss at each of its last W iterations
    settle: tuple[str, int, float] | None = None  # (circuit, N, weight): the settling loss at count N (train.settle)

    @classmethod
    def of(cls, cfg: Config) -> StepSettings:
        """A run's settings: ``cfg``'s model, learning-rate schedule, seed, grad_accum, steps and routing."""
        return cls(cfg.model, learning_rate_schedule(cfg.train), cfg.seed, cfg.train.grad_accum, cfg.train.steps,
                   Routing.of(cfg), progressive=cfg.train.progressive,
                   progressive_circuits=tuple(cfg.progressive_circuits()), ema=cfg.train.ema, stage=cfg.train.stage,
                   iteration_loss=cfg.iteration_window(), settle=cfg.settle_term())


@dataclass(frozen=True)
class _LoopPlan:
    """The static loop facts of a model, and the `Plan` of one step."""

    dists: dict[str, Any]  # circuit -> its training loop distribution
    backprop: tuple[tuple[str, int], ...]  # circuit -> truncated backprop depth
    halting: CircuitConfig | None  # the halting circuit, if any
    stash: int  # static: the halting circuit's stash (every iteration up to its cap)
    bound: int  # static: the routed rounds' or per-difficulty counts' scan length (0: neither)
    position_offset: int = 0  # abacus places shifted by U{0..K} per row (model.position_offset)
    windows: tuple[tuple[str, int], ...] = ()  # static: (circuit, W) whose last W iterations are read out

    @classmethod
    def of(cls, model: ModelConfig, iteration_loss: tuple[str, int] | None = None) -> _LoopPlan:
        schedules = model.schedules()
        halting = model.halting_circuit()
        dists = {name: s.distribution() for name, s in schedules.items()}
        return cls(dists=dists, backprop=tuple((name, s.backprop) for name, s in schedules.items()), halting=halting,
                   stash=max(halting.max_loops, halting.backprop) if halting is not None else 0,
                   bound=max([c.max_loops for s in model.stages if s.router.routes for c in s.circuits]
                             + [d.cap for d in dists.values() if d.per_example], default=0),
                   position_offset=model.position_offset, windows=(iteration_loss,) if iteration_loss else ())

    def sample(self, seed: int, step: Array) -> tuple[dict[str, Array], Plan]:
        """(each circuit's loop count, the forward plan) of train step ``step``. A per-difficulty circuit's
        count is its cap here; the plan resolves each token's from the batch (`Plan.for_batch`)."""
        loops = sample_loops(self.dists, seed, step)
        by_difficulty = {n: (d.a, d.b, d.cap) for n, d in self.dists.items() if d.per_example}
        plan = make_plan(list(loops), loops, key=jax.random.fold_in(jax.random.key(seed), step),
                         backprop=dict(self.backprop), stash=self.stash, bound=self.bound, by_difficulty=by_difficulty,
                         position_offset=self.position_offset, windows=dict(self.windows))
        return loops, plan


PROGRESSIVE_KEY = 0x9806  # folds the progressive loss's draws apart from the plan's noise key


def progressive_plan(plan: Plan, circuits: tuple[str, ...], key: Array) -> Plan:
    """The partial run of the progressive loss (Bansal et al. 2022): for each circuit in ``circuits`` with
    count n (scalar or per token) and truncation depth k, n_free ~ U{0..n-1} iterations without gradient,
    then g ~ U{1..min(n - n_free, k)} with it: the plan's count becomes n_free + g, its gradient depth g.
    ``plan`` must have its counts resolved (`Plan.for_batch`)."""
    loops, grads = dict(plan.loops), dict(plan.grads)
    for i, name in enumerate(circuits):
        n = jnp.asarray(plan.loops[name], jnp.int32)
        u_free, u_grad = jax.random.uniform(jax.random.fold_in(key, i), (2, *n.shape))
        n_free = jnp.floor(u_free * n).astype(jnp.int32)  # 0 .. n - 1
        room = jnp.minimum(n - n_free, plan.truncation(name))
        g = 1 + jnp.floor(u_grad * room).astype(jnp.int32)  # 1 .. room
        loops[name], grads[name] = n_free + g, g
    return dataclasses.replace(plan, loops=loops, grads=grads)


def settle_plan(plan: Plan, name: str, count: int) -> Plan:
    """The settling loss's pass (train.settle): ``plan`` with circuit ``name`` at the one count ``count`` for
    every token (not the step's counts: per difficulty, or sampled), keeping its last two states (a window of
    2, within its truncation depth: gradient through its last iterations, the earlier ones run without).
    ``plan`` must have its counts resolved (`Plan.for_batch`), as `progressive_plan`'s."""
    return dataclasses.replace(plan, loops={**plan.loops, name: jnp.asarray(count, jnp.int32)}, windows=((name, 2),))


@dataclass(frozen=True)
class _Objective:
    """One step's objective on a micro-batch: the answer tokens' cross-entropy normalised by the answer
    tokens of the *whole* batch (so micro-batch gradients add up to the full-batch mean's exactly),
    plus the halting circuit's and the routers' terms; with the plan's window (train.iteration_loss), the
    CE averaged over the circuit's last W iterations instead; with ``settle`` (circuit, N, weight), plus the
    weight times the mean squared change of that circuit's state over iteration N of a second pass
    (`settle_plan`)."""

    graphdef: nnx.GraphDef
    plan: Plan
    halting: CircuitConfig | None
    progress: tuple[Array, int]  # (this step, the run's total steps): a halting kind's loss schedule
    total_tokens: Array
    grad_accum: int
    progressive: tuple[float, tuple[str, ...], Array | None] = (0.0, (), None)  # (alpha, circuits, key)
    gate: Any = None  # train.stage=gate: the halting head's leaves (`gate_leaves`); the rest get no gradient
    settle: tuple[str, int, float] | None = None  # (circuit, N, weight): train.settle

    def loss(self, p: Any, mb: Batch) -> tuple[Array, dict[str, Array]]:
        """(the objective, sums for the metrics). With the progressive loss, the objective is
        (1 - alpha) * L(full counts) + alpha * L(`progressive_plan`); the metrics are the full counts'.
        In the gate stage it is the halting head's stage II term alone (the metrics' loss is still the CE)."""
        total_tokens, halting = self.total_tokens, self.halting
        if self.gate is not None:  # frozen leaves: no backward pass through the LM's weights
            p = jax.tree.map(lambda x, g: x if g else jax.lax.stop_gradient(x), p, self.gate)
        model = nnx.merge(self.graphdef, p)
        plan = self.plan.for_batch(mb.get("difficulty"))
        logits, diag = forward_batch(model, mb, plan)
        sums = answer_sums(logits, mb, 1.0 / total_tokens)
        objective = sums["loss_sum"]
        alpha, circuits, key = self.progressive
        if alpha:
            partial = answer_sums(forward_batch(model, mb, progressive_plan(plan, circuits, key))[0], mb,
                                  1.0 / total_tokens)["loss_sum"]
            objective = (1 - alpha) * objective + alpha * partial
            sums = sums | {"progressive_loss": partial}
        for name, _ in plan.windows:  # the metrics' loss stays the final iteration's
            objective, logs = iteration_terms(diag, mb, plan.loops[name], 1.0 / total_tokens)
            sums = sums | logs
        if self.settle is not None:
            name, count, weight = self.settle
            far = forward_batch(model, mb, settle_plan(plan, name, count))[1]
            term, logs = settle_terms(far, name, mb, weight, self.grad_accum)
            objective, sums = objective + term, sums | logs
        if self.gate is not None:
            term, logs = gate_terms(diag, halting.name, halting.halting.rule(), mb, plan.loops[halting.name],
                                    1.0 / total_tokens)
            objective = term
            sums = sums | logs
        elif halting is not None:
            rule = halting.halting.rule()
            # plan.loops: each token's own count where the counts follow its difficulty
            term, logs = halting_terms(diag, halting.name, rule, mb, plan.loops[halting.name], self.progress,
                                       1.0 / total_tokens)
            objective = term + (objective if rule.adds_to_ce else 0.0)
            sums = sums | logs
        objective = objective + diag.aux_loss / self.grad_accum  # routers: means over each micro-batch
        return objective, sums | {"objective": objective, "aux_loss": diag.aux_loss / self.grad_accum}

    def rows(self, p: Any, mb: Batch) -> tuple[Array, dict[str, Array]]:
        """The objective per row [b] (routing: no halting or router terms, refused by the config)."""
        total_tokens = self.total_tokens
        logits, _ = forward_batch(nnx.merge(self.graphdef, p), mb, self.plan)
        sums = answer_sums(logits, mb, 1.0 / total_tokens)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, mb["targets"])
        rows = jnp.sum(ce * mb["mask"].astype(jnp.float32), axis=-1) / total_tokens
        return rows, sums | {"objective": sums["loss_sum"], "aux_loss": jnp.zeros((), jnp.float32)}


def _micro_batches(batch: Batch, grad_accum: int, batch_sharding: jax.sharding.NamedSharding | None) -> Batch:
    """The global batch [B, ...] as ``grad_accum`` micro-batches [grad_accum, B / grad_accum, ...], each
    split over the same devices as the batch."""
    micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)
    if batch_sharding is not None:
        spec = jax.sharding.PartitionSpec(None, *batch_sharding.spec)
        micro = jax.lax.with_sharding_constraint(micro, jax.sharding.NamedSharding(batch_sharding.mesh, spec))
    return micro


def _gradients(objective: _Objective, params: Any, micro: Batch, routing: Routing | None,
               state_shardings: Any) -> tuple[Any, dict[str, Array]]:
    """(the summed gradient of every micro-batch, the summed metric sums), under ``lax.scan``."""

    def accumulate(grads: Any, mb: Batch) -> tuple[Any, dict[str, Array]]:
        if routing is not None:  # one backward pass per route group, each masked to its route
            g, sums = routed_grads(lambda p: objective.rows(p, mb), params, mb["task"], routing)
        else:
            g, sums = jax.grad(objective.loss, has_aux=True)(params, mb)
        return jax.tree.map(jnp.add, grads, g), sums

    zeros = jax.tree.map(jnp.zeros_like, params)
    if state_shardings is not None:  # gradients live sharded like their params (FSDP: reduce-scatter)
        zeros = jax.lax.with_sharding_constraint(zeros, state_shardings["params"])
    grads, sums = jax.lax.scan(accumulate, zeros, micro)
    return grads, jax.tree.map(jnp.sum, sums)


def _update(tx: optax.GradientTransformation, state: State, grads: Any, routing: Routing | None,
            ema: float = 0.0, trainable: Any = None) -> tuple[State, Any]:
    """(the next state, the updates applied). ``ema`` (a decay; 0: off): the state's "ema" moves towards
    the new params, ema <- ema * decay + (1 - decay) * params. ``trainable`` (bools like the params, or
    None: all): the leaves that may move; the others' updates (weight decay and momentum included) are 0."""
    params = state["params"]
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    if routing is not None:
        updates = freeze(updates, routing.trainable(params))
    if trainable is not None:
        updates = freeze(updates, trainable)
    new = {"params": optax.apply_updates(params, updates), "opt_state": opt_state, "step": state["step"] + 1}
    if ema:
        if "ema" not in state:
            raise ValueError("the step keeps EMA weights (ema > 0) but the state has none: build it with "
                             "init_state(params, tx, ema=True)")
        new["ema"] = optax.incremental_update(new["params"], state["ema"], step_size=1 - ema)
    return new, updates


def _metrics(sums: dict[str, Array], grads: Any, updates: Any, loops: dict[str, Array], lr: Array,
             objective_terms: bool) -> dict[str, Array]:
    """The step's metrics; ``objective_terms``: also the objective and the routers' aux loss (a halting
    circuit or a router makes them differ from the loss)."""
    tokens, examples = jnp.maximum(sums["tokens"], 1.0), jnp.maximum(sums["examples"], 1.0)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(sums["loss_sum"]) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(updates))
    metrics = {"loss": sums["loss_sum"], "accuracy": sums["example_correct"] / examples,
               "token_accuracy": sums["token_correct"] / tokens, "grad_norm": grad_norm,
               "lr": lr, FINITE: finite}
    if objective_terms:
        metrics["objective"], metrics["aux_loss"] = sums["objective"], sums["aux_loss"]
    metrics.update({f"halting/{k[8:]}": v / tokens for k, v in sums.items() if k.startswith("halting_")})
    for key in ("progressive_loss", "iteration_loss", "settle"):
        if key in sums:
            metrics[key] = sums[key]
    metrics.update({f"loops/{n}": v for n, v in loops.items()})
    return metrics


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, settings: StepSettings, *,
                    state_shardings: Any = None, batch_sharding: jax.sharding.NamedSharding | None = None
                    ) -> Callable[[State, Batch], tuple[State, dict[str, Array]]]:
    """Build ``train_step(state, batch) -> (state, metrics)``, jitted with the state donated.

    ``metrics[FINITE]`` says whether this step's loss, gradient norm and update were all finite; the
    trainer collects it on device and checks it before logging, evaluating or saving (no host sync
    per step).

    The global batch [B, T] is split into ``settings.grad_accum`` micro-batches run under ``lax.scan``;
    each micro-batch loss is normalised by the answer tokens of the *whole* batch, so the summed
    gradient equals the gradient of the full-batch mean loss exactly.

    On a device mesh (`loopformer.parallel`): ``state_shardings`` pins the state's layout in and out of
    the step (it never drifts between steps), and ``batch_sharding`` (rows over data/fsdp) keeps every
    micro-batch split over the same devices.
    """
    loop_plan = _LoopPlan.of(settings.model, settings.iteration_loss)
    halting = loop_plan.halting
    if settings.stage == "gate" and (halting is None or not halting.halting.rule().gate_stage):
        raise ValueError("stage gate trains an ouro or pondernet halting head; the model has none")

    def train_step(state: State, batch: Batch) -> tuple[State, dict[str, Array]]:
        step = state["step"]
        loops, plan = loop_plan.sample(settings.seed, step)
        total_tokens = jnp.maximum(batch["mask"].sum(), 1.0)
        micro = _micro_batches(batch, settings.grad_accum, batch_sharding)
        if plan.by_difficulty:  # the mean count per real token, for the logs
            resolved, real = plan.for_batch(batch["difficulty"]).loops, batch["difficulty"] > 0
            loops = loops | {n: jnp.sum(jnp.where(real, resolved[n], 0)) / jnp.maximum(real.sum(), 1)
                             for n, *_ in plan.by_difficulty}
        progressive = (settings.progressive, settings.progressive_circuits,
                       jax.random.fold_in(jax.random.fold_in(jax.random.key(PROGRESSIVE_KEY), settings.seed), step))
        gate = gate_leaves(state["params"], halting.name) if settings.stage == "gate" else None
        objective = _Objective(graphdef, plan, halting, (step, settings.total_steps), total_tokens,
                               settings.grad_accum, progressive, gate, settings.settle)
        grads, sums = _gradients(objective, state["params"], micro, settings.routing, state_shardings)
        new_state, updates = _update(tx, state, grads, settings.routing, settings.ema, gate)
        metrics = _metrics(sums, grads, updates, loops, settings.lr_schedule(step),
                           halting is not None or bool(loop_plan.bound) or bool(loop_plan.windows)
                           or settings.settle is not None)
        return new_state, metrics

    if state_shardings is None:
        return jax.jit(train_step, donate_argnums=0)
    return jax.jit(train_step, donate_argnums=0, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, None))


def init_state(params: Any, tx: optax.GradientTransformation, ema: bool = False) -> State:
    """The train state at step 0; with ``ema`` (train.ema > 0) also "ema", the EMA weights, starting as
    a copy of ``params``."""
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    if ema:
        state["ema"] = jax.tree.map(jnp.copy, params)  # its own buffers: the step donates the state
    return state
