#!/usr/bin/env bash
# The test command from the README: sets up .venv from scratch, runs ruff (pyproject's [tool.ruff];
# a finding fails the run) and then the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
# The QC-page test drives Debian's Chromium headless (no browser downloads by test tools).
if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing chromium + chromium-driver (apt-get) for the QC-page browser test" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
      >/tmp/vertebral-labeling-apt.log 2>&1 || { echo "apt-get failed, see /tmp/vertebral-labeling-apt.log" >&2; }
  else
    echo "warning: /usr/bin/chromium or /usr/bin/chromedriver missing; the browser test will fail in CI" >&2
  fi
fi
.venv/bin/python -m ruff check .
export TF_CPP_MIN_LOG_LEVEL=2 QT_QPA_PLATFORM=offscreen
.venv/bin/python -m pytest -q -rs "$@"
