"""The `flowd` command: argument parsing and one function per command, and `flowd demo`.
Only here is logging configured.

May import: anything in flowd.
"""

from flowd.cli.main import main

__all__ = ["main"]
