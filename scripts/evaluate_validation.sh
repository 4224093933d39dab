#!/usr/bin/env bash
# Evaluate a weights file on the four validation cases (the top level of shared/data, kept out of
# training): the model beside the sphere baseline and the resolution ceiling, manual-label and
# model-label targets apart, Dice@1/3/5/10, centre rule. Extra arguments go to `fastsam3d evaluate`:
#   scripts/evaluate_validation.sh runs/a/model.safetensors --json runs/a/validation.json
#   scripts/evaluate_validation.sh default --max-targets-per-case 12        # fast mode
#   scripts/evaluate_validation.sh default --rule reference --seeds 3       # the reference rule
# Environment: PYTHON (default: the repository's .venv), DATA (default: ../shared/data), JOBS
# (default: all cores), NICE=1 to run at low priority.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
data=${DATA:-$repo/../shared/data}
model=${1:?usage: scripts/evaluate_validation.sh WEIGHTS|default [fastsam3d evaluate options]}
shift
prefix=()
[[ "${NICE:-0}" == 1 ]] && prefix=(nice)
cd "$repo"
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec "${prefix[@]}" "$python" -m FastSAM3DLib.cli evaluate \
    "$data/train/MANIFEST.json" \
    --cases ct_abdomen_pelvis_totalseg_example,mri_brain_glioma_brats2013,mri_spine_cord_sct_t2,mri_brain_aal_colin27 \
    --model "$model" --baseline sphere --ceiling 1.5,fit --min-voxels 200 \
    --subset deep_grey=mri_brain_aal_colin27:37,38,71-78 \
    --jobs "${JOBS:-$(nproc)}" "$@"
