#!/usr/bin/env bash
# Install loopformer on every worker: copy this checkout (minus git-ignored files, uncommitted edits
# included), create a venv, install jax[tpu] and the package; optionally mount
# RUN_BUCKET at ~/runs with gcsfuse (needed on pod slices: one run directory shared by all hosts).
#   ./tpu/setup.sh
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"
repo=$(cd "$here/.." && pwd)

archive=$(mktemp -t loopformer-XXXXXX.tar.gz)
trap 'rm -f "$archive"' EXIT
# The working tree: tracked and untracked files, uncommitted edits included, git-ignored files not.
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -czf "$archive")
echo "copying $(du -h "$archive" | cut -f1) to every worker of $TPU_NAME"
tpu_vm scp "$archive" "$TPU_NAME":loopformer.tar.gz --worker=all

# uv brings its own Python (jax $JAX_VERSION needs >= 3.11; the TPU images ship 3.10).
on_all_workers "set -e
rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/loopformer.tar.gz -C ~/$REMOTE_DIR
command -v ~/.local/bin/uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
~/.local/bin/uv venv -q --allow-existing --python $PYTHON_VERSION ~/$VENV
~/.local/bin/uv pip install -q --python ~/$VENV/bin/python 'jax[tpu]==$JAX_VERSION' -e ~/$REMOTE_DIR \
  --find-links https://storage.googleapis.com/jax-releases/libtpu_releases.html
~/$VENV/bin/python -c 'import jax, loopformer; print(\"jax\", jax.__version__)' && echo \"\$(hostname) ready\""

if [[ -n "$RUN_BUCKET" ]]; then
  bucket=${RUN_BUCKET#gs://}
  on_all_workers "set -e
if ! command -v gcsfuse >/dev/null; then
  echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
fi
mkdir -p ~/runs
mountpoint -q ~/runs || gcsfuse --implicit-dirs --rename-dir-limit=200000 $bucket ~/runs"
  echo "mounted gs://$bucket at ~/runs on every worker: pass run.dir=runs to tpu/launch.sh"
fi
