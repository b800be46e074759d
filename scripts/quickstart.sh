#!/usr/bin/env bash
# Set up flowd and watch it move sample messages from Redis into ClickHouse.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python scripts/demo.py
