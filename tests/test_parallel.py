"""Mesh sizing, the logical-axis rules, sharded state, FLOP counting, and (in subprocesses) training
on 8 CPU devices and in two processes joined by jax.distributed (gloo)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from loopformer import parallel
from loopformer.config import MeshConfig, load_config
from loopformer.errors import ConfigError
from loopformer.model.transformer import build_model
from loopformer.train.optim import make_optimizer
from loopformer.train.step import init_state
from tests.conftest import FAST_XLA, TINY

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "parallel" / "mesh_worker.py"


def subprocess_env(devices: int, **extra: str) -> dict[str, str]:
    """A clean environment with ``devices`` CPU devices, LLVM's cheap settings (the checks are numerical,
    not about speed) and the suite's compilation cache (tests/conftest.py): a program another process
    compiled, in this run or an earlier one, is read back."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPFORMER_", "JAX_", "XLA_"))}
    env.update(JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_XLA,
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
               JAX_COMPILATION_CACHE_MAX_SIZE=str(jax.config.jax_compilation_cache_max_size), **extra)
    return env


# ----------------------------------------------------------------------------- mesh sizing


@pytest.mark.parametrize("sizes, devices, want", [
    ((-1, 1, 1), 8, (8, 1, 1)), ((2, -1, 1), 8, (2, 4, 1)), ((2, 2, -1), 8, (2, 2, 2)), ((1, 1, 1), 1, (1, 1, 1)),
    ((-1, 1, 1), 1, (1, 1, 1)), ((4, 2, 1), 8, (4, 2, 1)),
])
def test_mesh_shape(sizes, devices, want):
    assert parallel.mesh_shape(MeshConfig(*sizes), devices) == want


@pytest.mark.parametrize("sizes, devices, match", [
    ((2, 2, 1), 8, r"data x fsdp x tensor = 2 x 2 x 1 = 4, but there are 8 devices"),
    ((-1, 3, 1), 8, r"8 devices cannot be split with fsdp=3 x tensor=1 = 3"),
    ((-1, -1, 1), 8, r"only one of data/fsdp/tensor may be -1"),
    ((0, 1, 1), 8, r"mesh.data must be >= 1 or -1"),
])
def test_mesh_shape_errors(sizes, devices, match):
    with pytest.raises(ConfigError, match=match):
        parallel.mesh_shape(MeshConfig(*sizes), devices)


def test_make_mesh_single_device():
    mesh = parallel.make_mesh(MeshConfig())
    assert mesh.axis_names == parallel.MESH_AXES and mesh.devices.shape == (jax.device_count(), 1, 1)
    assert "mesh data=1 fsdp=1 tensor=1" in parallel.describe_mesh(parallel.make_mesh(MeshConfig(), jax.devices()[:1]))


# ----------------------------------------------------------------------------- logical axes


MESH_222 = AbstractMesh((2, 2, 2), parallel.MESH_AXES)
MESH_241 = AbstractMesh((2, 4, 1), parallel.MESH_AXES)


def test_logical_to_spec_rules_and_leading_axes():
    spec = parallel.logical_to_spec
    assert spec(("embed", "heads"), (64, 192), MESH_222) == P("fsdp", "tensor")
    assert spec(("mlp", "embed"), (256, 64), MESH_222) == P("tensor", "fsdp")
    assert spec(("vocab", "embed"), (40, 64), MESH_222) == P("tensor", "fsdp")
    # nnx.vmap-stacked layers [L, ...] carry no name on their leading axis: replicated along it.
    assert spec(("embed", "heads"), (3, 2, 64, 192), MESH_222) == P(None, None, "fsdp", "tensor")
    assert spec(("norm",), (2, 64), MESH_222) == P()
    assert spec(None, (64,), MESH_222) == P()
    # tensor has size 1: nothing to split over.
    assert spec(("embed", "heads"), (64, 192), MESH_241) == P("fsdp")


