"""The running process: the worker's lifecycle (start, run, reload, stop), following the
desired state, the supervisor of several workers, the per-server network of clients,
systemd notification, `flowd serve`.

May import: `flowd.http` and down.
"""
