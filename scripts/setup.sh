#!/usr/bin/env bash
# Create .venv (if missing), install the pinned requirements and build pmlm_engine._C.
# Idempotent: a second run only checks that everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
echo "[setup] installing pinned requirements"
python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
echo "[setup] building pmlm_engine._C (C++ extension) and installing the package (editable)"
python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
python -c "import torch, pmlm_engine._C, pmlm_engine.kernels; print('[setup] ok: torch', torch.__version__)"
