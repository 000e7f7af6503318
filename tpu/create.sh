#!/usr/bin/env bash
# Create a TPU VM: one host (ACCELERATOR_TYPE=v4-8, v5litepod-8, v6e-8) or a pod slice (v4-32, v5litepod-16, ...).
#   PROJECT=my-proj ZONE=us-central2-b ACCELERATOR_TYPE=v4-8 ./tpu/create.sh
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

extra=()
if [[ "$SPOT" == 1 ]]; then
  extra+=(--spot)
fi
echo "creating $TPU_NAME: $ACCELERATOR_TYPE ($RUNTIME_VERSION) in $ZONE, project $PROJECT"
tpu_vm create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${extra[@]}"
tpu_vm describe "$TPU_NAME" --format="table(name,acceleratorType,state,networkEndpoints[].ipAddress.list())"
