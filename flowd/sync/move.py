"""One `[[move]]` in a daemon: old partitions of a table on one ClickHouse moved to a table
on another, through the stream `via`, one partition at a time, each dropped from the hot
table only once the cold one holds it, verified.

A partition goes through these phases, each recorded in Redis (the hash KEY:part:ID)
before the step that follows it, so a kill -9 anywhere resumes at the step it was in:
  staging   its rows copied into a snapshot table beside the hot one (flowd.sync.partitions);
  sending   the snapshot's rows written into `via` by position, the position moved in the
            same script (flowd.sync.advance): each row once;
  sent      every row is in `via`: waiting for the move's flow (`move:NAME`, reading `via`
            and writing the cold table, exactly as any flow) to have committed them all;
  verifying the cold partition's checksum must be what it held before plus the snapshot's;
  cutting   the partition removed from the hot table if it still is the snapshot;
  done      the snapshot dropped; the next old partition.
A partition that changed on the hot server during its move, or whose cold copy does not
check, is moved again from a new snapshot, its cold copy dropped first (`redo`) — only
when the cold partition held nothing before the move began; otherwise, or after
MAX_ATTEMPTS, it stops (`stuck`) with the reason in status, and nothing more is dropped.
The cold server down: the flow's batches wait, the verification waits, nothing is dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
import structlog

from flowd.clickhouse.writer import ClickHouseWriter
from flowd.core.columns import Columns
from flowd.core.config import MoveConfig
from flowd.core.keys import MOVE_GROUP, move_key
from flowd.core.replies import text
from flowd.source.group import stream_order
from flowd.source.liveness import Liveness
from flowd.sync.advance import advance
from flowd.sync.partitions import Checksum, Partitions
from flowd.sync.runner import Scheduled
from flowd.sync.schedule import Schedule

__all__ = ["MAX_ATTEMPTS", "MoveRunner"]

log = structlog.get_logger(__name__)

MAX_ATTEMPTS = 3  # a partition moved again this often without checking stops, stuck
WRITTEN_PROBE_S = 0.2  # how often the via stream is looked at while the flow writes


class MoveRunner(Scheduled):
    kind = "move"

    def __init__(self, move: MoveConfig, *, redis: aioredis.Redis, hot: ClickHouseWriter,
                 cold: ClickHouseWriter, owner: str, stopping: asyncio.Event,
                 liveness: Liveness | None = None, interval_s: float = 0.5,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(move.name, Schedule(every=move.every, cron=move.cron), redis=redis,
                         key=move_key(move.name, move.via), owner=owner, stopping=stopping,
                         liveness=liveness, interval_s=interval_s, clock=clock)
        self.move = move
        self.cold = cold
        self.partitions = Partitions(hot, move.table)

    def part_key(self, partition: str) -> str:
        return f"{self.key}:part:{partition}"

    async def work(self) -> str:
        """Every partition in hand, then every old one, oldest first."""
        await self.partitions.prepare()
        active = sorted(text(p) for p in await self.redis.smembers(f"{self.key}:active"))
        old = await self.partitions.old(self.move.older_than)
        for partition in dict.fromkeys([*active, *old]):
            outcome = await self._partition(partition)
            if outcome != "done" and outcome != "stuck":
                return outcome
        return "ok"

    async def _partition(self, partition: str) -> str:
        """Take one partition through its phases: "done", "stuck" or "stopped"."""
        key = self.part_key(partition)
        phase = text(await self.redis.hget(key, "phase") or b"new")
        if phase == "done":  # moved before; rows inserted since make it old again
            phase = "new"
        steps = {"new": self._begin, "redo": self._redo, "staging": self._stage,
                 "sending": self._send, "sent": self._wait_written,
                 "verifying": self._verify, "cutting": self._cut,
                 "dropping": self._drop_hot, "cut": self._finish}
        while phase not in ("done", "stuck"):
            if not await self.may_go_on():
                return "stopped"
            phase = await steps[phase](partition, key)
            if phase is None:
                return "stopped"
            await self.redis.hset(key, mapping={"phase": phase,
                                                f"{phase}_ms": int(self.clock() * 1000)})
        return phase

    async def _begin(self, partition: str, key: str) -> str:
        base = await self.partitions.checksum(self.move.to.table, partition, self.cold)
        await self.redis.sadd(f"{self.key}:active", partition)
        await self.redis.hset(key, mapping={"base": base.text(), "attempts": 1, "error": "",
                                            "started_ms": int(self.clock() * 1000)})
        log.info("moving a partition", move=self.name, partition=partition,
                 cold_rows_before=base.rows)
        return "staging"

    async def _stage(self, partition: str, key: str) -> str:
        snapshot = await self.partitions.snapshot(partition)
        await self.redis.hset(key, mapping={"snapshot": snapshot.text(), "cursor": "0"})
        return "sending"

    async def _send(self, partition: str, key: str) -> str | None:
        snapshot = Checksum.parse(await self.redis.hget(key, "snapshot"))
        while True:
            version, cursor = await self.redis.hmget(key, ["version", "cursor"])
            offset = int(cursor or 0)
            if offset >= snapshot.rows:
                break
            if not await self.may_go_on():
                return None
            names, columns = await self.partitions.read(partition, offset, self.move.batch)
            count = len(columns[0]) if columns else 0
            if count == 0:
                raise RuntimeError(f"the snapshot of partition {partition} holds fewer rows "
                                   f"than counted ({offset} of {snapshot.rows})")
            rows = Columns([None] * count, dict(zip(names, columns, strict=True)))
            done = await advance(self.redis, key, [(self.move.via, 0)], [rows],
                                 version=int(version or 0), cursor=str(offset + count),
                                 read=count)
            if done.done:
                self.run_rows += count
                self.stats.rows += count
        info = await self.redis.xinfo_stream(self.move.via)
        await self.redis.hset(key, "via_last", text(info["last-generated-id"]))
        return "sent"

    async def _wait_written(self, partition: str, key: str) -> str | None:
        """Until the move's flow has read every entry up to the last one sent and holds none
        pending: then the cold table has them all (the flow acks after the insert)."""
        last = stream_order(text(await self.redis.hget(key, "via_last") or b"0-0"))
        while True:
            groups = {text(g["name"]): g for g in await self.redis.xinfo_groups(self.move.via)}
            group = groups.get(MOVE_GROUP)
            if group is not None and int(group["pending"]) == 0 and \
                    stream_order(text(group["last-delivered-id"])) >= last:
                return "verifying"
            if not await self.may_go_on():
                return None
            await self.sleep(WRITTEN_PROBE_S)

    async def _verify(self, partition: str, key: str) -> str:
        base, snapshot = (Checksum.parse(v) for v in await self.redis.hmget(
            key, ["base", "snapshot"]))
        cold = await self.partitions.checksum(self.move.to.table, partition, self.cold)
        if cold == base + snapshot:
            return "cutting"
        return await self._again(partition, key, f"the cold partition holds {cold.rows} rows "
                                 f"(checksum {cold.hash}), {base.rows + snapshot.rows} expected")

    async def _cut(self, partition: str, key: str) -> str:
        snapshot = Checksum.parse(await self.redis.hget(key, "snapshot"))
        if await self.partitions.atomic_cut():
            if await self.partitions.cut(partition, snapshot):
                return "cut"
        else:
            hot = await self.partitions.checksum(self.move.table, partition)
            if hot == snapshot:
                return "dropping"  # recorded before the drop: see _drop_hot
            if hot == Checksum():
                return "cut"  # nothing left on the hot server: nothing to lose
        return await self._again(partition, key, "the hot partition changed during its move")

    async def _drop_hot(self, partition: str, key: str) -> str:
        """Servers without an atomic cut: drop the hot partition, checked just before to be
        the snapshot. After a restart in this phase, a partition that is neither the
        snapshot nor empty may have been dropped and written to since: it stops, stuck."""
        snapshot = Checksum.parse(await self.redis.hget(key, "snapshot"))
        hot = await self.partitions.checksum(self.move.table, partition)
        if hot == snapshot:
            await self.partitions.drop(self.move.table, partition)
        elif hot != Checksum():
            reason = ("the hot partition changed between its check and its drop, around a "
                      "restart: it may hold only rows inserted since; left for an operator")
            await self.redis.hset(key, "error", reason)
            log.error("partition move stuck: nothing more is dropped; see flowd status",
                      move=self.name, partition=partition, reason=reason)
            return "stuck"
        return "cut"

    async def _finish(self, partition: str, key: str) -> str:
        await self.partitions.finish(partition)
        snapshot = Checksum.parse(await self.redis.hget(key, "snapshot"))
        await self.redis.srem(f"{self.key}:active", partition)
        await self.redis.hincrby(self.key, "partitions_moved", 1)
        await self.redis.hincrby(self.key, "rows_moved", snapshot.rows)
        log.info("partition moved, verified and dropped", move=self.name,
                 partition=partition, rows=snapshot.rows)
        return "done"

    async def _again(self, partition: str, key: str, why: str) -> str:
        """Move the partition again from a new snapshot, if its cold copy can be dropped."""
        values = await self.redis.hmget(key, ["base", "attempts"])
        base, attempts = Checksum.parse(values[0]), int(values[1] or 1)
        if base != Checksum() or attempts >= MAX_ATTEMPTS:
            reason = why + ("; the cold partition held rows before the move, so it is not "
                            "dropped to move it again" if base != Checksum() else
                            f"; moved {attempts} times")
            await self.redis.hset(key, "error", reason)
            log.error("partition move stuck: nothing more is dropped; see flowd status",
                      move=self.name, partition=partition, reason=reason)
            return "stuck"
        log.warning("moving the partition again", move=self.name, partition=partition,
                    reason=why, attempt=attempts + 1)
        await self.redis.hset(key, mapping={"attempts": attempts + 1, "error": why})
        return "redo"

    async def _redo(self, partition: str, key: str) -> str:
        await self.partitions.drop(self.move.to.table, partition, self.cold)
        return "staging"

    def record(self) -> dict[str, Any]:
        return {"state": self.state, "rows": self.stats.rows, "runs": dict(self.stats.runs)}
