"""What an operator asks and changes without running the daemon's loop: status, dead
letters, the graph of flows and servers, queries, the registry of daemons, `flowd check`.

May import: everything below it — `flowd.pipeline` and down.
"""
