"""`flowd send`: publish JSON lines to a stream, each checked before it is written."""

from __future__ import annotations

import argparse
import sys

from flowd.cli.common import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, positive_int
from flowd.core import config as config_module
from flowd.core.errors import ConfigError
from flowd.publish import DEFAULT_CHUNK

__all__ = ["add_send"]


def cmd_send(args: argparse.Namespace) -> int:
    from flowd.core.connections import connect_redis_sync
    from flowd.publish import (  # not `from flowd import publish`: that is the function
        InvalidRecord,
        PublishError,
        entry_limit,
        known_streams,
        send_lines,
        stream_limit,
    )

    config = config_module.load(args.config)  # publishing needs no handler installed
    stream, server = args.stream, args.server
    if server and server not in config.redis_servers:
        raise ConfigError(config.path, f"--server {server}: no [redis.{server}] section "
                          f"(named: {', '.join(sorted(config.redis_servers)) or 'none'})")
    known = known_streams(config, server)
    if stream not in known and not args.any_stream:
        on = f' on [redis.{server}]' if server else ""
        raise ConfigError(config.path, f'stream "{stream}" is not read or written by any flow'
                          f"{on} (a typo? --any-stream sends anyway); known: "
                          f"{', '.join(sorted(known)[:20])}")
    max_len = args.max_len if args.max_len is not None else stream_limit(config, stream,
                                                                          server)
    from_file = args.file != "-"
    if from_file:
        try:
            with open(args.file, "rb") as file:
                lines = file.readlines()  # a file is checked whole before any write
        except OSError as exc:
            print(f"flowd: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_CONFIG
    else:
        lines = sys.stdin.buffer  # may never end: checked and written chunk by chunk
    client = connect_redis_sync(config.redis_for(server))
    try:
        written = send_lines(client, stream, lines, check_all_first=from_file,
                             max_len=max_len, chunk=args.chunk,
                             max_entry_bytes=entry_limit(config, stream, server))
    except PublishError as exc:
        print(f"wrote {exc.written} entries to {stream}")
        print(f"flowd: {exc}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, InvalidRecord) else EXIT_FAILURE
    finally:
        client.close()
    print(f"wrote {written} entries to {stream}")
    return EXIT_OK


def add_send(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    send = sub.add_parser("send", help="publish JSON lines (flat objects) to a stream")
    send.add_argument("--config", required=True, help="path to config.toml")
    send.add_argument("--stream", required=True, help="the stream to XADD to")
    send.add_argument("--server", default="", metavar="NAME",
                      help="on the Redis of [redis.NAME] (default: the unnamed [redis])")
    send.add_argument("file", nargs="?", default="-", metavar="FILE|-",
                      help="JSON lines, one flat object per line (default -: stdin)")
    send.add_argument("--max-len", type=positive_int, metavar="N",
                      help="refuse once the stream holds N entries (default: the max_len "
                           "of the config's [[flow.to]] output for this stream, if any)")
    send.add_argument("--any-stream", action="store_true",
                      help="send to a stream no flow reads or writes (another system's)")
    send.add_argument("--chunk", type=positive_int, default=DEFAULT_CHUNK, metavar="N",
                      help=f"entries per server-side write (default {DEFAULT_CHUNK})")
    send.set_defaults(func=cmd_send)
