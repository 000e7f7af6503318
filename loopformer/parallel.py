"""One code path from one CPU to a TPU pod: device mesh, logical-axis rules, sharded state and batches.

    mesh     (data, fsdp, tensor), sized by ``mesh.data/fsdp/tensor`` (one -1 fills the rest)
    params   every kernel carries logical axis names (``nnx.with_partitioning`` in model/layers.py);
             ``RULES`` maps them to mesh axes. Leading axes added by ``nnx.vmap`` (stacked layers
             [L, ...], stacked circuits [C, L, ...]) carry no names and stay replicated.
    opt      optimizer state is sharded like the parameter it mirrors (``optax.tree_map_params``);
             counters and schedules are replicated.
    batches  rows split over (data, fsdp): each process hands in its own rows
             (``jax.make_array_from_process_local_data``); grain shards the stream by process.

A dimension whose size the mesh axes do not divide is left replicated (``logical_to_spec``), and
a mesh axis is used at most once per array, so every model shape has a valid sharding on every mesh.

Multi-process: ``initialize_distributed()`` calls ``jax.distributed.initialize`` before any JAX
computation when the environment asks for it (explicit ``LOOPFORMER_COORDINATOR`` /
``LOOPFORMER_NUM_PROCESSES`` / ``LOOPFORMER_PROCESS_ID``, jax's ``JAX_COORDINATOR_ADDRESS``, a
multi-task SLURM job, a multi-host TPU slice, or ``LOOPFORMER_DISTRIBUTED=1``).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from loopformer.config import MeshConfig
from loopformer.errors import ConfigError, unplain_digits

PyTree = Any

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # batch rows are split over both: FSDP is data parallel for activations

# Logical axis name -> mesh axis (or axes, or None: replicated). The one table for the whole model.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",  # the d_model / circuit-width side of every kernel: FSDP shards the big weight dim
    "heads": "tensor",  # attention qkv / out: Megatron-style tensor parallelism
    "mlp": "tensor",  # MLP hidden units
    "vocab": "tensor",  # embedding rows / head columns
    "circuit": None,  # circuit-width side of read / write / concat-adapter kernels
    "norm": None,  # norm scales
}


# ----------------------------------------------------------------------------- multi-process


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    odd = unplain_digits(value)  # int() reads 1_6 and ٢ (#27 pass 42)
    if odd:
        raise ConfigError(f"environment variable {name}={value!r}: {odd}")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer") from None


_OFF, _ON = ("0", "false", "no", "off"), ("1", "true", "yes", "on", "auto")


def _check_address(name: str, value: str) -> None:
    """ConfigError unless ``value`` is HOST:PORT (without a port, jax.distributed raised an IndexError)."""
    host, _, port = value.rpartition(":")
    if not (host and port.isascii() and port.isdigit() and 0 < int(port) < 65536):  # ASCII: int() reads "٣"
        raise ConfigError(f"environment variable {name}={value!r} must be HOST:PORT, e.g. 10.0.0.1:1234")


def distributed_request() -> dict[str, Any] | None:
    """The ``jax.distributed.initialize`` arguments the environment asks for, or None (one process)."""
    switch = os.environ.get("LOOPFORMER_DISTRIBUTED", "")
    if switch and switch.lower() not in _OFF + _ON:  # a typo (ture) ran one process, or auto-detected, silently
        raise ConfigError(f"environment variable LOOPFORMER_DISTRIBUTED={switch!r} must be one of "
                          f"{', '.join(_ON)} (start JAX's multi-process runtime) or {', '.join(_OFF)} (one process)")
    if switch.lower() in _OFF:
        return None
    coordinator = os.environ.get("LOOPFORMER_COORDINATOR")
    if coordinator:
        _check_address("LOOPFORMER_COORDINATOR", coordinator)
        num, pid = _env_int("LOOPFORMER_NUM_PROCESSES"), _env_int("LOOPFORMER_PROCESS_ID")
        if num is None or pid is None:
            raise ConfigError("LOOPFORMER_COORDINATOR is set: also set LOOPFORMER_NUM_PROCESSES (the number of "
                              "processes) and LOOPFORMER_PROCESS_ID (0 .. N-1, unique per process)")
        if not 0 <= pid < num:
            raise ConfigError(f"LOOPFORMER_PROCESS_ID={pid} must be in [0, LOOPFORMER_NUM_PROCESSES={num})")
        return {"coordinator_address": coordinator, "num_processes": num, "process_id": pid}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        _check_address("JAX_COORDINATOR_ADDRESS", os.environ["JAX_COORDINATOR_ADDRESS"])
        return {"coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"],
                "num_processes": _env_int("JAX_NUM_PROCESSES"), "process_id": _env_int("JAX_PROCESS_ID")}
    if switch.lower() in _ON:
        return {}  # jax auto-detects: Cloud TPU, SLURM, Open MPI, Kubernetes
    if (_env_int("SLURM_NTASKS") or 1) > 1 and "SLURM_STEP_NODELIST" in os.environ:
        return {}
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    empty = next((i for i, h in enumerate(hosts.split(","), 1) if not h.strip()), None) if "," in hosts else None
    if empty:  # 'a,' asked for several processes, of which one has no host: JAX's runtime then waits for it
        raise ConfigError(f"environment variable TPU_WORKER_HOSTNAMES={hosts!r} has an empty entry (number {empty}); "
                          f"list each worker's host once, comma-separated (e.g. w0,w1), or unset it for one process")
    if "," in hosts or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return {}
    return None


def initialize_distributed() -> bool:
    """Start JAX's multi-process runtime when the environment asks for it (idempotent); returns
    whether this is a multi-process run. Must run before the first JAX computation."""
    if jax.distributed.is_initialized():
        return True
    request = distributed_request()
    if request is None:
        return False
    # CPU processes talk through gloo; harmless for GPU/TPU backends (it only configures the CPU client).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if request.get("num_processes"):  # it waits for every process: say so, rather than wait without a word
        print(f"waiting for {request['num_processes']} processes at {request['coordinator_address']} (this is "
              f"process {request['process_id']})", file=sys.stderr, flush=True)
    try:
        jax.distributed.initialize(**{k: v for k, v in request.items() if v is not None})
    except ValueError as e:  # LOOPFORMER_DISTRIBUTED=1 where JAX detects no cluster: a traceback
        raise ConfigError(f"JAX's multi-process runtime found no cluster to join ({e}); set LOOPFORMER_COORDINATOR, "
                          f"LOOPFORMER_NUM_PROCESSES and LOOPFORMER_PROCESS_ID, or unset LOOPFORMER_DISTRIBUTED for "
                          f"one process") from None
    return True


# ----------------------------------------------------------------------------- mesh


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) for ``num_devices``; one axis may be -1 (fills the rest)."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    fills = [i for i, s in enumerate(sizes) if s == -1]
    for name, s in zip(MESH_AXES, sizes, strict=True):
        if s != -1 and s < 1:
            raise ConfigError(f"mesh.{name} must be >= 1 or -1 (fill), got {s}")
    if len(fills) > 1:
        raise ConfigError(f"mesh: only one of data/fsdp/tensor may be -1 (fill), got "
                          f"data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor}")
    fixed = math.prod(s for s in sizes if s != -1)
    if fills:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh: {num_devices} devices cannot be split with "
                + " x ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes, strict=True) if s != -1)
                + f" = {fixed} (the -1 axis needs a whole number); choose sizes whose product divides {num_devices}")
        sizes[fills[0]] = num_devices // fixed
    elif fixed != num_devices:
        there = "is 1 device" if num_devices == 1 else f"are {num_devices} devices"
        raise ConfigError(f"mesh: data x fsdp x tensor = {cfg.data} x {cfg.fsdp} x {cfg.tensor} = {fixed}, but "
                          f"there {there}; make the product {num_devices} or set one axis to -1")
    return sizes[0], sizes[1], sizes[2]


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over ``devices`` (default: all devices of all processes).

    Devices are laid out by ``jax.make_mesh`` (topology-aware on TPU: tensor, the last axis, gets
    the closest chips), with Auto axes: shardings are annotations and XLA inserts collectives.
    """
    cfg = cfg or MeshConfig()
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def describe_mesh(mesh: Mesh) -> str:
    d = mesh.devices.flat[0]
    return (f"mesh data={mesh.shape['data']} fsdp={mesh.shape['fsdp']} tensor={mesh.shape['tensor']} over "
            f"{mesh.size} {d.platform} device(s) ({d.device_kind}) in {jax.process_count()} process(es)")


