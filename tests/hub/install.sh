#!/usr/bin/env bash
# Installs olah (a self-hosted Hugging Face Hub mirror, PyPI) for the hub test into a virtual
# environment kept outside the clone, and prints the path of its `olah-cli`:
#   export REFDPO_OLAH=$(bash tests/hub/install.sh)
set -euo pipefail
VENV=${REFDPO_HUB_VENV:-$HOME/.cache/refdpo/hubvenv}
if [ ! -x "$VENV/bin/olah-cli" ]; then
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install -q olah==0.5.4 >&2
fi
echo "$VENV/bin/olah-cli"
