"""The ground every other subpackage stands on: the config (frozen dataclasses, loaded
once), the one error tree, the retry policy, connections to Redis and ClickHouse, the names
of flowd's own Redis keys, the desired states, secrets, the stream wire format, the shape
of a stream entry as read (`replies`).

May import: nothing of flowd outside `core`.
"""
