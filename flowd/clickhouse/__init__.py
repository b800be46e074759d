"""Writing to ClickHouse, laid out like a sink: table schema and column coercion
(prepare), the replay plan (what an earlier delivery wrote), deduplication by token
(guarantee), the writer (one client per thread, sends guarded by the ownership deadline) and
chDB in-process.

May import: `flowd.core`, and `flowd.delivery` for the ledger's record of earlier deliveries
(`Prior`), which the replay plan reads.
"""
