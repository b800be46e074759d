#!/usr/bin/env bash
# Set up from nothing and run the whole test suite on real local servers.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
