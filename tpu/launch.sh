#!/usr/bin/env bash
# Start train.py with a config on every worker at once (one JAX process per host; jax.distributed
# finds its peers through the TPU metadata). Training runs in the background under nohup; follow it
# with tpu/logs.sh, stop it with tpu/stop.sh. Running it again resumes from the latest checkpoint.
#   ./tpu/launch.sh configs/quickstart.yaml run.dir=runs mesh.data=-1
#   FOREGROUND=1 ./tpu/launch.sh configs/quickstart.yaml     # stream output, stop with Ctrl-C
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG.yaml [key=value ...]" >&2
  exit 2
fi
config=$1
shift
check_switch FOREGROUND "${FOREGROUND:-0}"
args=$(printf '%q ' --config "$config" "$@")
run="cd ~/$REMOTE_DIR && export LOOPFORMER_DISTRIBUTED=1"
if [[ "${FOREGROUND:-0}" == 1 ]]; then
  on_all_workers "$run && ~/$VENV/bin/python train.py $args"
else
  on_all_workers "$run && setsid nohup ~/$VENV/bin/python train.py $args > train.log 2>&1 < /dev/null & echo \$! > ~/$REMOTE_DIR/train.pid"
  echo "started on every worker of $TPU_NAME; follow with: $here/logs.sh"
fi