# ----------------------------------------------------------------------------- logical axes -> specs


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, str | tuple[str, ...] | None] | None = None) -> PartitionSpec:
    """PartitionSpec for an array of ``shape`` whose *trailing* dims carry ``names``.

    Leading dims without names (stacked layers / circuits from ``nnx.vmap``) are replicated. A
    mesh axis is used once per array (first dim wins); a dim that the mesh axes do not divide, or
    whose mesh axes have size 1, is replicated.
    """
    rules = RULES if rules is None else rules
    names = tuple(names or ())
    if len(names) > len(shape):
        raise ValueError(f"{len(names)} axis names {names} for an array of rank {len(shape)}")
    full = (None,) * (len(shape) - len(names)) + names
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for name, size in zip(full, shape, strict=True):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ConfigError(f"logical axis '{name}' has no sharding rule; rules cover {sorted(rules)}")
        target = rules[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if not axes or size % math.prod(mesh.shape[a] for a in axes):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def _axis_names(var: nnx.Variable) -> tuple[str | None, ...] | None:
    meta = var.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = meta.get(key)
        if names:
            return tuple(names)
    return None


def param_specs(model: nnx.Module, mesh: Mesh, rules: Mapping[str, Any] | None = None) -> PyTree:
    """PartitionSpecs of ``nnx.to_pure_dict(nnx.state(model))`` from the Variables' logical names."""
    state = nnx.state(model)
    by_path = {"/".join(map(str, path)): logical_to_spec(_axis_names(var), var.shape, mesh, rules)
               for path, var in nnx.to_flat_state(state)}
    pure = nnx.to_pure_dict(state)
    return jax.tree_util.tree_map_with_path(
        lambda p, _: by_path[jax.tree_util.keystr(p, simple=True, separator="/")], pure)


def named(mesh: Mesh, specs: PyTree) -> PyTree:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def train_state_shardings(model: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh,
                          rules: Mapping[str, Any] | None = None, *, ema: bool = False) -> dict[str, Any]:
    """NamedShardings of the train state {"params", "opt_state", "step"} (see `loopformer.train.step`);
    with ``ema`` also "ema" (the EMA weights), sharded like the params."""
    pspecs = param_specs(model, mesh, rules)
    abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                   nnx.to_pure_dict(nnx.state(model)))
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    # Leaves of the optimizer state that mirror a parameter (Adam's mu, nu) take its spec; everything
    # else (counts, schedule state) is replicated.
    opt_specs = optax.tree_map_params(tx, lambda _, spec: spec, abstract_opt, pspecs,
                                      transform_non_params=lambda _: PartitionSpec(),
                                      is_leaf=lambda x: isinstance(x, PartitionSpec))
    shardings = {"params": named(mesh, pspecs), "opt_state": named(mesh, opt_specs),
                 "step": NamedSharding(mesh, PartitionSpec())}
    if ema:
        shardings["ema"] = named(mesh, pspecs)
    return shardings


