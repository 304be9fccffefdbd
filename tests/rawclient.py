"""A tiny blocking PostgreSQL protocol client for tests that need exact bytes.

It speaks just enough (startup, SCRAM, reading messages) to send hand-made
messages through the proxy and look at exactly what comes back.
"""

from __future__ import annotations

import socket
import struct

from proxy import scram, wire


class RawClient:
    def __init__(self, port: int, *, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, n: int) -> bool:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            self.buf += chunk
        return True

    def read_message(self) -> tuple[str, bytes] | None:
        if not self._fill(5):
            return None
        kind, length = struct.unpack("!ci", self.buf[:5])
        if not self._fill(1 + length):
            return None
        body = self.buf[5 : 1 + length]
        self.buf = self.buf[1 + length :]
        return kind.decode(), body

    def read_until_ready(self) -> list[tuple[str, bytes]]:
        out = []
        while True:
            msg = self.read_message()
            if msg is None:
                return out
            out.append(msg)
            if msg[0] == "Z":
                return out

    def startup(self, user: str, password: str, database: str = "app",
                **params: str) -> list[tuple[str, bytes]]:
        self.send(wire.encode_startup({"user": user, "database": database, **params}))
        client = scram.ScramClient(password)
        while True:
            msg = self.read_message()
            assert msg is not None, "connection closed during startup"
            kind, body = msg
            if kind == "R":
                (code,) = struct.unpack("!i", body[:4])
                if code == 10:
                    self.send(wire.sasl_initial_response(scram.MECHANISM, client.first()))
                elif code == 11:
                    self.send(wire.password_message(client.final(body[4:])))
                elif code == 12:
                    client.verify(body[4:])
                elif code == 0:
                    return self.read_until_ready()
            elif kind == "E":
                return [msg]
            elif kind == "v":
                continue

    def close(self) -> None:
        self.sock.close()


def error_fields(body: bytes) -> dict[str, str]:
    return wire.decode_error_fields(b"E\0\0\0\0" + body, 0, len(body) + 5)


def parse(name: str, sql: str) -> bytes:
    return wire.message(b"P", wire.cstr(name) + wire.cstr(sql) + b"\0\0")


def bind(portal: str, statement: str, params: tuple[bytes | None, ...] = ()) -> bytes:
    body = wire.cstr(portal) + wire.cstr(statement) + b"\0\0" + struct.pack("!h", len(params))
    for p in params:
        body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
    return wire.message(b"B", body + b"\0\0")


def execute(portal: str = "") -> bytes:
    return wire.message(b"E", wire.cstr(portal) + b"\0\0\0\0")


def describe(which: str, name: str) -> bytes:
    return wire.message(b"D", which.encode() + wire.cstr(name))


def close(which: str, name: str) -> bytes:
    return wire.message(b"C", which.encode() + wire.cstr(name))


FLUSH = wire.message(b"H")
SYNC = wire.SYNC
