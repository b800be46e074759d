"""The quickstart: local servers, the example config.toml, sample messages, rows counted.

Run by scripts/quickstart.sh after set-up. Everything it starts lives in a temporary
directory and is stopped at the end.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import redis
from clickhouse_driver import Client

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import servers  # noqa: E402

SAMPLES = 5_000
TABLE_DDL = """
    CREATE TABLE IF NOT EXISTS default.events (
        rec_id UInt64, task_for String, function_type String, a Int64, b String
    ) ENGINE = MergeTree ORDER BY rec_id
"""


def local_config(workdir: Path, redis_url: str, clickhouse_port: int) -> Path:
    """The example config.toml, pointed at the servers this demo started."""
    text = (ROOT / "config.toml").read_text()
    text = re.sub(r'(?m)^url = ".*"$', f'url = "{redis_url}"', text)
    text = re.sub(r"(?m)^port = \d+$", f"port = {clickhouse_port}", text)
    text = re.sub(r'(?m)^metrics = ".*"$', 'metrics = ""', text)
    path = workdir / "config.toml"
    path.write_text(text)
    return path


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="flowd-demo-"))
    print(f"starting redis-server and clickhouse-server in {workdir} ...")
    redis_server = servers.start_redis(workdir)
    clickhouse_server = servers.start_clickhouse(workdir)
    flowd = None
    try:
        ch = Client(host=clickhouse_server.host, port=clickhouse_server.port)
        ch.execute(TABLE_DDL)
        r = redis.Redis.from_url(redis_server.url, decode_responses=True)
        config = local_config(workdir, redis_server.url, clickhouse_server.port)
        flowd = subprocess.Popen([sys.executable, "-m", "flowd", "run", "--config", str(config),
                                  "--log-format", "console"],
                                 stderr=open(workdir / "flowd.log", "wb"))  # noqa: SIM115
        print(f"flowd running on {config} (log: {workdir / 'flowd.log'})")

        kinds = ["store", "nlp", "geo"]
        pipe = r.pipeline(transaction=False)
        for i in range(SAMPLES):
            pipe.xadd("BUFF.demo.stream_in", {
                "rec_id": i, "task_for": kinds[i % 3], "function_type": "demo",
                "data": orjson.dumps({"a": i, "b": f"sample {i}"}).decode()})
        pipe.execute()
        print(f"published {SAMPLES} message-hub entries to BUFF.demo.stream_in")

        deadline = time.monotonic() + 60
        count = 0
        while time.monotonic() < deadline:
            count = ch.execute("SELECT count() FROM default.events")[0][0]
            print(f"\r  default.events: {count} rows", end="", flush=True)
            if count >= SAMPLES and r.xlen("BUFF.demo.stream_in") == 0:
                break
            time.sleep(0.2)
        print()
        for task_for, rows in ch.execute(
                "SELECT task_for, count() FROM default.events GROUP BY task_for ORDER BY 1"):
            print(f"  task_for={task_for:<6} {rows} rows")
        print(f"  BUFF.nlp.stream_in: {r.xlen('BUFF.nlp.stream_in')} entries routed "
              "(when task_for = 'nlp')")
        print(f"  BUFF.demo.stream_in: {r.xlen('BUFF.demo.stream_in')} entries left, "
              f"{r.xpending('BUFF.demo.stream_in', 'flowd')['pending']} pending")
        ok = count == SAMPLES
        print("demo OK" if ok else f"demo FAILED: expected {SAMPLES} rows, got {count}")
        return 0 if ok else 1
    finally:
        if flowd is not None:
            flowd.send_signal(signal.SIGTERM)
            flowd.wait(60)
        redis_server.stop()
        clickhouse_server.stop()


if __name__ == "__main__":
    sys.exit(main())
