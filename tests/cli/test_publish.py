"""`flowd send` and `flowd.publish`: flat records in, whole chunks, and the overflow guard."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from conftest import ROOT

import flowd
from flowd import InvalidRecord, StreamFull

SOURCE = "hub.in"  # a flow's source stream: no max_len
LIMITED = "hub.nlp"  # a stream output with max_len = 100

HUB = f"""
    [[flow]]
    name = "hub"
    stream = "{SOURCE}"
    group = "flowd"
    handler = "passthrough"

      [[flow.to]]
      stream = "{LIMITED}"
      max_len = 100
"""


def send(config: Path, stream: str, *args: str, stdin: bytes | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flowd", "send", "--config", str(config), "--stream", stream,
         *args], input=None if stdin is None else stdin.decode(), capture_output=True,
        text=True, timeout=60)


def json_lines(records: list[dict]) -> bytes:
    return b"".join(orjson.dumps(record) + b"\n" for record in records)


def records(n: int, start: int = 0) -> list[dict]:
    return [{"rec_id": i, "task_for": "nlp", "data": orjson.dumps({"a": i}).decode()}
            for i in range(start, start + n)]


def fill(r: redis.Redis, stream: str, n: int) -> None:
    pipe = r.pipeline()
    for i in range(n):
        pipe.xadd(stream, {"old": str(i)})
    pipe.execute()


def test_send_writes_every_line_of_a_file_in_order_and_says_how_many(
        r: redis.Redis, tmp_path: Path, write_config: Callable[..., Path]) -> None:
    path = tmp_path / "in.jsonl"
    # 2,500 lines: three pipelined chunks; a blank line is skipped, not an error.
    path.write_bytes(json_lines(records(1200)) + b"\n" + json_lines(records(1300, 1200)))

    done = send(write_config(HUB), SOURCE, str(path))

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote 2500 entries to {SOURCE}"
    assert r.xlen(SOURCE) == 2500
    entries = r.xrange(SOURCE)
    assert [int(fields["rec_id"]) for _, fields in entries] == list(range(2500))
    assert entries[7][1] == {"rec_id": "7", "task_for": "nlp", "data": '{"a":7}'}


def test_send_writes_numbers_and_booleans_as_text(
        r: redis.Redis, tmp_path: Path, write_config: Callable[..., Path]) -> None:
    done = send(write_config(HUB), SOURCE, "-",
                stdin=b'{"n": 5, "x": 1.5, "yes": true, "no": false, "s": "caf\xc3\xa9"}\n')

    assert done.returncode == 0, done.stderr
    [(_, fields)] = r.xrange(SOURCE)
    assert fields == {"n": "5", "x": "1.5", "yes": "1", "no": "0", "s": "café"}


def test_send_dash_reads_stdin(r: redis.Redis, write_config: Callable[..., Path]) -> None:
    done = send(write_config(HUB), SOURCE, "-", "--chunk", "100", stdin=json_lines(records(350)))

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote 350 entries to {SOURCE}"
    assert r.xlen(SOURCE) == 350


@pytest.mark.parametrize(("value", "word"), [({"a": 1}, "nested object"),
                                              ([1, 2], "nested array"),
                                              (None, "null")])
def test_send_refuses_a_nested_value_in_a_file_naming_line_and_key_and_writes_nothing(
        value: object, word: str, r: redis.Redis, tmp_path: Path,
        write_config: Callable[..., Path]) -> None:
    lines = records(3000)
    lines[2499]["payload"] = value  # line 2500: past the first chunk (DEFAULT_CHUNK, 2000)
    path = tmp_path / "in.jsonl"
    path.write_bytes(json_lines(lines))

    done = send(write_config(HUB), SOURCE, str(path))

    assert done.returncode == 2
    assert f'line 2500: key "payload": {word}' in done.stderr
    assert "nothing was written" in done.stderr
    assert r.xlen(SOURCE) == 0


def test_send_refuses_a_line_that_is_not_a_json_object(
        r: redis.Redis, tmp_path: Path, write_config: Callable[..., Path]) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(json_lines(records(3)) + b'{"a": 1,\n' + b"[1, 2]\n")

    done = send(write_config(HUB), SOURCE, str(path))

    assert done.returncode == 2
    assert "line 4: not valid JSON" in done.stderr
    assert r.xlen(SOURCE) == 0


def test_send_from_stdin_writes_the_chunks_before_a_bad_line_and_says_how_many(
        r: redis.Redis, write_config: Callable[..., Path]) -> None:
    lines = records(300)
    lines[249]["data"] = {"a": 249}  # line 250, in the third chunk of 100
    done = send(write_config(HUB), SOURCE, "-", "--chunk", "100", stdin=json_lines(lines))

    assert done.returncode == 2
    assert 'line 250: key "data": nested object' in done.stderr
    assert "the 200 entries before it were written" in done.stderr
    # Nothing of the bad line's chunk went in: exactly the first two chunks did.
    assert r.xlen(SOURCE) == 200
    assert [int(f["rec_id"]) for _, f in r.xrange(SOURCE)] == list(range(200))


def test_send_refuses_a_9_mb_line_of_a_file_by_the_default_entry_limit_and_writes_nothing(
        r: redis.Redis, tmp_path: Path, write_config: Callable[..., Path]) -> None:
    lines = records(3)
    lines[1]["blob"] = "x" * 9_000_000  # over max_entry_bytes (8 MiB): HTTP refuses it too
    path = tmp_path / "in.jsonl"
    path.write_bytes(json_lines(lines))

    done = send(write_config(HUB), SOURCE, str(path))

    assert done.returncode == 2
    assert "line 2: is 9000033 bytes, over max_entry_bytes (8388608 bytes); nothing was " \
        "written" in done.stderr
    assert r.xlen(SOURCE) == 0


def test_send_from_stdin_writes_the_chunks_before_an_oversized_line_and_says_so(
        r: redis.Redis, write_config: Callable[..., Path]) -> None:
    config = write_config(HUB.replace('handler = "passthrough"',
                                      'handler = "passthrough"\n    max_entry_bytes = 100'))
    lines = records(30)
    lines[24]["blob"] = "x" * 100  # line 25, in the third chunk of 10
    done = send(config, SOURCE, "-", "--chunk", "10", stdin=json_lines(lines))

    assert done.returncode == 2
    assert "line 25: is 135 bytes, over max_entry_bytes (100 bytes); the 20 entries before " \
        "it were written" in done.stderr
    assert [int(f["rec_id"]) for _, f in r.xrange(SOURCE)] == list(range(20))


def test_send_help_and_readme_give_the_chunk_default_the_code_uses(
        write_config: Callable[..., Path]) -> None:
    from flowd.publish import DEFAULT_CHUNK

    help_text = subprocess.run([sys.executable, "-m", "flowd", "send", "--help"],
                               capture_output=True, text=True, timeout=60).stdout
    assert f"(default {DEFAULT_CHUNK})" in " ".join(help_text.split())
    readme = (ROOT / "README.md").read_text()
    assert f"in chunks of {DEFAULT_CHUNK} (`--chunk N`)" in " ".join(readme.split())


def test_flowd_version_prints_the_version_and_exits_0() -> None:
    done = subprocess.run([sys.executable, "-m", "flowd", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, f"flowd {flowd.__version__}\n")


def test_send_stops_at_the_outputs_max_len_and_reports_how_many_were_written(
        r: redis.Redis, tmp_path: Path, write_config: Callable[..., Path]) -> None:
    fill(r, LIMITED, 90)
    path = tmp_path / "in.jsonl"
    path.write_bytes(json_lines(records(50)))

    done = send(write_config(HUB), LIMITED, str(path))

    assert done.returncode == 1
    assert done.stdout.strip() == f"wrote 10 entries to {LIMITED}"
    assert f"wrote 10 of 50; stream {LIMITED} is full (len 100 >= max_len 100)" in done.stderr
    assert r.xlen(LIMITED) == 100


def test_send_to_a_full_stream_writes_nothing_and_fails(
        r: redis.Redis, write_config: Callable[..., Path]) -> None:
    fill(r, LIMITED, 120)  # already over: a flow's backpressure lets it overshoot

    done = send(write_config(HUB), LIMITED, "-", stdin=json_lines(records(5)))

    assert done.returncode == 1
    assert f"stream {LIMITED} is full (len 120 >= max_len 100)" in done.stderr
    assert r.xlen(LIMITED) == 120


def test_send_max_len_option_limits_a_stream_the_config_leaves_unlimited(
        r: redis.Redis, write_config: Callable[..., Path]) -> None:
    config = write_config(HUB)

    done = send(config, SOURCE, "-", "--max-len", "30", "--chunk", "7",
                stdin=json_lines(records(40)))

    assert done.returncode == 1
    assert "wrote 30; stream hub.in is full (len 30 >= max_len 30)" in done.stderr
    assert r.xlen(SOURCE) == 30


def test_send_refuses_a_stream_no_flow_knows(
        r: redis.Redis, write_config: Callable[..., Path]) -> None:
    done = send(write_config(HUB), "hub.typo", "-", stdin=json_lines(records(1)))

    assert done.returncode == 2
    assert 'stream "hub.typo" is not read or written by any flow' in done.stderr
    assert not r.exists("hub.typo")


def test_send_any_stream_writes_to_a_stream_no_flow_knows(
        r: redis.Redis, write_config: Callable[..., Path]) -> None:
    done = send(write_config(HUB), "elsewhere.in", "--any-stream", "-",
                stdin=json_lines(records(3)))

    assert done.returncode == 0, done.stderr
    assert "wrote 3 entries to elsewhere.in" in done.stdout
    assert [fields["rec_id"] for _, fields in r.xrange("elsewhere.in")] == ["0", "1", "2"]


def test_publish_writes_records_and_returns_the_count(r: redis.Redis) -> None:
    assert flowd.publish(r, SOURCE, records(2500)) == 2500
    assert r.xlen(SOURCE) == 2500
    assert r.xrange(SOURCE, count=1)[0][1]["rec_id"] == "0"


def test_publish_refuses_a_nested_value_before_writing_any_of_a_list(r: redis.Redis) -> None:
    batch = records(1500)
    batch[1200]["data"] = {"nested": True}

    with pytest.raises(InvalidRecord) as refused:
        flowd.publish(r, SOURCE, batch)

    assert refused.value.key == "data"
    assert refused.value.position == "record 1201"
    assert refused.value.written == 0
    assert r.xlen(SOURCE) == 0


def test_publish_stops_at_max_len_and_says_how_many_were_written(r: redis.Redis) -> None:
    fill(r, LIMITED, 95)

    with pytest.raises(StreamFull) as full:
        flowd.publish(r, LIMITED, iter(records(20)), max_len=100)

    assert full.value.written == 5
    assert (full.value.length, full.value.max_len) == (100, 100)
    assert r.xlen(LIMITED) == 100


def test_publish_async_follows_the_same_rules(r: redis.Redis,
                                              redis_server: object) -> None:
    async def main() -> tuple[int, StreamFull]:
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            written = await flowd.publish_async(client, SOURCE, records(1500))
            with pytest.raises(StreamFull) as full:
                await flowd.publish_async(client, SOURCE, records(10), max_len=1504)
            return written, full.value
        finally:
            await client.aclose()

    written, full = asyncio.run(main())

    assert written == 1500
    assert full.written == 4
    assert r.xlen(SOURCE) == 1504
