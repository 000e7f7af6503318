"""The tpu/ scripts as a careless user calls them, with a stub gcloud that only prints what it was asked."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name, tmp_path, **env):
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "gcloud").write_text('#!/bin/sh\necho "gcloud $*"\n')
    (stub / "gcloud").chmod(0o755)
    environ = {**os.environ, "PATH": f"{stub}{os.pathsep}{os.environ['PATH']}", "PROJECT": "p", **env}
    return subprocess.run(["bash", str(ROOT / "tpu" / name), *(["configs/quickstart.yaml"] if name == "launch.sh"
                                                                else [])],
                          cwd=ROOT, env=environ, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("name,env", [("create.sh", {"SPOT": "yes"}), ("launch.sh", {"FOREGROUND": "true"})])
def test_a_switch_that_is_not_0_or_1_is_refused(name, env, tmp_path):
    # #27 pass 19: SPOT=yes read as 0 and created an on-demand TPU; FOREGROUND=true started in the background
    out = _script(name, tmp_path, **env)
    key, value = next(iter(env.items()))
    assert out.returncode == 2 and out.stderr.strip() == f"error: {key}={value}: give 1 (on) or 0 (off)", out
    assert "gcloud" not in out.stdout


def test_spot_1_creates_a_spot_tpu(tmp_path):
    out = _script("create.sh", tmp_path, SPOT="1")
    assert out.returncode == 0 and "--spot" in out.stdout, out


def test_the_slurm_script_outside_slurm_says_to_submit_it(tmp_path):
    # #27 pass 19: run with bash, it stopped at "SLURM_JOB_NODELIST: unbound variable"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(["bash", str(ROOT / "tpu" / "slurm_gpu.sbatch"), "configs/quickstart.yaml"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "submit it with sbatch" in out.stderr, out
    assert len(out.stderr.splitlines()) == 1
