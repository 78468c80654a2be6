#!/usr/bin/env bash
# Set up a virtual environment in .venv with torch and acamkd (editable, with test extras).
# Safe to re-run: it only installs what is missing. Nothing is downloaded at run time later.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch/torchvision first and pinned to the build this workplace caches locally (~1 minute);
# pip (not uv/poetry) so that the local wheel cache is used. Any torch >= 2.4 works with acamkd.
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    .venv/bin/pip install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
fi
.venv/bin/pip install -q -e ".[test]"
