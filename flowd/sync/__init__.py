"""Sync: what runs on a schedule instead of on arrival — `[[source]]`, rows of a ClickHouse
table written into streams in cursor order, and `[[move]]`, old partitions moved from one
ClickHouse to another through a stream.

Owns: schedules (`schedule`), cursors and the SQL that reads after them (`cursor`), the
script that writes a batch of rows and moves the cursor in one step (`advance`), a
source's state in Redis (`state`) and the loop that runs a source (`source`).
May import: flowd.pipeline (routing rows to outputs), flowd.clickhouse (the server's
connection, to read), flowd.core. Imported by: flowd.admin, flowd.http, flowd.daemon.
"""
