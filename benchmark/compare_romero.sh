#!/usr/bin/env bash
# Equal-budget accuracy comparison of the seed design (romero2018, six regressors) and the
# default compact network on one leave-one-subject-out fold (sub-errsm20 held out; sub-sctcrop
# never seen). romero2018 gets the wall-clock budget the compact fold model used (11 min on
# 2 CPU cores); its 635 MB checkpoints go to runs/ and are never shipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
DATA=${VERTEBRAL_LABELING_DATA:-../shared/data}
export TF_CPP_MIN_LOG_LEVEL=2
.venv/bin/python - "$DATA" <<'PY'
import sys
sys.path.insert(0, "VertebralLabeling")
from VertebralLabelingLib.mri.training.train import train
data = sys.argv[1]
train("runs/romero", f"{data}/mri/bids", f"{data}/mri/pam50", architecture="romero2018",
      steps=1000, batch_size=8, seed=0, time_budget_s=11 * 60, exclude=("sub-errsm20", "sub-sctcrop"),
      name="romero2018-loso-sub-errsm20", learning_rate=1e-4, log=lambda m: print(m, flush=True))
PY
for model in runs/romero/romero2018-loso-sub-errsm20.keras \
             VertebralLabeling/Resources/Models/loso/compact-loso-sub-errsm20.onnx; do
  .venv/bin/vertebral-labeling evaluate --bids "$DATA/mri/bids" --model "$model" \
    --subjects sub-errsm20 sub-sctcrop --json "runs/eval_$(basename "${model%.*}").json"
done
