"""Records/s into a stream through HTTP (100-record requests), next to `flowd send` and
`flowd.publish()`, on one Redis started here; all three write the same 20-field records.

The load generator is an aiohttp client with CONCURRENCY connections kept alive, in its
own process; `flowd serve` answers. On 2 cores the client, the server and Redis share
them: the ratios are what this says, not the absolute rates.

    python bench/http_ingest.py [--records N] [--per-request 100] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "bench"))

import servers  # noqa: E402
from run import publish_record  # noqa: E402

STREAM = "BUFF.bench.http"


def write_config(directory: Path, redis_url: str, port: int) -> Path:
    path = directory / "serve.toml"
    path.write_text(f'[redis]\nurl = "{redis_url}"\n\n[http]\nlisten = "127.0.0.1:{port}"\n'
                    f"max_body_bytes = 104857600\n\n[[flow]]\nname = \"sink\"\n"
                    f'stream = "{STREAM}"\ngroup = "bench"\nhandler = "passthrough"\n')
    return path


async def post_all(port: int, bodies: list[bytes], concurrency: int) -> float:
    import aiohttp

    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    url = f"http://127.0.0.1:{port}/v1/streams/{STREAM}"

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            async with session.post(url, data=body, headers={
                    "Content-Type": "application/json"}) as response:
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
                await response.read()

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--per-request", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="flowd-bench-http-"))
    server = servers.start_redis(workdir)
    client = redis.Redis(host=server.host, port=server.port)
    records = [publish_record(n) for n in range(args.records)]
    figures: dict[str, float] = {}
    try:
        port = servers.free_port()
        serve = subprocess.Popen([sys.executable, "-m", "flowd", "serve", "--config",
                                  str(write_config(workdir, server.url, port)),
                                  "--log-level", "warning"], stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not _answers(port):
                if time.monotonic() > deadline or serve.poll() is not None:
                    raise RuntimeError("flowd serve did not start")
                time.sleep(0.1)
            bodies = [orjson.dumps(records[i:i + args.per_request])
                      for i in range(0, len(records), args.per_request)]
            seconds = asyncio.run(post_all(port, bodies, args.concurrency))
            figures["http"] = args.records / seconds
            assert client.xlen(STREAM) == args.records, "HTTP wrote every record"
        finally:
            serve.send_signal(signal.SIGTERM)
            serve.wait(30)
        client.delete(STREAM)
        lines = workdir / "records.jsonl"
        lines.write_bytes(b"\n".join(map(orjson.dumps, records)) + b"\n")
        config = write_config(workdir, server.url, servers.free_port())
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "flowd", "send", "--config", str(config),
                        "--stream", STREAM, str(lines)], check=True, capture_output=True)
        figures["send"] = args.records / (time.monotonic() - started)  # start-up included
        assert client.xlen(STREAM) == args.records, "flowd send wrote every record"
        client.delete(STREAM)
        import flowd

        started = time.monotonic()
        flowd.publish(client, STREAM, records)
        figures["publish"] = args.records / (time.monotonic() - started)
    finally:
        client.close()
        server.stop()
    print(f"HTTP ingest, {args.records:,} records of 20 fields, {args.per_request} per "
          f"request, {args.concurrency} connections, {os.cpu_count()} cores:")
    print(f"   POST /v1/streams     {figures['http']:>11,.0f} records/s")
    print(f"   flowd send (file)    {figures['send']:>11,.0f} records/s   (process start "
          f"included; HTTP / it = {figures['http'] / figures['send']:.2f}x)")
    print(f"   flowd.publish()      {figures['publish']:>11,.0f} records/s   "
          f"(HTTP / it = {figures['http'] / figures['publish']:.2f}x)")
    return 0


def _answers(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
