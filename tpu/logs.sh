#!/usr/bin/env bash
# Follow the training log (process 0 prints; set WORKER=n to read another host's log for errors).
#   ./tpu/logs.sh            LINES=200 WORKER=1 ./tpu/logs.sh
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"
tpu_vm ssh "$TPU_NAME" --worker="${WORKER:-0}" --command="tail -n ${LINES:-50} -F ~/$REMOTE_DIR/train.log"
