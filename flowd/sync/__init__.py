"""Sync: what runs on a schedule instead of on arrival — `[[source]]`, rows of a ClickHouse
table written into streams in cursor order, and `[[move]]`, old partitions moved from one
ClickHouse to another through a stream.

Owns: schedules (`schedule`) and what a scheduled job does around its work (`runner`:
desired state, lease, run record); a source's cursor and the SQL that reads after it
(`cursor`), the script that writes a batch of rows and moves the cursor in one step
(`advance`), the re-read window for late rows (`late`) and the source's loop (`source`); a
move's statements on its servers (`partitions`) and its phases (`move`); the state of
both in Redis (`state`).
May import: flowd.pipeline (routing rows to outputs), flowd.clickhouse (the server's
connection, to read), flowd.core. Imported by: flowd.admin, flowd.http, flowd.daemon.
"""
