#!/usr/bin/env bash
# Installs the Python the tests check refdpo against, into a virtual environment kept outside the
# clone, and prints the path of its python:
#   export REFDPO_PYTHON=$(bash tests/python/install.sh)
# - torch's PyPI wheel, which brings triton 3.9 and its ptxas: the Triton kernels' interpreter
#   tests and their ahead-of-time compilation (src/model/fused/triton/);
# - tensorboard: its own reader of the event files `train.report_to = ["tensorboard"]` writes;
# - datasets (with pyarrow) and xxhash: the `refdpo` Python package (python/refdpo) and its tests;
# - transformers, trl and accelerate: `refdpo.trl.CachedReferenceDPOTrainer` against TRL's own
#   precompute, and the two-process accelerate run.
set -euo pipefail
VENV=${REFDPO_PYTHON_VENV:-$HOME/.cache/refdpo/pyvenv}
if ! "$VENV/bin/python" -c "
import torch, triton, pytest, tensorboard, datasets, xxhash, transformers, trl, accelerate
assert triton.__version__ == '3.9.0' and tensorboard.__version__ == '2.20.0'
assert datasets.__version__ == '5.2.0' and trl.__version__ == '1.16.0'
assert transformers.__version__ == '5.24.0' and accelerate.__version__ == '1.15.0'" 2>/dev/null; then
  python3 -m venv "$VENV" >&2
  "$VENV/bin/python" -m pip install -q torch==2.15.0 pytest numpy tensorboard==2.20.0 \
    datasets==5.2.0 xxhash transformers==5.24.0 trl==1.16.0 accelerate==1.15.0 >&2
fi
echo "$VENV/bin/python"
