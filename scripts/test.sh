#!/usr/bin/env bash
# The test suite on a fresh machine: install (with the test and Slicer-MRML extras), then pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXTRAS="[test,slicer]" bash scripts/setup_env.sh
exec .venv/bin/python -m pytest Testing/Python -q "$@"
