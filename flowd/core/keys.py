"""The names of flowd's own Redis keys, and the hash tags that keep a key in its stream's
Redis Cluster slot. Every module that touches a shared key takes its name from here."""

from __future__ import annotations

from redis.crc import key_slot

__all__ = ["DESIRED_KEY", "LIVE_PREFIX", "MOVE_GROUP", "RECORDS", "hashed_part", "move_key",
           "slot_tag", "source_key"]

RECORDS = "flowd:{registry}:daemons"  # hash: daemon id → its last record (JSON)
LIVE_PREFIX = "flowd:{registry}:live:"  # + daemon id: exists while the daemon is alive
# The desired states (flowd.core.states): one hash per Redis server, in one slot of a cluster.
DESIRED_KEY = "flowd:{control}:desired"
MOVE_GROUP = "flowd-move"  # the consumer group of a move's own flow on its via stream


def source_key(name: str, stream: str) -> str:
    """A source's state (its cursor, flowd.sync.state), in the slot of its first stream, so
    that one script writes the rows and moves the cursor."""
    return f"flowd:{{{slot_tag(stream)}}}:source:{name}"


def move_key(name: str, via: str) -> str:
    """A move's state, in the slot of its via stream (its partitions' hashes extend it)."""
    return f"flowd:{{{slot_tag(via)}}}:move:{name}"


def hashed_part(key: str) -> str:
    """What Redis Cluster hashes of `key`: the text between the first "{" and the next "}"
    when that is not empty, otherwise the whole key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return key


def slot_tag(stream: str) -> str:
    """A hash tag putting a key in `stream`'s cluster slot: "{TAG}" in the key."""
    part = hashed_part(stream)
    if "}" in part:  # hashed whole and holding a "}": no tag can spell it, find a twin
        part = _tag_for_slot(key_slot(stream.encode()))
    return part


def _tag_for_slot(slot: int) -> str:
    n = 0
    while key_slot(b"%d" % n) != slot:  # ~16k tries on average, once per flow
        n += 1
    return str(n)
