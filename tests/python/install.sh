#!/usr/bin/env bash
# Installs what checks the tiled attention's Triton source on the CPU (torch's PyPI wheel, which
# brings triton 3.9 and its ptxas; pytest) into a virtual environment kept outside the clone,
# and prints the path of its python:
#   export REFDPO_KERNEL_PYTHON=$(bash tests/kernels/install.sh)
set -euo pipefail
VENV=${REFDPO_KERNEL_VENV:-$HOME/.cache/refdpo/kvenv}
if ! "$VENV/bin/python" -c "import torch, triton, pytest; assert triton.__version__ == '3.9.0'" 2>/dev/null; then
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install -q torch==2.15.0 pytest numpy >&2
fi
echo "$VENV/bin/python"