def test_logical_to_spec_fallbacks():
    spec = parallel.logical_to_spec
    assert spec(("vocab", "embed"), (41, 64), MESH_222) == P(None, "fsdp")  # 41 rows do not split in 2
    assert spec(("embed", "heads"), (6, 192), MESH_241) == P()  # 6 does not split in 4
    assert spec(("embed", "embed"), (64, 64), MESH_222) == P("fsdp")  # a mesh axis once per array
    assert spec(("batch",), (16,), MESH_222) == P(("data", "fsdp"))
    assert spec(("embed",), (64,), MESH_222, rules={"embed": None}) == P()
    with pytest.raises(ConfigError, match="logical axis 'experts' has no sharding rule"):
        spec(("experts", "embed"), (8, 64), MESH_222)


def model_and_tx():
    """The quickstart model with a projecting, concat-injecting circuit X and an untied head, abstract
    (shapes and logical axis names only: no initialisation)."""
    cfg = load_config("configs/quickstart.yaml", [
        "model.tie_embeddings=false", "model.stages.0.circuits.X.io=project",
        "model.stages.0.circuits.X.inject=concat"])
    return nnx.eval_shape(lambda: build_model(cfg.model, 40, 0)), make_optimizer(cfg.train)


def test_param_specs_cover_every_parameter():
    model, _ = model_and_tx()
    specs = parallel.param_specs(model, MESH_222)
    params = nnx.to_pure_dict(nnx.state(model))
    flat = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, P))[0]}
    shapes = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert flat.keys() == shapes.keys()
    for path, s in flat.items():
        assert len(s) <= len(shapes[path]), path
    x = "['stages'][0]['circuits']['X']"
    assert flat[f"{x}['blocks']['attn']['qkv']['kernel']"] == P(None, "fsdp", "tensor")  # [D, w, 3w]
    assert flat[f"{x}['read']['kernel']"] == P("fsdp")  # [d_model, w]: (embed, circuit)
    assert flat[f"{x}['adapter']['kernel']"] == P()  # (circuit, circuit)
    assert flat["['prelude']['mlp']['up']['kernel']"] == P(None, "fsdp", "tensor")
    assert flat["['head']['kernel']"] == P("fsdp", "tensor")
    assert flat["['final_norm']['scale']"] == P()


def test_train_state_shardings_mirror_params():
    model, tx = model_and_tx()
    mesh = parallel.make_mesh(MeshConfig(), jax.devices()[:1])
    shardings = parallel.train_state_shardings(model, tx, mesh)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype), nnx.to_pure_dict(nnx.state(model)))
    state = parallel.shard_train_state(params, lambda p: init_state(p, tx), shardings)
    assert jax.tree.structure(state) == jax.tree.structure(shardings)
    for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
        assert x.sharding == s
    np.testing.assert_array_equal(state["params"]["embed"]["embedding"], params["embed"]["embedding"])
    assert "parameters" in parallel.describe_sharding(params, shardings["params"])


def test_batch_size_checks():
    mesh = parallel.make_mesh(MeshConfig(), jax.devices()[:1])
    parallel.check_batch_size(6, 3, mesh)
    batch = {"inputs": np.arange(12, dtype=np.int32).reshape(4, 3)}
    placed = parallel.put_batch(batch, mesh)
    np.testing.assert_array_equal(placed["inputs"], batch["inputs"])
    np.testing.assert_array_equal(parallel.put_global_batch(batch, mesh)["inputs"], batch["inputs"])


