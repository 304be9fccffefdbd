"""The local bus between the supervisor and its workers (``workers:`` above 1).

Owns: the framing of control messages, a 4-byte big-endian length and a JSON
object, sent both ways on one stream socket per worker; and the one-byte
notes that travel with each client socket the supervisor hands a worker over
its datagram socket (``SCM_RIGHTS``). Parsing is pure: bytes in, a message
out.

Must not: do I/O beyond reading and writing one frame, or know what the
messages mean (``proxy.supervisor`` and ``proxy.worker_link`` do).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any

# A frame carries at most this much JSON (a SHOW SESSIONS answer of a full worker is far less).
MAX_FRAME = 16 * 1024 * 1024
# The byte sent with a client socket: a session within the connection limit, or one over it.
WITHIN_LIMIT = b"c"
OVER_LIMIT = b"o"

Message = dict[str, Any]
_LENGTH = struct.Struct(">I")


class BusError(Exception):
    """A frame that is not a message of ours: the link is broken."""


def frame(message: Message) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise BusError(f"bus message of {len(body)} bytes is over the {MAX_FRAME} limit")
    return _LENGTH.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    (length,) = _LENGTH.unpack(header)
    if length > MAX_FRAME:
        raise BusError(f"bus frame of {length} bytes announced; at most {MAX_FRAME} allowed")
    return int(length)


def parse(body: bytes) -> Message:
    try:
        message = json.loads(body)
    except ValueError as exc:
        raise BusError(f"bus frame is not JSON: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise BusError("bus frame is not a message (an object with an op)")
    return message


async def read_message(reader: asyncio.StreamReader) -> Message | None:
    """The next message; None at the end of the stream."""
    try:
        header = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise BusError("bus stream ended inside a frame header") from None
        return None
    try:
        body = await reader.readexactly(frame_length(header))
    except asyncio.IncompleteReadError:
        raise BusError("bus stream ended inside a frame") from None
    return parse(body)


def pass_socket(channel: socket.socket, client: socket.socket, over_limit: bool) -> None:
    """Hand ``client`` to the worker at the other end of ``channel`` (a datagram socket)."""
    channel.sendmsg([OVER_LIMIT if over_limit else WITHIN_LIMIT],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", client.fileno()))])


def receive_sockets(channel: socket.socket) -> tuple[list[tuple[socket.socket, bool]], int, bool]:
    """The client sockets waiting on ``channel`` (non-blocking), each with whether it is
    over the connection limit; how many handovers arrived without their socket (this
    process was out of file descriptors: the kernel dropped it, and the supervisor still
    counts it as a session here); and whether the supervisor has gone."""
    received: list[tuple[socket.socket, bool]] = []
    dropped = 0
    while True:
        try:
            note, fds, flags, _address = socket.recv_fds(channel, 1, 4)
        except (BlockingIOError, InterruptedError):
            return received, dropped, False
        if not note and not fds:
            return received, dropped, True
        clients = [socket.socket(fileno=fd) for fd in fds]
        if (note not in (WITHIN_LIMIT, OVER_LIMIT) or len(clients) != 1
                or flags & socket.MSG_CTRUNC):
            for client in clients:  # not one whole handover: drop it, and say so
                client.close()
            dropped += 1
            continue
        received.append((clients[0], note == OVER_LIMIT))
