"""What makes a batch's outcome final in Redis: the batch ledger (which entries were
maybe written where), the commit script (stream outputs, dead letters, XACK/XDEL, ledger
clean-up in one call) and copies to streams on another Redis.

May import: `flowd.core` only (it knows neither handlers nor how a stream is read).
"""
