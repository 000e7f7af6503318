#!/usr/bin/env bash
# Stop the training started by tpu/launch.sh on every worker (the process ids it recorded).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"
on_all_workers "if [ -f ~/$REMOTE_DIR/train.pid ]; then kill \$(cat ~/$REMOTE_DIR/train.pid) 2>/dev/null || true; rm -f ~/$REMOTE_DIR/train.pid; fi"
