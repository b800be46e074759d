"""Handlers: the contract a handler implements (a small Protocol and its batch types), the
decode of stream entries into the handler's input, discovery through the `flowd.handlers`
entry points, and the process pool that runs CPU-bound handlers.

May import: `flowd.core` (the entry type is `flowd.core.replies.Entry`); never `flowd.source`.
"""
