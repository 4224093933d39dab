#!/usr/bin/env bash
# How the bundled default model is trained (see Resources/models/README.md).
#   1. here (needs SimpleITK): one compact pack of every training case and label map;
#   2. on a GPU machine (numpy + torch are enough): interactive training from the pack.
# A session's GPU time holds one ~8-minute run; each run continues from the last run's weights
# with a fresh optimiser and a short warm-up (the weights travel, the optimiser state does not).
#   scripts/train_default.sh pack            -> .gpu/train.pack, .gpu/maps.pack, .gpu/maps2.pack
#   scripts/train_default.sh train INIT OUT  -> OUT/model.safetensors (on the GPU machine)
#   scripts/train_default.sh stage NAME BACK -> on the lent GPU machine: run NAMEn of a series,
#       from NAME(n-1) when this machine holds it (it keeps ignored files while warm), else from
#       the bundled weights; BACK/NAMEn/ gets train.log, sha256 and the fp16 weights in 15 MB
#       parts (the machine returns files of at most 16 MB): cat part* > model.safetensors
# Settings of a run: DEVICE (cuda; cpu for a dry run), BATCH, LR, STEPS, MINUTES, BOX_P, PART_P, CLICK_DEPTH, FIRST_CLICK_DEPTH, CLICK_FOCUS, SEED, OVERSAMPLE ("NAME=WEIGHT ...").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
data=${DATA:-../shared/data}
python=${PYTHON:-python3}
train_run() {  # INIT OUT
    local init=$1 out=$2
    local packs=()  # every pack this machine holds
    for p in .gpu/train.pack .gpu/maps.pack .gpu/maps2.pack; do [[ -f $p ]] && packs+=(--pack "$p"); done
    for o in ${OVERSAMPLE:-}; do packs+=(--oversample "$o"); done   # NAME=WEIGHT ..., see docs/training.md
    "$python" -m FastSAM3DLib.cli train "${packs[@]}" --box-prompts --box-probability "${BOX_P:-0.3}" --multimask-first-click \
        --part-probability "${PART_P:-0}" --click-depth "${CLICK_DEPTH:-1}" \
        --first-click-depth "${FIRST_CLICK_DEPTH:-${CLICK_DEPTH:-1}}" --click-focus "${CLICK_FOCUS:-0}" \
        --init "$init" --decoder-lr-scale 1 --out "$out" --batch-size "${BATCH:-64}" --steps "${STEPS:-940}" \
        --warmup-steps 30 --lr "${LR:-6e-4}" --max-minutes "${MINUTES:-7.7}" --log-every 20 \
        --checkpoint-every 100000 --seed "${SEED:-2024}" --device "${DEVICE:-cuda}" --no-progress
}

case "${1:?usage: scripts/train_default.sh pack | train INIT OUT | stage NAME BACK}" in
pack)
    mkdir -p .gpu
    # The validation cases (top level of the data folder) are never packed: the training manifest
    # marks them "stored_in_train_folder": false. All three packs (28 MB) and a checkout
    # (28 MB, the bundled file in int8) fit one 64 MiB transfer to the GPU machine; the label
    # maps are in two packs so that a run can leave the second one out.
    "$python" -m FastSAM3DLib.cli pack .gpu/train.pack "$data/train"
    held=()
    for n in 09 10 11 12 13 14 15 16 17 18 19 20; do held+=("synthseg_training_seg_$n"); done
    for n in 38 44 49 54; do held+=("brainweb_subject${n}_crisp"); done
    skip=(); for c in "${held[@]}"; do skip+=(--exclude "$c"); done
    "$python" -m FastSAM3DLib.cli pack .gpu/maps.pack "$data/label_maps" "${skip[@]}"
    # The held-back maps (held out of the earlier runs): every other map excluded.
    skip=()
    for c in $("$python" -c 'import json, sys; held = set(sys.argv[2:]); print(" ".join(
            e["case"] for e in json.load(open(sys.argv[1])) if e["case"] not in held))' \
            "$data/label_maps/MANIFEST.json" "${held[@]}"); do
        skip+=(--exclude "$c")
    done
    "$python" -m FastSAM3DLib.cli pack .gpu/maps2.pack "$data/label_maps" "${skip[@]}"
    ;;
train) train_run "${2:?INIT weights}" "${3:?OUT folder}" ;;
stage)
    name=${2:?NAME}; back=${3:?BACK folder}
    n=1; init=FastSAM3DLib/weights/default.safetensors
    while [[ -f .gpu/runs/$name$n/model.safetensors ]]; do init=.gpu/runs/$name$n/model.safetensors; n=$((n + 1)); done
    run=.gpu/runs/$name$n; mkdir -p "$back/$name$n"
    echo "$run from $init"
    PYTHONUNBUFFERED=1 train_run "$init" "$run" 2>&1 | tee "$back/$name$n/train.log"
    split -b 15M -d "$run/model.safetensors" "$back/$name$n/part"
    sha256sum "$run/model.safetensors" | tee "$back/$name$n/sha256"
    ;;
*) echo "usage: scripts/train_default.sh pack | train INIT OUT | stage NAME BACK" >&2; exit 2 ;;
esac
