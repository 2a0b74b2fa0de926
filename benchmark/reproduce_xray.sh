#!/usr/bin/env bash
# Reproduce the shipped X-ray models (landmarks + refiner) and their measured numbers (2 CPU cores,
# ~4.5 h).
# Data: ../shared/data/xray-aasce (override with VERTEBRAL_LABELING_DATA). Outputs go to runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${VERTEBRAL_LABELING_DATA:-../shared/data}/xray-aasce"
VL=.venv/bin/vertebral-labeling
export TF_CPP_MIN_LOG_LEVEL=2

# 1. Cobb angles from the ground-truth landmarks vs angles.csv (all 481 images)
$VL xray cobb --images "$DATA/images" --labels "$DATA/labels" --json runs/xray_cobb_gt.json --overwrite

# 2. Train (fixed patient-level split): 42 min from scratch (seed 0), then a second cosine
#    cycle of 20 min from that model (seed 1, peak learning rate 1e-3)
$VL xray train --data "$DATA" --out runs/xray_model --time-budget-min 42 --seed 0
$VL xray train --data "$DATA" --out runs/xray_model2 --init runs/xray_model/xray-compact.keras \
    --learning-rate 1e-3 --time-budget-min 20 --seed 1

#    then 40 min more with the level head added (seed 2; the shared layers are copied from stage 2)
$VL xray train --data "$DATA" --out runs/xray_model3 --init runs/xray_model2/xray-compact.keras \
    --learning-rate 1e-3 --time-budget-min 40 --seed 2 --checkpoint-minutes 8

#    then 68 min more with the T1/L5 anchor heads grown on the level branch, mirrored samples and
#    wider geometry augmentation (seed 5): the shipped landmark model
$VL xray train --data "$DATA" --out runs/xray_model5 --init runs/xray_model3/xray-compact.keras \
    --anchor-head --flip-probability 0.5 --augment-strength 1.3 --learning-rate 7e-4 \
    --time-budget-min 68 --seed 5 --checkpoint-minutes 12

# 3. The vertebra refiner (second stage on crops): 40 min from scratch (seed 0), then a second
#    cosine cycle of 30 min (seed 1, peak learning rate 7e-4)
$VL xray train-refiner --data "$DATA" --out runs/xray_refine --time-budget-min 40 --seed 0
$VL xray train-refiner --data "$DATA" --out runs/xray_refine2 --init runs/xray_refine/xray-refine.keras \
    --learning-rate 7e-4 --time-budget-min 30 --seed 1

# 4. Decoding weights (flip, level, anchors), the levels-not-confirmed rule and the refiner setting,
#    chosen on 80 training images (never on validation); copy the .onnx/.json files to
#    VertebralLabeling/Resources/Models and put the chosen options into the .json files to ship them
.venv/bin/python benchmark/xray_level_flag.py runs/xray_model5/xray-compact.onnx --weights --grid
.venv/bin/python benchmark/xray_refiner.py runs/xray_model5/xray-compact.onnx runs/xray_refine2/xray-refine.onnx
#    the level vote's views and flag (metadata level_vote), chosen on the same images as they are
#    and in two stress variants
.venv/bin/python benchmark/xray_level_vote.py runs/xray_model5/xray-compact.onnx --val
#    the gap-rhythm flag (metadata gap_rhythm: the labelled chains' rhythm and its threshold);
#    it reads the model's level_vote, so put that into the .json first
.venv/bin/python benchmark/xray_gap_flag.py runs/xray_model5/xray-compact.onnx --val

# 5. Validation metrics of the shipped model (84 images of the held-out patients)
$VL xray evaluate --images "$DATA/images" --labels "$DATA/labels" --split val \
    --json runs/xray_eval_val.json --overwrite
