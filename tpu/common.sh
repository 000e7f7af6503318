#!/usr/bin/env bash
# Settings shared by the tpu/*.sh scripts (sourced, not run). Override any of them from the
# environment, e.g.  TPU_NAME=lf-pod ACCELERATOR_TYPE=v4-32 ./tpu/create.sh
# shellcheck disable=SC2034  # variables are used by the scripts that source this file

: "${TPU_NAME:=loopformer}"                 # TPU VM (or pod slice) name
: "${ZONE:=us-central2-b}"                  # a zone that has ACCELERATOR_TYPE (see tpu/README.md)
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${ACCELERATOR_TYPE:=v4-8}"               # v4-8: one host; v4-32: a 4-host pod slice
: "${RUNTIME_VERSION:=tpu-ubuntu2204-base}" # v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e
: "${REMOTE_DIR:=loopformer}"               # checkout on every worker, relative to the home directory
: "${VENV:=.venv-loopformer}"               # virtual environment on every worker, relative to home
: "${JAX_VERSION:=0.10.2}"                  # must match pyproject's jax pin
: "${PYTHON_VERSION:=3.12}"                 # installed by uv on every worker
: "${RUN_BUCKET:=}"                         # gs://bucket to mount at ~/runs with gcsfuse (pod slices need
                                            # one shared run directory: every host writes its shards there)
: "${SPOT:=0}"                              # 1: create a spot (preemptible) TPU

# A switch is 0 or 1: any other value (yes, true) read as 0 and silently created an on-demand TPU.
check_switch() {
  if [[ "$2" != 0 && "$2" != 1 ]]; then
    echo "error: $1=$2: give 1 (on) or 0 (off)" >&2
    exit 2
  fi
}
check_switch SPOT "$SPOT"

if [[ -z "$PROJECT" ]]; then
  echo "error: set PROJECT or run 'gcloud config set project <id>'" >&2
  exit 2
fi

# gcloud compute tpus tpu-vm <verb> ... in this zone and project.
tpu_vm() {
  local verb=$1
  shift
  gcloud compute tpus tpu-vm "$verb" "$@" --zone="$ZONE" --project="$PROJECT"
}

# Run a shell command on every worker of the slice at once.
on_all_workers() {
  tpu_vm ssh "$TPU_NAME" --worker=all --command="$1"
}
