"""Gradient routing: the examples of a mixture entry with ``route: [X, ...]`` update only those
circuits (and, with ``route_shared: true``, the shared parameters: embeddings, prelude, coda, norms,
head); every other parameter receives exactly zero gradient from them. The forward pass is unchanged.

How: the entries fall into route groups (one per distinct (route, route_shared)); the step runs the
forward pass once, then one backward pass per group with the cotangent 1 on that group's rows and 0
elsewhere (`jax.vjp` of the per-row loss), and adds each group's gradient only to the parameters its
route lists (the mask is static per parameter leaf: a leaf is skipped, not multiplied by 0, so the
zero is exact). The sum over groups of the unmasked gradients is the full gradient (linearity), so a
route that lists everything gives today's gradient up to float summation order. Parameters that no
entry may update are frozen: their optimizer update (weight decay included) is zeroed too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from loopformer.config import Config

Array = jax.Array
SHARED = None  # the owner of a parameter outside every circuit
Route = tuple[tuple[str, ...] | None, bool]  # (circuits or None = every parameter, route_shared)


def path_keys(path: tuple) -> list[str]:
    """A parameter's path as strings (``stages/0/circuits/X/halt/kernel``)."""
    return [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]


def owner(path: tuple) -> str | None:
    """The circuit a parameter belongs to (``stages/S/circuits/NAME/...`` -> NAME), or None (shared)."""
    keys = path_keys(path)
    for i in range(len(keys) - 2):
        if keys[i] == "stages" and keys[i + 2] == "circuits" and i + 3 < len(keys):
            return keys[i + 3]
    return SHARED


@dataclass(frozen=True)
class Routing:
    """The route groups of a mixture (static): ``groups`` the distinct routes, ``group_of_entry`` the
    group of each mixture entry (indexed by the batch's ``task`` id)."""

    groups: tuple[Route, ...]
    group_of_entry: tuple[int, ...]
    names: tuple[str, ...] = ()  # the entries' names, for describe()

    @staticmethod
    def of(cfg: Config) -> Routing | None:
        """The routing of ``cfg``'s mixture; None when no entry routes (the step is then today's)."""
        if not cfg.data.routed:
            return None
        routes: list[Route] = [(None if e.route is None else tuple(e.route), e.route is None or e.route_shared)
                               for e in cfg.data.mixture]
        groups = tuple(dict.fromkeys(routes))
        return Routing(groups, tuple(groups.index(r) for r in routes), tuple(e.name for e in cfg.data.mixture))

    @staticmethod
    def allows(route: Route, circuit: str | None) -> bool:
        circuits, shared = route
        return circuits is None or (circuit in circuits if circuit is not SHARED else shared)

    def masks(self, params: Any) -> list[Any]:
        """Per group, a pytree of Python bools shaped like ``params``: True where the group's examples
        may update the leaf."""
        return [jax.tree_util.tree_map_with_path(lambda path, _, r=r: self.allows(r, owner(path)), params)
                for r in self.groups]

    def trainable(self, params: Any) -> Any:
        """Pytree of bools: True where some group may update the leaf (the rest are frozen)."""
        return jax.tree_util.tree_map_with_path(
            lambda path, _: any(self.allows(r, owner(path)) for r in self.groups), params)

    def describe(self, params: Any) -> str:
        parts = []
        for name, g in zip(self.names, self.group_of_entry, strict=True):
            circuits, shared = self.groups[g]
            what = "every parameter" if circuits is None else (", ".join(circuits) or "no circuit") + (
                " + shared" if shared else "")
            parts.append(f"{name} -> {what}")
        frozen = [jax.tree_util.keystr(p, simple=True, separator="/") for p, t in
                  jax.tree_util.tree_flatten_with_path(self.trainable(params))[0] if not t]
        tail = f"; frozen (no entry may update them): {len(frozen)} leaves, e.g. {frozen[0]}" if frozen else ""
        return "gradient routing: " + "; ".join(parts) + tail


def routed_grads(rows_fn: Callable[[Any], tuple[Array, Any]], params: Any, task_B: Array, routing: Routing,
                 masks: Sequence[Any] | None = None) -> tuple[Any, Any]:
    """(gradient, aux) of sum(rows_fn(params)[0]) with each row's gradient restricted to its group's route.

    ``rows_fn(params) -> (objective per row [B], aux)``; ``task_B`` int32 [B] the mixture entry of each
    row. One forward pass; one backward pass per group (cotangent = the group's rows)."""
    rows_B, vjp, aux = jax.vjp(rows_fn, params, has_aux=True)
    group_B = jnp.asarray(routing.group_of_entry, jnp.int32)[task_B]
    masks = routing.masks(params) if masks is None else masks
    total = jax.tree.map(jnp.zeros_like, params)
    for g, mask in enumerate(masks):
        (grad,) = vjp((group_B == g).astype(rows_B.dtype))
        total = jax.tree.map(lambda acc, x, keep: acc + x if keep else acc, total, grad, mask)
    return total, aux


def freeze(updates: Any, trainable: Any) -> Any:
    """Zero the updates of frozen leaves (no gradient from any entry; weight decay would still move them)."""
    return jax.tree.map(lambda u, t: u if t else jnp.zeros_like(u), updates, trainable)
