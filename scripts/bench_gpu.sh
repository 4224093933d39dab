#!/usr/bin/env bash
# One GPU call: the CUDA tests, then the benchmark, writing into the folder $1
# (bench.json, bench.md, tests.log, bench.log). Needs torch (with CUDA), numpy and
# pytest; SimpleITK (with scipy, safetensors and ../shared/data, or DATA=...) is optional:
# without it the Engine click-to-mask, paste-back and real-case stages are skipped and
# bench.md says so. About 4 minutes on one H200.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:?usage: scripts/bench_gpu.sh OUTPUT_FOLDER}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 2

# The CUDA tests (graphs in fp32 and bf16 against the CPU model) and the model tests
# they rely on; parity (1e-4 against the reference fixtures) runs on the CPU here too.
timeout 90 "$PYTHON" -m pytest -q -p no:cacheprovider Testing/Python/test_acceleration.py \
    Testing/Python/test_attention.py Testing/Python/test_parity.py -rs 2>&1 | tee "$OUT/tests.log"
tests=${PIPESTATUS[0]}

# The benchmark: every ModelRunner variant of FastSAM3D and SAM-Med3D, the accuracy
# rule on the four validation cases with the bundled model (when the data and SimpleITK
# are there), then the compiled variants of FastSAM3D; --budget-s skips what would not fit.
DATA=${DATA:-../shared/data}
cases=()
if [ -f "$DATA/train/MANIFEST.json" ] && "$PYTHON" -c "import SimpleITK, scipy, safetensors" 2>/dev/null; then
    cases=(--cases "$DATA/train/MANIFEST.json" --case-names
           ct_abdomen_pelvis_totalseg_example,mri_brain_glioma_brats2013,mri_spine_cord_sct_t2,mri_brain_aal_colin27)
fi
timeout 200 "$PYTHON" -m FastSAM3DLib.bench --device cuda --models fastsam3d,sam-med3d --compile \
    --repeats 100 --warmup 10 --budget-s 150 "${cases[@]}" --out "$OUT" 2>&1 | tee "$OUT/bench.log"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, bench exit $bench"
exit $(( tests != 0 || bench != 0 ))
