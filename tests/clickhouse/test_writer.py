"""The ClickHouse writer (flowd.clickhouse.writer) on a real server: prepared rows land in
one insert; rows a plan leaves out are not written; an insert whose batch may have been
claimed meanwhile (its send_by passed) is never sent; a missing table is said as such."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import servers
from clickhouse_driver import Client
from conftest import TEST_DB

from flowd.clickhouse.replay import WritePlan
from flowd.clickhouse.writer import ClickHouseWriter, Written
from flowd.core.columns import Columns
from flowd.core.config import ClickHouseConfig
from flowd.core.errors import OwnershipExpired, TableMissing

T = TypeVar("T")
TABLE = f"{TEST_DB}.writes"
IDS = ["1-0", "2-0", "3-0"]


@pytest.fixture
def table(ch: Client) -> str:
    ch.execute(f"CREATE TABLE {TABLE} (rec_id UInt64, name String, at DateTime) "
               "ENGINE = MergeTree ORDER BY rec_id")
    return TABLE


def rows(ids: list[str]) -> Columns:
    n = [int(i.split("-")[0]) for i in ids]
    return Columns(list(ids), {"rec_id": [str(i).encode() for i in n],
                               "name": [f"row {i}".encode() for i in n],
                               "at": [b"2026-01-02 03:04:05"] * len(n)})


def with_writer(clickhouse_server: servers.Server,
                work: Callable[[ClickHouseWriter], Awaitable[T]]) -> T:
    config = ClickHouseConfig(host=clickhouse_server.host, port=clickhouse_server.port,
                              database=TEST_DB, connect_timeout=2, send_receive_timeout=10)
    writer = ClickHouseWriter(config, threads=2)
    try:
        return asyncio.run(work(writer))
    finally:
        writer.close()


def plan(**fields: object) -> WritePlan:
    return WritePlan(token="consumer/1-0/1", send_by=time.monotonic() + 60, **fields)


def written_rows(ch: Client) -> list[tuple[int, str]]:
    return ch.execute(f"SELECT rec_id, name FROM {TABLE} ORDER BY rec_id")


def test_prepared_rows_land_in_one_insert(
        ch: Client, clickhouse_server: servers.Server, table: str) -> None:
    async def work(writer: ClickHouseWriter) -> Written:
        prepared = await writer.prepare(table, rows(IDS))
        assert prepared.rejected == []
        return await writer.write(prepared, plan())

    assert with_writer(clickhouse_server, work) == Written(rows=3, deduplicated=0)
    assert written_rows(ch) == [(1, "row 1"), (2, "row 2"), (3, "row 3")]
    [(parts,)] = ch.execute("SELECT count() FROM system.parts WHERE active AND "
                            f"database = '{TEST_DB}' AND table = 'writes'")
    assert parts == 1


def test_a_row_that_cannot_be_coerced_is_listed_and_the_rest_written(
        ch: Client, clickhouse_server: servers.Server, table: str) -> None:
    bad = rows(IDS)
    bad.data["rec_id"][1] = b"-5"  # not a UInt64

    async def work(writer: ClickHouseWriter) -> Written:
        prepared = await writer.prepare(table, bad)
        assert [entry_id for entry_id, _ in prepared.rejected] == ["2-0"]
        return await writer.write(prepared, plan())

    assert with_writer(clickhouse_server, work).rows == 2
    assert [rec_id for rec_id, _ in written_rows(ch)] == [1, 3]


def test_excluded_and_already_written_rows_are_left_out(
        ch: Client, clickhouse_server: servers.Server, table: str) -> None:
    async def work(writer: ClickHouseWriter) -> Written:
        prepared = await writer.prepare(table, rows(IDS))
        return await writer.write(prepared, plan(exclude=frozenset({"1-0"}),
                                                 written=frozenset({"2-0"})))

    assert with_writer(clickhouse_server, work) == Written(rows=1, deduplicated=1)
    assert written_rows(ch) == [(3, "row 3")]


def test_an_insert_past_its_send_by_is_not_sent_and_writes_nothing(
        ch: Client, clickhouse_server: servers.Server, table: str) -> None:
    async def work(writer: ClickHouseWriter) -> None:
        prepared = await writer.prepare(table, rows(IDS))
        late = WritePlan(token="consumer/1-0/1", send_by=time.monotonic() - 1)
        await writer.write(prepared, late)

    with pytest.raises(OwnershipExpired):
        with_writer(clickhouse_server, work)
    assert written_rows(ch) == []


def test_a_missing_table_is_said_as_such(ch: Client, clickhouse_server: servers.Server) -> None:
    async def work(writer: ClickHouseWriter) -> None:
        await writer.prepare(f"{TEST_DB}.nowhere", rows(IDS))

    with pytest.raises(TableMissing) as missing:
        with_writer(clickhouse_server, work)
    assert missing.value.table == f"{TEST_DB}.nowhere"
