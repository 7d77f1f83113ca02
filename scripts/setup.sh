#!/usr/bin/env bash
# Create .venv (if needed) and install lore-pl into it with its test extras.
# TORCH_SPEC picks the torch build (default: torch==2.13.0, a CPU build where the machine has one).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import lore_pl, lightning, torch; print(f'lore-pl ready: torch {torch.__version__}, lightning {lightning.__version__}')"
