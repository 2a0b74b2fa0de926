#!/usr/bin/env bash
# The test command from the README: sets up .venv from scratch and runs the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
export TF_CPP_MIN_LOG_LEVEL=2 QT_QPA_PLATFORM=offscreen
.venv/bin/python -m pytest -q -rs "$@"
