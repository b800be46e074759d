#!/usr/bin/env bash
# Set up and run the benchmark on local servers (prints figures; takes a few minutes).
#   scripts/bench.sh                                   # every section
#   scripts/bench.sh --only table,stream,wide,publish  # flowd against its peers
#   scripts/bench.sh --only table --entries 200000     # one section, smaller
# Sections and options: .venv/bin/python bench/run.py --help
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The benchmark's own dependencies (the peers' libraries, the wide table's dataset) and
# its CPU-bound handler.
log=$(mktemp)
pip() {  # quiet unless it fails
    if ! .venv/bin/python -m pip --disable-pip-version-check -q "$@" >"$log" 2>&1; then
        cat "$log" >&2
        exit 1
    fi
}
pip install -e '.[bench]'
pip install --no-deps ./bench/plugin
rm -f "$log"
exec .venv/bin/python bench/run.py "$@"
