#!/usr/bin/env bash
# Set up and run the benchmark on local servers (prints figures; takes a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m pip --disable-pip-version-check -q install --no-deps ./bench/plugin \
    >/dev/null 2>&1
exec .venv/bin/python bench/run.py "$@"
