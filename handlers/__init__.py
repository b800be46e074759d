"""flowd's built-in handlers, installed as the import package ``flowd_handlers``.

They register under the entry-point group ``flowd.handlers`` in pyproject.toml exactly as a
third-party package would.
"""
