#!/usr/bin/env bash
# The main job on a fresh machine: install, then segment the liver in the bundled sample CT
# from one click with the bundled default model. Output: liver.nii.gz (on the CT's own grid).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
.venv/bin/fastsam3d segment Resources/Samples/ct_abdomen_example.nii.gz -o "${1:-liver.nii.gz}" \
    --point 98,164.3,394.3 --point 104,134.3,400.3 --point 80,209.3,403.3 --space ras
