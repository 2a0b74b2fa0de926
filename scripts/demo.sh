#!/usr/bin/env bash
# The main job from the README: label the discs of INPUT (default: a generated phantom) and write
# markups, CSV, disc-label NIfTI and a QC picture to OUT_DIR (default: out/).
# Usage: bash scripts/demo.sh [INPUT] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export TF_CPP_MIN_LOG_LEVEL=2
OUT=${2:-out}
mkdir -p "$OUT"
INPUT=${1:-}
if [ -z "$INPUT" ]; then
  INPUT="$OUT/phantom.nii.gz"
  .venv/bin/vertebral-labeling phantom --synthetic T2 "$INPUT"
fi
NAME=$(basename "$INPUT"); NAME=${NAME%%.*}
.venv/bin/vertebral-labeling label "$INPUT" -o "$OUT/$NAME.mrk.json" --csv "$OUT/$NAME.csv" \
  --dlabel "$OUT/${NAME}_label-discs_dlabel.nii.gz" --qc "$OUT/${NAME}_qc.png" --overwrite
echo "outputs in $OUT/"
