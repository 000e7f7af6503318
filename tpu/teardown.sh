#!/usr/bin/env bash
# Delete the TPU VM / pod slice (checkpoints on RUN_BUCKET survive; local ~/runs does not).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"
tpu_vm delete "$TPU_NAME" --quiet
