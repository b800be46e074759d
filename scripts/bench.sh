#!/usr/bin/env bash
# Set up and run the benchmark on local servers (prints figures; takes a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m pip --disable-pip-version-check -q install --no-deps ./bench/plugin \
    >/dev/null 2>&1
.venv/bin/python bench/run.py "$@"
# Many daemons on one group: msg/s for 1, 2 and 3 `flowd run` processes on one backlog
# (BENCH_DAEMONS_ENTRIES entries, default 300,000).
echo
exec .venv/bin/python bench/daemons.py --entries "${BENCH_DAEMONS_ENTRIES:-300000}" \
    --daemons 1,2,3
