"""The benchmark's reference relay: asyncio Protocols on uvloop that forward bytes unread.

Owns: accepting on a port and copying each connection's bytes to and from
PostgreSQL, nothing else: no framing, no authentication, no decisions. It is
what any Python relay built on uvloop costs before it does its own work, so
``make bench`` shows the ceiling of a one-process pgvouch on this machine in
the same run (the "bare" columns).

Must not: be used for anything but measuring. It enforces nothing.

Usage: ``python bench/bare_relay.py LISTEN_PORT UPSTREAM_PORT`` (127.0.0.1).
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

HOST = "127.0.0.1"


class _Upstream(asyncio.Protocol):
    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.client.transport is not None:
            self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client.transport is not None:
            self.client.transport.close()


class _Client(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.transport: asyncio.Transport | None = None
        self.upstream: _Upstream | None = None
        self.early: list[bytes] = []  # what arrived before the upstream connection was up

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods
        self.transport = cast(asyncio.Transport, transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(
                lambda: _Upstream(self), HOST, self.upstream_port)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        self.upstream = upstream
        if upstream.transport is not None:
            for data in self.early:
                upstream.transport.write(data)
        self.early = []

    def data_received(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is None:
            self.early.append(data)
        elif upstream.transport is not None:
            upstream.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


async def serve(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(upstream_port), HOST, port)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not all(arg.isdigit() for arg in argv):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:  # the same fallback as pgvouch's
        asyncio.run(serve(int(argv[0]), int(argv[1])))
    else:
        uvloop.run(serve(int(argv[0]), int(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
