"""A small awaitable byte buffer for the handshake phases of a connection.

Owns: turning ``data_received`` callbacks into ``await read_exactly(n)`` and
``await read_message()`` for the short startup and authentication exchanges.
Once a connection is authenticated the protocols stop using this and relay
bytes directly (no per-message awaits on the hot path).

Must not: interpret message contents beyond the framing header.
"""

from __future__ import annotations

import asyncio
import struct

from proxy.wire import ProtocolError

_HEADER = struct.Struct("!Bi")


class Inbox:
    __slots__ = ("_buf", "_closed", "_limit", "_paused", "_remote", "_transport", "_waiter")

    # Past this much unread data the transport is paused: a client that
    # pipelines while the proxy logs in upstream cannot grow memory.
    HIGH_WATER = 1024 * 1024

    def __init__(self, limit: int, remote: str) -> None:
        self._buf = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._closed: BaseException | None = None
        self._limit = limit
        self._remote = remote
        self._transport: asyncio.Transport | None = None
        self._paused = False

    def attach(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def feed(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > self.HIGH_WATER and self._transport is not None and not self._paused:
            self._transport.pause_reading()
            self._paused = True
        self._wake()

    def _maybe_resume(self) -> None:
        if self._paused and len(self._buf) <= self.HIGH_WATER and self._transport is not None:
            self._paused = False
            if not self._transport.is_closing():
                self._transport.resume_reading()

    def close(self, exc: BaseException | None = None) -> None:
        self._closed = exc or ConnectionResetError(f"{self._remote} closed the connection")
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        if self._closed is not None:
            raise self._closed
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            await self._wait()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        self._maybe_resume()
        return data

    async def read_message(self) -> tuple[int, bytes]:
        """One typed message: (type byte, body)."""
        while True:
            if len(self._buf) >= 5:
                kind, length = _HEADER.unpack_from(self._buf, 0)
                if length < 4 or length > self._limit:
                    raise ProtocolError(
                        f"invalid message length {length} during handshake", remote=self._remote
                    )
                if len(self._buf) >= length + 1:
                    body = bytes(self._buf[5 : length + 1])
                    del self._buf[: length + 1]
                    self._maybe_resume()
                    return kind, body
            await self._wait()

    def take(self) -> bytes:
        """Everything buffered so far (handed to the relay when the handshake ends)."""
        data = bytes(self._buf)
        self._buf.clear()
        self._maybe_resume()
        return data
