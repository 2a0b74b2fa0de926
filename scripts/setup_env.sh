#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the project into it.
# Usage: source scripts/setup_env.sh [extra]
#   no extra: inference only (numpy, scipy, SimpleITK, pillow, onnxruntime, tqdm: label, batch, evaluate)
#   "train":  adds tensorflow-cpu, tf2onnx, onnx (train, xray train, export-onnx)
#   "test":   the train extra plus pytest, jsonschema, ruff, slicer-core, selenium
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if [ -n "${1:-}" ]; then
  .venv/bin/python -m pip install -q -e ".[$1]"
else
  .venv/bin/python -m pip install -q -e .
fi