def test_distributed_request(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("LOOPFORMER_", "JAX_COORDINATOR", "SLURM_", "TPU_", "MEGASCALE_")):
            monkeypatch.delenv(key)
    assert parallel.distributed_request() is None
    monkeypatch.setenv("LOOPFORMER_COORDINATOR", "10.0.0.1")  # #27 pass 19: an IndexError inside jax.distributed
    with pytest.raises(ConfigError, match=r"^environment variable LOOPFORMER_COORDINATOR='10.0.0.1' must be HOST:PORT"):
        parallel.distributed_request()
    monkeypatch.setenv("LOOPFORMER_COORDINATOR", "10.0.0.1:1234")
    with pytest.raises(ConfigError, match="also set LOOPFORMER_NUM_PROCESSES"):
        parallel.distributed_request()
    monkeypatch.setenv("LOOPFORMER_NUM_PROCESSES", "2")
    monkeypatch.setenv("LOOPFORMER_PROCESS_ID", "2")
    with pytest.raises(ConfigError, match=r"LOOPFORMER_PROCESS_ID=2 must be in \[0, LOOPFORMER_NUM_PROCESSES=2\)"):
        parallel.distributed_request()
    monkeypatch.setenv("LOOPFORMER_PROCESS_ID", "1")
    assert parallel.distributed_request() == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                                              "process_id": 1}
    monkeypatch.setenv("LOOPFORMER_DISTRIBUTED", "0")
    assert parallel.distributed_request() is None
    monkeypatch.setenv("LOOPFORMER_DISTRIBUTED", "ture")  # #27 pass 17: a typo was read as unset
    with pytest.raises(ConfigError, match=r"^environment variable LOOPFORMER_DISTRIBUTED='ture' must be one of 1, "):
        parallel.distributed_request()
    monkeypatch.delenv("LOOPFORMER_DISTRIBUTED")
    monkeypatch.delenv("LOOPFORMER_COORDINATOR")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[01-02]")
    assert parallel.distributed_request() == {}
    assert not jax.distributed.is_initialized()
    monkeypatch.delenv("SLURM_NTASKS")
    for hosts, entry in (("a,", 2), (",a", 1), ("a,,b", 2), ("a, ", 2)):  # #27 pass 24's leftover: asked for processes
        monkeypatch.setenv("TPU_WORKER_HOSTNAMES", hosts)
        with pytest.raises(ConfigError, match=rf"^environment variable TPU_WORKER_HOSTNAMES='{hosts}' has an empty "
                                              rf"entry \(number {entry}\); list each worker's host once"):
            parallel.distributed_request()
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
    assert parallel.distributed_request() == {}
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0")
    assert parallel.distributed_request() is None


