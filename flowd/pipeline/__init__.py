"""One flow's loop: batches read, decoded, handled, routed, prepared, written and
committed in order, up to `max_in_flight` at once; what happens to each entry is decided in
one place.

May import: `flowd.core`, `flowd.source`, `flowd.plugin`, `flowd.clickhouse`,
`flowd.delivery`.
"""
