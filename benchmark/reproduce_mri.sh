#!/usr/bin/env bash
# Reproduce the bundled MRI models and the README's accuracy numbers (about 45 min on 2 CPU cores).
# 1. three leave-one-subject-out folds (sub-sctcrop is left out of every fold, so it is never seen)
# 2. the shipped model on all subjects
# 3. leave-one-subject-out evaluation (sctcrop is labeled by the errsm18 fold) and the speed benchmark
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VL=.venv/bin/vertebral-labeling
DATA=${VERTEBRAL_LABELING_DATA:-../shared/data}
MODELS=${MODELS_OUT:-runs/models}
for held in sub-errsm18 sub-errsm20 sub-errsm22; do
  $VL train --bids "$DATA/mri/bids" --pam50 "$DATA/mri/pam50" --out "$MODELS/loso" \
    --name compact-loso-$held --exclude $held sub-sctcrop --steps 1000 --seed 0
done
$VL train --bids "$DATA/mri/bids" --pam50 "$DATA/mri/pam50" --out "$MODELS" --name compact --steps 1000 --seed 0
$VL evaluate --bids "$DATA/mri/bids" --fold-dir "$MODELS/loso" \
  --model "$MODELS/loso/compact-loso-sub-errsm18.onnx" --json "$MODELS/eval_loso.json"
VERTEBRAL_LABELING_MODELS="$MODELS" $VL evaluate --bids "$DATA/mri/bids" --json "$MODELS/eval_trained_on.json"
VERTEBRAL_LABELING_MODELS="$MODELS" .venv/bin/python benchmark/benchmark_mri.py --bids "$DATA/mri/bids"