def test_distributed_on_where_jax_finds_no_cluster(monkeypatch):
    # #27 pass 19: LOOPFORMER_DISTRIBUTED=1 on one machine was a ValueError traceback from jax.distributed
    def no_cluster(**kwargs):
        raise ValueError("coordinator_address should be defined.")

    for key in list(os.environ):
        if key.startswith(("LOOPFORMER_", "JAX_COORDINATOR", "SLURM_", "TPU_", "MEGASCALE_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("LOOPFORMER_DISTRIBUTED", "1")
    monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
    with pytest.raises(ConfigError, match=r"^JAX's multi-process runtime found no cluster to join \(coordinator_address "
                       r"should be defined.\); set LOOPFORMER_COORDINATOR, .* or unset LOOPFORMER_DISTRIBUTED"):
        parallel.initialize_distributed()


# ----------------------------------------------------------------------------- FLOPs


# ----------------------------------------------------------------------------- 8 devices, 2 processes


def run_worker(*meshes: str, timeout: int = 600) -> str:
    proc = subprocess.run([sys.executable, str(WORKER), *meshes], cwd=ROOT, env=subprocess_env(8),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


@pytest.mark.slow  # an 8-device subprocess (30-45 s on 2 cores): CI runs it with the slow tests
def test_mesh_2x2x2_matches_single_device():
    """data x fsdp x tensor = 2 x 2 x 2 on 8 CPU devices: loss, gradients and two AdamW steps equal one
    device; its checkpoint restores onto one device and training continues identically."""
    out = run_worker("2,2,2")
    assert "mesh (2, 2, 2): equal to single device" in out and "restored and continued" in out


@pytest.mark.slow
def test_all_meshes_match_single_device():
    out = run_worker("8,1,1", "2,4,1", "2,2,2")
    assert out.count("equal to single device") == 3
    assert "checkpoint (8, 1, 1) -> (2, 2, 2): restored and continued" in out


def layered(base: list[str], *extra: str) -> list[str]:
    """``base`` with ``extra`` in place of its own settings of their keys: a command line refuses a key given twice."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [o for o in base if o.split("=", 1)[0] not in keys] + list(extra)


# The tiny config with a 32-entry vocabulary, trained on a data=2 x fsdp=2 mesh.
MESHED = layered(TINY, "model.vocab_size=32", "data.eval_splits={train: [1, 2]}", "train.log_every=1",
                 "train.eval_every=100", "train.checkpoint_every=2", "mesh.data=2", "mesh.fsdp=2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(tmp_path: Path, *overrides: str) -> list[subprocess.CompletedProcess]:
    port = free_port()
    cmd = [sys.executable, "train.py", "--config", "configs/quickstart.yaml",
           *layered(MESHED, f"run.dir={tmp_path}", "run.name=mp", *overrides)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=subprocess_env(2, LOOPFORMER_COORDINATOR=f"127.0.0.1:{port}",
                                                 LOOPFORMER_NUM_PROCESSES="2", LOOPFORMER_PROCESS_ID=str(i)))
             for i in range(2)]
    done = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=540)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    for i, p in enumerate(done):
        assert p.returncode == 0, f"process {i}:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return done


def context(procs: list[subprocess.CompletedProcess], run: Path) -> str:
    files = sorted(str(f.relative_to(run)) for f in run.rglob("*") if "checkpoints" in f.parts and f.parent.parent.name
                   == "checkpoints") if run.exists() else []
    return "\n".join([f"files: {files}"] + [f"--- process {i} stdout:\n{p.stdout[-2000:]}\n--- stderr:\n{p.stderr[-3000:]}"
                                             for i, p in enumerate(procs)])


@pytest.mark.slow
def test_two_processes_train_checkpoint_resume(tmp_path):
    """Two processes x 2 CPU devices (mesh data=2, fsdp=2) joined by jax.distributed over gloo: train,
    checkpoint (each process writes its shards and its data-iterator position), resume; only process 0
    logs. The checkpoint then restores in a single process on one device."""
    run = tmp_path / "mp"
    first = launch_two(tmp_path, "train.steps=4")
    why = context(first, run)
    assert "mesh data=2 fsdp=2 tensor=1 over 4 cpu device(s) (cpu) in 2 process(es)" in first[0].stdout, why
    assert "step 4/4" in first[0].stdout, why
    assert "LoopedTransformer" not in first[1].stdout and "step " not in first[1].stdout, why  # gloo prints its own
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"], why
    data_files = {p.name for p in (run / "checkpoints" / "4" / "data").iterdir()}
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= data_files, why
    second = launch_two(tmp_path, "train.steps=6")
    why = context(second, run)
    assert "resumed" in second[0].stdout and "from step 4" in second[0].stdout, why
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(np.isfinite(list(losses.values()))), (losses, why)
    assert all(r["train/mfu"] > 0 for r in rows if "train/mfu" in r)
    # The two-process, four-device checkpoint restores onto this single-device process.
    from loopformer.runs.read import load_run_config
    from loopformer.runs.restore import restore_params
    _, params, step = restore_params(load_run_config(run))
    assert step == 6 and np.isfinite(np.asarray(params["embed"]["embedding"])).all()


@pytest.mark.parametrize("value, phrase", [("1_6", r"'1_6' is written with '_'"),
                                           ("\u0662", r"'\u0662' is a digit of another script \(U\+0662\)")])
def test_a_process_count_written_with_an_underscore_or_another_script_is_refused(monkeypatch, value, phrase):
    """#27 pass 42: int() read SLURM_NTASKS=1_6 as 16 and ٢ as 2 (numbers with '_' are refused everywhere else)."""
    monkeypatch.setenv("SLURM_NTASKS", value)
    with pytest.raises(ConfigError, match=rf"^environment variable SLURM_NTASKS='{value}': {phrase}"):
        parallel._env_int("SLURM_NTASKS")


def test_a_port_in_another_script_is_refused():
    """#27 pass 42: int() read the port of LOOPFORMER_COORDINATOR=10.0.0.1:١٢٣٤ as 1234."""
    with pytest.raises(ConfigError, match=r"must be HOST:PORT"):
        parallel._check_address("LOOPFORMER_COORDINATOR", "10.0.0.1:\u0661\u0662\u0663\u0664")


def test_a_peak_written_with_an_underscore_is_refused(monkeypatch):
    """#27 pass 42: float() read LOOPFORMER_PEAK_FLOPS=9.89e1_4 as 9.89e14."""
    from loopformer.flops import peak_override

    monkeypatch.setenv("LOOPFORMER_PEAK_FLOPS", "9.89e1_4")
    with pytest.raises(ConfigError, match=r"^environment variable LOOPFORMER_PEAK_FLOPS='9.89e1_4': '1_4' is written "):
        peak_override()
