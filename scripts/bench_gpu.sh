#!/usr/bin/env bash
# The GPU benchmark of the engine, in two steps:
#   scripts/bench_gpu.sh stage   (here, with SimpleITK and ../shared/data) -> .gpu/bench/:
#       SimpleITK (the GPU machine has none) as an xz tar of its installed wheel in two parts
#       (the wheel is 53 MB, the tar 28 MB), and the four validation cases' images and labels
#       with a manifest (9.4 MB); with a checkout (28 MB) all of .gpu/bench travels in one
#       64 MiB call (65.9 of 67.1 MB; see docs/performance.md).
#   scripts/bench_gpu.sh OUT     (on the GPU machine) -> OUT/: tests.log, bench.json, bench.md,
#       bench.log; with SimpleITK (unpacked from the staged parts when both are there) also
#       the engine's click-to-mask with zoom on the validation cases: zoom_{auto,fixed}.{log,json}.
# Needs torch (with CUDA), numpy and pytest; without SimpleITK (or scipy, safetensors, the cases)
# the Engine click-to-mask, paste-back, real-case and zoom stages are skipped and bench.md says so.
# About 4 minutes on one H200, plus about a minute per zoom setting (at most 9 minutes in all);
# ZOOM_SPACINGS= (empty) skips the zoom stage, ZOOM_SPACINGS=auto runs one setting.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
STAGE=.gpu/bench
VALIDATION=ct_abdomen_pelvis_totalseg_example,mri_brain_glioma_brats2013,mri_spine_cord_sct_t2,mri_brain_aal_colin27

if [ "${1:-}" = stage ]; then
    set -e
    DATA=${DATA:-../shared/data}
    rm -rf "$STAGE" && mkdir -p "$STAGE/simpleitk" "$STAGE/data/train"
    work=$(mktemp -d)
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
        --python-version 3.11 -d "$work" SimpleITK
    # A wheel is a zip: its files are what an install puts on the path (abi3: any CPython >= 3.11).
    "$PYTHON" -c 'import sys, tarfile, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2] + "/lib")
with tarfile.open(sys.argv[2] + "/simpleitk.tar.xz", "w:xz", preset=9) as tar:
    tar.add(sys.argv[2] + "/lib", arcname=".")' "$work"/*.whl "$work"
    split -n 2 -d "$work/simpleitk.tar.xz" "$STAGE/simpleitk/tar.xz.part"
    rm -rf "$work"
    # Only the validation cases' entries and the two files each names (image, label): the
    # manifest's training cases are not staged, and a manifest entry without its image is an error.
    "$PYTHON" -c 'import json, os, shutil, sys
entries = [e for e in json.load(open(sys.argv[1])) if e["case"] in sys.argv[3].split(",")]
json.dump(entries, open(sys.argv[2], "w"), indent=1)
for e in entries:
    for name in (e["image"], e["label"]):
        target = os.path.join(os.path.dirname(sys.argv[2]), name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(os.path.dirname(sys.argv[1]), name), target)' \
        "$DATA/train/MANIFEST.json" "$STAGE/data/train/MANIFEST.json" "$VALIDATION"
    du -sh "$STAGE"/simpleitk/* "$STAGE"/data/*
    exit 0
fi

OUT=${1:?usage: scripts/bench_gpu.sh stage | OUTPUT_FOLDER}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 2

# SimpleITK from the staged parts, into a folder of its own (nothing of the machine's changes).
parts=("$STAGE"/simpleitk/tar.xz.part00 "$STAGE"/simpleitk/tar.xz.part01)
if ! "$PYTHON" -c "import SimpleITK" 2>/dev/null && [ -f "${parts[0]}" ] && [ -f "${parts[1]}" ]; then
    site=$(mktemp -d)
    cat "${parts[@]}" | "$PYTHON" -c 'import sys, tarfile
tarfile.open(fileobj=sys.stdin.buffer, mode="r|xz").extractall(sys.argv[1], filter="data")' "$site" \
        && export PYTHONPATH=$PYTHONPATH:$site
fi
[ -f "$STAGE/data/train/MANIFEST.json" ] && DATA=${DATA:-$STAGE/data}
DATA=${DATA:-../shared/data}

# The CUDA tests (graphs in fp32 and bf16 against the CPU model) and the model tests
# they rely on; parity (1e-4 against the reference fixtures) runs on the CPU here too.
timeout 90 "$PYTHON" -m pytest -q -p no:cacheprovider Testing/Python/test_acceleration.py \
    Testing/Python/test_attention.py Testing/Python/test_parity.py -rs 2>&1 | tee "$OUT/tests.log"
tests=${PIPESTATUS[0]}

# The benchmark: every ModelRunner variant of FastSAM3D and SAM-Med3D, the accuracy
# rule on the four validation cases with the bundled model (when the data and SimpleITK
# are there), then the compiled variants of FastSAM3D; --budget-s skips what would not fit.
cases=()
have_cases=0
if [ -f "$DATA/train/MANIFEST.json" ] && "$PYTHON" -c "import SimpleITK, scipy, safetensors" 2>/dev/null; then
    have_cases=1
    cases=(--cases "$DATA/train/MANIFEST.json" --case-names "$VALIDATION")
fi
timeout 200 "$PYTHON" -m FastSAM3DLib.bench --device cuda --models fastsam3d,sam-med3d --compile \
    --repeats 100 --warmup 10 --budget-s 150 "${cases[@]}" --out "$OUT" 2>&1 | tee "$OUT/bench.log"
bench=${PIPESTATUS[0]}

# Click-to-mask with zoom: the validation run's sessions on the GPU, one process, each
# prompt timed through the session (the summary's last line; per prompt in the JSON).
zoom=0
if [ "$have_cases" = 1 ]; then
    for spacing in ${ZOOM_SPACINGS-auto fixed}; do
        timeout 120 "$PYTHON" -m FastSAM3DLib.cli evaluate "$DATA/train/MANIFEST.json" --cases "$VALIDATION" \
            --model default --device cuda --spacing "$spacing" --baseline none --min-voxels 200 \
            --max-targets-per-case 12 --jobs 1 --json "$OUT/zoom_$spacing.json" > "$OUT/zoom_$spacing.log" 2>&1 || zoom=1
        tail -n 12 "$OUT/zoom_$spacing.log" | grep -v "targets:"
    done
else
    echo "zoom click-to-mask skipped: needs SimpleITK, scipy, safetensors and the validation cases"
fi
echo "tests exit $tests, bench exit $bench, zoom exit $zoom"
exit $(( tests != 0 || bench != 0 || zoom != 0 ))
