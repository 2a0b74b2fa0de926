#!/usr/bin/env bash
# Reproduce the bundled MRI models and the README's accuracy table (about 75 min on 2 idle CPU cores).
# 1. compact-synthetic: trained on procedural synthetic spines only (no real image), two cosine
#    cycles (2400 steps from scratch, then 3000 more from it)
# 2. three leave-one-subject-out folds, fine-tuned from it on synthetic + two real subjects + PAM50
#    (sub-sctcrop is left out of every fold, so it is never seen)
# 3. the shipped model, fine-tuned from it on synthetic + all real subjects + PAM50
# 4. the generalisation table (synthetic-only -> real, LOSO, every stress variant) and the speed benchmark
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh train
VL=.venv/bin/vertebral-labeling
DATA=${VERTEBRAL_LABELING_DATA:-../shared/data}
MODELS=${MODELS_OUT:-runs/models}
SYNTH_SEED=${SYNTH_SEED:-1}
$VL train --synthetic 1 --phantoms 0 --pam50 '' --out "$MODELS/stage1" --name compact-synthetic \
  --steps 2400 --seed "$SYNTH_SEED" --time-budget-min 60
$VL train --synthetic 1 --phantoms 0 --pam50 '' --out "$MODELS" --name compact-synthetic \
  --init "$MODELS/stage1/compact-synthetic.keras" --steps 3000 --learning-rate 1e-3 --seed 2 --time-budget-min 60
for held in sub-errsm18 sub-errsm20 sub-errsm22; do
  $VL train --bids "$DATA/mri/bids" --pam50 "$DATA/mri/pam50" --out "$MODELS/loso" --name compact-loso-$held \
    --init "$MODELS/compact-synthetic.keras" --exclude $held sub-sctcrop --synthetic 0.6 --phantoms 0 \
    --steps 700 --learning-rate 7e-4 --seed 0
done
$VL train --bids "$DATA/mri/bids" --pam50 "$DATA/mri/pam50" --out "$MODELS" --name compact \
  --init "$MODELS/compact-synthetic.keras" --synthetic 0.6 --phantoms 0 --steps 900 --learning-rate 7e-4 --seed 0
.venv/bin/python benchmark/evaluate_generalisation.py --models "$MODELS" --stress "$MODELS/stress" \
  --json "$MODELS/generalisation.json"
VERTEBRAL_LABELING_MODELS="$MODELS" .venv/bin/python benchmark/benchmark_mri.py --bids "$DATA/mri/bids"
