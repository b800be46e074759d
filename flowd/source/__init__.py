"""Reading a stream through its consumer group: every consumer-group command and the one
XREADGROUP reply parser, the shared blocking read for many flows, the reader (own pending
entries, take-overs from dead consumers, claims, new entries), which consumers are dead.

May import: `flowd.core`.
"""
