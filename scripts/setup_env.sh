#!/usr/bin/env bash
# Create ./.venv (once) and install FastSAM3DLib into it. Run by demo.sh and test.sh.
# TORCH_SPEC picks the PyTorch build (default torch==2.13.0); EXTRAS adds optional extras, e.g. "[test,slicer]".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first, so the project's "torch>=" range is already satisfied and nothing larger is pulled in.
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" ${TORCH_SPEC:-torch==2.13.0}
"${PIP[@]}" -e ".${EXTRAS:-}"
