#!/usr/bin/env bash
# Reproduce the shipped X-ray landmark model and its measured numbers (2 CPU cores, ~2 h).
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

# 3. Post-processing options and the level flag's coverage, chosen on 80 training images (never on
#    validation); copy the model to VertebralLabeling/Resources/Models and put the chosen options
#    into its .json to ship it
.venv/bin/python benchmark/xray_postprocessing.py runs/xray_model3/xray-compact.keras --json runs/xray_post3.json
.venv/bin/python benchmark/xray_level_flag.py runs/xray_model3/xray-compact.keras --grid

# 4. Validation metrics of the shipped model (84 images of the held-out patients)
$VL xray evaluate --images "$DATA/images" --labels "$DATA/labels" --split val \
    --json runs/xray_eval_val.json --overwrite
