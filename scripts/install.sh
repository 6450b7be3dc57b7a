#!/usr/bin/env bash
# Install diyllm (editable, with test tools) without pulling a multi-GB CUDA build of PyTorch.
#
# If torch is already importable it is kept (any version >= 2.4 works). Otherwise a CPU build is
# installed first: pip finds torch==2.13.0+cpu on machines with a local wheel mirror; elsewhere set
# TORCH_INDEX_URL to PyTorch's CPU wheel index (see README), or install the torch you want first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  echo "installing a CPU build of PyTorch"
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$PYTHON" -m pip install "torch==${TORCH_VERSION:-2.13.0}" --index-url "$TORCH_INDEX_URL"
  else
    "$PYTHON" -m pip install "torch==${TORCH_VERSION:-2.13.0}"
  fi
fi
"$PYTHON" -m pip install -e ".[dev,data]"
"$PYTHON" -c "import diyllm, torch; print(f'diyllm {diyllm.__version__} installed with torch {torch.__version__}')"