def shard_train_state(params: PyTree, init: Any, shardings: dict[str, Any]) -> dict[str, Any]:
    """Place ``params`` on their shardings and build the rest of the state with ``init(params)``
    (`loopformer.train.step.init_state` with the optimizer bound) directly in its shardings.

    The placed parameters are donated: on one device they may be ``params``' own buffers, which the
    state then takes over (as an unsharded run's first train step would), so no second copy lives on.
    """
    params = jax.device_put(params, shardings["params"])
    return jax.jit(init, out_shardings=shardings, donate_argnums=0)(params)


def describe_sharding(params: PyTree, shardings: PyTree) -> str:
    """One line: how much of the parameters each device holds."""
    total = per_device = 0
    sharded = 0
    for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings), strict=True):
        nbytes = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        shard = s.shard_shape(x.shape)
        total += nbytes
        per_device += int(np.prod(shard)) * np.dtype(x.dtype).itemsize
        sharded += tuple(shard) != tuple(x.shape)
    return (f"parameters {total / 2**20:.2f} MiB, {per_device / 2**20:.2f} MiB per device "
            f"({sharded}/{len(jax.tree.leaves(params))} arrays sharded)")


# ----------------------------------------------------------------------------- batches


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over (data, fsdp); other dims replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_size(global_batch: int, grad_accum: int, mesh: Mesh) -> None:
    """Raise ConfigError unless every micro-batch splits evenly over processes and (data, fsdp)."""
    dp, procs = data_parallel_size(mesh), jax.process_count()
    if global_batch % procs:
        raise ConfigError(f"data.batch_size ({global_batch}) must be divisible by the number of processes ({procs})")
    micro = global_batch // grad_accum
    if micro % dp:
        raise ConfigError(f"data.batch_size / train.grad_accum = {global_batch} / {grad_accum} = {micro} rows per "
                          f"micro-batch must be divisible by mesh data x fsdp = {dp}; change data.batch_size, "
                          f"train.grad_accum or the mesh")


def put_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> global arrays [B_global, ...] sharded over (data, fsdp)."""
    sharding = batch_sharding(mesh)
    procs = jax.process_count()
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), (v.shape[0] * procs, *v.shape[1:]))
            for k, v in local_batch.items()}


def put_global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """A batch that every process holds in full (eval sets) -> global arrays: rows sharded over
    (data, fsdp) when they divide evenly, else replicated."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        spec = PartitionSpec(BATCH_AXES) if v.shape[0] % data_parallel_size(mesh) == 0 else PartitionSpec()
        out[k] = jax.make_array_from_callback(v.shape, NamedSharding(mesh, spec), lambda idx, v=v: v[idx])
    return out
