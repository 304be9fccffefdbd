"""The upstream-facing side: connect and log in to PostgreSQL, then relay.

Owns: the TCP (and TLS, per ``sslmode``) connection to the resource, the
startup and authentication exchange as the account's database role (trust,
cleartext, md5, SCRAM-SHA-256), collecting ParameterStatus and the real
BackendKeyData, and sending CancelRequests to the upstream backend.

Must not: look at client statements or decide anything; after the handshake
every byte goes straight to the session that owns this connection.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, cast
from typing import Protocol as TypingProtocol

from config.settings import Account, Resource
from config.yamlnodes import ConfigError
from proxy import scram, wire
from proxy.inbox import Inbox

_I32: Final = struct.Struct("!i")

MAX_HANDSHAKE_MESSAGE: Final = 1 << 20


class UpstreamError(Exception):
    """Connecting or logging in upstream failed. ``message`` is safe to show the client."""

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.upstream_sqlstate = sqlstate


class RelaySink(TypingProtocol):
    """What the upstream relays to: the owning client session."""

    def upstream_data(self, data: bytes) -> None: ...
    def upstream_lost(self, exc: BaseException | None) -> None: ...
    def upstream_pause_writing(self) -> None: ...
    def upstream_resume_writing(self) -> None: ...


class UpstreamProtocol(asyncio.Protocol):
    """One upstream connection: an :class:`Inbox` during the handshake, then a relay."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.inbox = Inbox(MAX_HANDSHAKE_MESSAGE, "server")
        self.sink: RelaySink | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None:
            sink.upstream_data(data)
        else:
            self.inbox.feed(data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.sink is not None:
            self.sink.upstream_lost(exc)
        else:
            self.inbox.close(exc)

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_pause_writing()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_resume_writing()

    def attach(self, sink: RelaySink) -> None:
        """Switch to relay mode; bytes that arrived after ReadyForQuery go to ``sink``."""
        self.sink = sink
        rest = self.inbox.take()
        if rest:
            sink.upstream_data(rest)
        if self.closed:
            sink.upstream_lost(None)

    def write(self, data: bytes | memoryview) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(wire.TERMINATE)
            self.transport.close()


@dataclass
class Upstream:
    """A logged-in upstream connection, ready for the relay."""

    protocol: UpstreamProtocol
    parameters: list[tuple[str, str]] = field(default_factory=list)
    backend_pid: int = 0
    backend_secret: bytes = b""
    connect_seconds: float = 0.0


def _ssl_context(resource: Resource) -> ssl.SSLContext:
    if resource.sslmode == "verify-full":
        ctx = ssl.create_default_context(cafile=resource.ca_file)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # sslmode=require: encryption without verification
    return ctx


def _server_error(body: bytes) -> UpstreamError:
    fields = wire.decode_error_fields(b"E\0\0\0\0" + body, 0, len(body) + 5)
    return UpstreamError(
        f"upstream refused the login: {fields.get('M', 'unknown error')}",
        sqlstate=fields.get("C"),
    )


async def _authenticate(
    inbox: Inbox, write: Callable[[bytes], None], account: Account, code: int, body: bytes
) -> None:
    """Answer one authentication request (codes 3, 5, 10); return when it is sent."""

    def password() -> str:
        try:
            value = account.password()
        except ConfigError as unset:
            raise UpstreamError(str(unset)) from None
        if value is None:
            raise UpstreamError(
                f"upstream asks account {account.name!r} for a password but none is configured"
            )
        return value

    if code == 3:
        write(wire.password_message(wire.cstr(password())))
    elif code == 5:
        write(wire.password_message(scram.md5_password(account.user, password(), body[4:8]) + b"\0"))
    elif code == 10:
        mechanisms = body[4:].split(b"\0")
        if scram.MECHANISM.encode() not in mechanisms:
            raise UpstreamError("upstream offers no supported SASL mechanism")
        client = scram.ScramClient(password())
        write(wire.sasl_initial_response(scram.MECHANISM, client.first()))
        kind, reply = await inbox.read_message()
        if kind == ord("E"):
            raise _server_error(reply)
        if kind != ord("R") or _I32.unpack_from(reply, 0)[0] != 11:
            raise UpstreamError("upstream broke the SCRAM exchange")
        try:
            write(wire.password_message(client.final(reply[4:])))
            kind, reply = await inbox.read_message()
            if kind == ord("E"):
                raise _server_error(reply)
            if kind != ord("R") or _I32.unpack_from(reply, 0)[0] != 12:
                raise UpstreamError("upstream broke the SCRAM exchange")
            client.verify(reply[4:])
        except scram.ScramError as exc:
            raise UpstreamError(f"SCRAM with upstream failed: {exc}") from None
    else:
        raise UpstreamError(f"upstream asks for an unsupported authentication method ({code})")


async def connect(resource: Resource, account: Account, params: dict[str, str]) -> Upstream:
    """Open and log in an upstream connection, or raise :class:`UpstreamError`."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    try:
        async with asyncio.timeout(resource.connect_timeout):
            return await _connect(loop, resource, account, params, started)
    except TimeoutError:
        raise UpstreamError(
            f"timed out after {resource.connect_timeout:g}s connecting to resource "
            f"{resource.name!r}"
        ) from None
    except (OSError, wire.ProtocolError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UpstreamError(f"cannot connect to resource {resource.name!r}: {reason}") from None


async def _connect(
    loop: asyncio.AbstractEventLoop, resource: Resource, account: Account,
    params: dict[str, str], started: float,
) -> Upstream:
    transport, protocol = await loop.create_connection(
        UpstreamProtocol, resource.host, resource.port
    )
    ok = False
    try:
        if resource.sslmode != "disable":
            transport.write(wire.encode_ssl_request())
            answer = await protocol.inbox.read_exactly(1)
            if answer != b"S":
                raise UpstreamError(
                    f"resource {resource.name!r} requires TLS (sslmode={resource.sslmode}) "
                    "but the server does not offer it"
                )
            tls = await loop.start_tls(
                transport, protocol, _ssl_context(resource),
                server_hostname=resource.host if resource.sslmode == "verify-full" else None,
            )
            transport = cast(asyncio.Transport, tls)
            protocol.transport = transport
        startup = {"user": account.user, "database": resource.database, **params}
        transport.write(wire.encode_startup(startup))
        upstream = Upstream(protocol)
        while True:
            kind, body = await protocol.inbox.read_message()
            if kind == ord("R"):
                if len(body) < 4:
                    raise wire.ProtocolError("short authentication message", remote="server")
                (code,) = _I32.unpack_from(body, 0)
                if code != 0:
                    await _authenticate(protocol.inbox, transport.write, account, code, body)
            elif kind == ord("S"):
                upstream.parameters.append(
                    wire.decode_parameter_status(b"S\0\0\0\0" + body, 0, len(body) + 5)
                )
            elif kind == ord("K"):
                if len(body) < 8:
                    raise wire.ProtocolError("short BackendKeyData", remote="server")
                (upstream.backend_pid,) = _I32.unpack_from(body, 0)
                upstream.backend_secret = body[4:]
            elif kind == ord("Z"):
                upstream.connect_seconds = time.monotonic() - started
                ok = True
                return upstream
            elif kind == ord("E"):
                raise _server_error(body)
            elif kind in (ord("N"), ord("v")):
                continue
            else:
                raise wire.ProtocolError(
                    f"unexpected message {chr(kind)!r} during upstream login", remote="server"
                )
    finally:
        if not ok:
            transport.close()


async def send_cancel(resource: Resource, pid: int, secret: bytes) -> None:
    """Send a CancelRequest for an upstream backend (best effort, bounded in time)."""
    try:
        async with asyncio.timeout(resource.connect_timeout):
            _, writer = await asyncio.open_connection(resource.host, resource.port)
            writer.write(wire.encode_cancel_request(pid, secret))
            await writer.drain()
            writer.close()
            await writer.wait_closed()
    except (OSError, TimeoutError):
        return
