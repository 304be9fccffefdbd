"""The client-facing side of one session.

Owns: the startup exchange with the client (SSL/GSS negotiation, protocol
version negotiation, cancel requests, SCRAM or trust authentication), then
the relay between the client and its upstream connection: every client
statement goes through ``decide()`` before it is forwarded, denied units are
answered with PostgreSQL's own error semantics, and flow control pauses the
side that is producing faster than the other can consume.

How a denial keeps PostgreSQL's semantics: the denied unit is not forwarded;
instead the proxy sends a *poison* Parse that the server rejects, plus Sync.
The server's own error aborts a transaction block exactly as the real
statement's error would, and the proxy replaces that error with its own
(policy name, message, SQLSTATE) before relaying the server's
ReadyForQuery. Because the poison travels in order with everything else,
responses reach the client in the order it sent its messages.

A client that asks for ``dbname=pgvouch`` gets the admin console instead of
an upstream connection: once authenticated, its messages go to
``proxy.console``, which answers them itself.

Must not: parse SQL (deciders do), or know about listeners and signals
(``proxy.server`` does).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
import time
from collections import deque
from typing import TYPE_CHECKING, Final, cast

from proxy import scram, sqlstate, wire
from proxy.console import Console, wants_console
from proxy.decide import ALLOW, Decision, Hold, SessionInfo, Statement, Unit, deny
from proxy.extended import ExtendedTracker, PreparedSql
from proxy.function_catalog import CatalogError
from proxy.inbox import Inbox
from proxy.phases import Phase, advance
from proxy.startup import StartupRefused, Target, changes_lexing, lexing_setting_is_safe, resolve
from proxy.upstream import UpstreamError, UpstreamProtocol, connect

if TYPE_CHECKING:
    from proxy.server import ProxyServer

log = logging.getLogger("pgvouch.session")

_I32: Final = struct.Struct("!i")

# Module constants are Final: compiled (mypyc), a Final name is a C constant or
# static, where any other module global is a dictionary lookup at each use.

# client message types
_Q: Final = 0x51  # Query
_P: Final = 0x50  # Parse
_B: Final = 0x42  # Bind
_D: Final = 0x44  # Describe
_E: Final = 0x45  # Execute
_C: Final = 0x43  # Close
_S: Final = 0x53  # Sync
_H: Final = 0x48  # Flush
_F: Final = 0x46  # FunctionCall
_X: Final = 0x58  # Terminate
_d: Final = 0x64  # CopyData
_BATCH: Final = frozenset(b"PBDEC")
_COPY: Final = frozenset(b"dcf")
# server message types the relay watches
_Z: Final = 0x5A  # ReadyForQuery
_PARSE_OK: Final = 0x31  # ParseComplete
_BIND_OK: Final = 0x32  # BindComplete
_CLOSE_OK: Final = 0x33  # CloseComplete
_ERR: Final = 0x45  # ErrorResponse
_PSTATUS: Final = 0x53  # ParameterStatus
_COPY_OUT: Final = 0x48  # CopyOutResponse
_WATCH: Final = frozenset(b"Z123ESGHW")
_WATCH_TABLE: Final = wire.type_table(b"Z123ESGHW")
_PARSE_CACHE_MAX: Final = 4096
_STATUS: Final = tuple(bytes((i,)) for i in range(256))  # ReadyForQuery status byte -> bytes
_IDLE_STATUS: Final = 0x49  # "I"

# phase changes on the hot path, computed once from the table in proxy.phases
_READY: Final = Phase.READY
_IN_QUERY: Final = Phase.IN_QUERY
_IN_COPY: Final = Phase.IN_COPY
_CLOSED: Final = Phase.CLOSED
_FORWARDED: Final = advance(_READY, "forward")
_QUERY_DONE: Final = advance(_IN_QUERY, "idle")

# The probe: Parse and Close a named ROLLBACK (Parse of a transaction-exit
# statement is accepted even in an aborted transaction), then Flush. The
# server answers ParseComplete + CloseComplete unless it is skipping messages
# after an error, in which case it answers nothing (its error was already
# flushed). Nothing is created or run.
_PROBE: Final = (
    wire.message(b"P", wire.cstr("pgvouch_probe") + wire.cstr("ROLLBACK") + b"\x00\x00")
    + wire.message(b"C", b"S" + wire.cstr("pgvouch_probe"))
    + wire.message(b"H")
)

# A statement the server always rejects at Parse time, so nothing is created
# or dropped (not even the unnamed statement) and no transaction is touched
# beyond what an error does. The name keeps the unnamed statement intact.
POISON_SQL: Final = "pgvouch: statement refused"
POISON_PARSE: Final = wire.message(b"P", wire.cstr("pgvouch_denied") + wire.cstr(POISON_SQL) + b"\x00\x00")
FLUSH: Final = wire.message(b"H")


def is_poison_error(fields: dict[str, str]) -> bool:
    """The server's answer to the poison (or to anything in an aborted transaction)."""
    code = fields.get("C")
    return code == "25P02" or (code == "42601" and "pgvouch" in fields.get("M", ""))
_SERVER_MAX_MESSAGE: Final = (1 << 30) + (1 << 20)
WRITE_HIGH_WATER: Final = 256 * 1024
BATCH_BUFFER_LIMIT: Final = 8 * 1024 * 1024
HELD_INPUT_LIMIT: Final = 1024 * 1024  # what a client may pipeline behind a held unit


class _Cycle:
    """One sync point forwarded upstream (one ReadyForQuery to come)."""

    __slots__ = ("boundary", "copyends_before", "replaced", "subst", "watch")

    def __init__(self, boundary: int, copyends_before: int, subst: Decision | None) -> None:
        self.boundary = boundary  # the message that ends it: Sync, Query or FunctionCall
        self.copyends_before = copyends_before  # CopyDone/CopyFail sent since the previous one
        self.subst = subst  # a denial: the cycle answers a poison
        self.replaced = False
        self.watch: _Watch | None = None


_PLAIN_SYNC: Final = _Cycle(_S, 0, None)  # shared, never modified
_PLAIN_QUERY: Final = _Cycle(_Q, 0, None)


class _Watch:
    """A released hold whose statement is in flight: report how it went."""

    __slots__ = ("error", "hold")

    def __init__(self, hold: Hold) -> None:
        self.hold = hold
        self.error: str | None = None


class Fatal(Exception):
    """End the session with a FATAL error the client sees."""

    def __init__(self, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.hint = hint


class ClientSession(asyncio.Protocol):
    """One client connection and, once authenticated, its upstream connection."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        settings = server.settings
        self.settings = settings
        self.id = secrets.token_hex(4)
        self.phase = Phase.STARTUP
        self.transport: asyncio.Transport | None = None
        self.inbox = Inbox(64 * 1024, "client")
        self.upstream: UpstreamProtocol | None = None
        self.info: SessionInfo | None = None
        self.target: Target | None = None
        self.peer = ""
        self.opened = time.time()
        self.key_pid = 0
        self.key_secret = b""
        self.backend_pid = 0
        self.backend_secret = b""
        self.tls = False
        # relay state
        self.framer = wire.Framer(settings.limits.max_message_size, "client")
        self.server_framer = wire.Framer(_SERVER_MAX_MESSAGE, "server")
        self.tracker = ExtendedTracker()
        # one entry per sync point forwarded upstream, oldest first
        self.cycles: deque[_Cycle] = deque()
        self.open_extended = False  # extended messages forwarded since the last sync point
        self.open_error = False  # ... and the server already reported an error for them
        self.open_cycle: _Cycle | None = None  # what is known about the cycle not yet synced
        self.probe = 0  # 1: probe sent; 2: its ParseComplete seen
        self.probe_ok = False  # the probe showed no error: the waiting Query may go
        self.copyends = 0  # CopyDone/CopyFail forwarded since the last sync point
        self.client_copy = False  # the server is in COPY IN until the client ends it
        self.barrier = False  # waiting for the server before deciding more
        self.barrier_pending = False
        self.substitutions = 0
        self.watchers = 0
        self.pending_watch: _Watch | None = None
        # a unit held for a decision, and what the client sent behind it
        self.held: Hold | None = None
        self.held_unit = b""
        self.held_batch = False
        self.held_input = bytearray()
        self._hold_task: asyncio.Task[None] | None = None
        self.batch_open = False
        self.batch_mark = 0
        self.batch_buf = bytearray()
        self.batch_statements: list[Statement] = []
        # the last Parse message and what it decoded to (clients repeat them)
        self.last_parse: tuple[bytes, str, PreparedSql] = (b"", "", PreparedSql("", ()))
        self.lexing_safe: str | None = None  # the last SQL found not to change lexing
        self.skipping: Decision | None = None
        self.tx_status = b"I"
        # counters (summed by the metrics collector; no locks on the hot path)
        self.bytes_in = 0
        self.bytes_out = 0
        self.decisions: dict[str, int] = {"allow": 0, "deny": 0}
        self._handshake_task: asyncio.Task[None] | None = None
        self._closing = False
        self.console: Console | None = None  # dbname=pgvouch: the admin console
        self.writable = asyncio.Event()  # clear while the client's write buffer is full
        self.writable.set()

    # ------------------------------------------------------------------ asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.inbox.attach(self.transport)
        self.server.session_started(self)
        self._handshake_task = asyncio.get_running_loop().create_task(self._handshake())

    def data_received(self, data: bytes) -> None:
        if self.upstream is not None and self.phase is not _CLOSED:
            self.bytes_in += len(data)
            if self.held is not None or self.barrier or self.probe:
                self._buffer_input(data)
                return
            try:
                self._relay_client(data)
            except wire.ProtocolError as exc:
                self._fatal(sqlstate.PROTOCOL_VIOLATION, f"protocol violation: {exc}")
        else:
            self.inbox.feed(data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.inbox.close(exc)
        if self.held is not None:
            self.held.cancel("the client disconnected")
        if self._handshake_task is not None and not self._handshake_task.done():
            self._handshake_task.cancel()
        self._finish()

    def pause_writing(self) -> None:
        self.writable.clear()
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writable.set()
        up = self.upstream
        if up is not None and up.transport is not None and not up.closed:
            up.transport.resume_reading()

    # called by the upstream protocol
    def upstream_pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def upstream_resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def upstream_lost(self, exc: BaseException | None) -> None:
        if self.phase is Phase.CLOSED:
            return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(wire.error_response(
                sqlstate.CONNECTION_FAILURE, "the upstream server closed the connection",
                severity="FATAL",
            ))
        self._close()

    # ---------------------------------------------------------------- handshake
    async def _handshake(self) -> None:
        limits = self.settings.limits
        try:
            async with asyncio.timeout(limits.auth_timeout) as deadline:
                startup = await self._read_startup()
                if startup is None:
                    return
                self.phase = advance(self.phase, "startup")
                if self.server.at_capacity(self):
                    raise Fatal(sqlstate.TOO_MANY_CONNECTIONS, "sorry, too many clients already")
                user = startup.params.get("user", "")
                await self._authenticate(user)
                self.phase = advance(self.phase, "authenticated")
                if wants_console(self.settings, startup.params):
                    deadline.reschedule(None)  # logged in: no more time limit
                    await self._serve_console(user, startup.params)
                    return
                try:
                    target = resolve(self.settings, startup.params)
                except StartupRefused as refused:
                    raise Fatal(refused.code, str(refused), refused.hint) from None
                self.target = target
                params = target.upstream_params
                read_only = getattr(self.server.decider, "read_only", None)
                if read_only is not None and read_only(
                    target.user, self.settings.groups_of(target.user), target.resource.name,
                    target.account.name,
                ):
                    # no write can ever be allowed here: have the server refuse them too,
                    # should one hide where the classifier cannot see it
                    params = {**params, "default_transaction_read_only": "on"}
                try:
                    upstream = await connect(target.resource, target.account, params)
                except UpstreamError as unreachable:
                    self.server.metrics_upstream_failure()
                    raise Fatal(sqlstate.UPSTREAM_UNAVAILABLE, str(unreachable)) from None
                functions = self.server.functions
                if functions is not None:
                    # fail closed: without the resource's functions, a read calling a
                    # volatile one could not be told from a plain read
                    try:
                        await functions.ensure(target.resource, target.account)
                    except CatalogError as unread:
                        upstream.protocol.close()
                        raise Fatal(sqlstate.UPSTREAM_UNAVAILABLE, str(unread)) from None
                    except BaseException:  # timed out, or the client went away meanwhile
                        upstream.protocol.close()
                        raise
            self.server.metrics_upstream_connected(upstream.connect_seconds)
            self._start_relay(target, upstream.protocol, upstream.parameters,
                              upstream.backend_pid, upstream.backend_secret)
        except Fatal as exc:
            self._fatal(exc.code, str(exc), exc.hint)
        except TimeoutError:
            self._fatal(sqlstate.PROTOCOL_VIOLATION, "authentication timed out")
        except wire.ProtocolError as invalid:
            self._fatal(sqlstate.PROTOCOL_VIOLATION, f"invalid startup: {invalid}")
        except (ConnectionError, asyncio.CancelledError):
            self._close()

    async def _read_packet(self) -> bytes:
        length = wire.startup_length(await self.inbox.read_exactly(4))
        return await self.inbox.read_exactly(length - 4)

    async def _read_startup(self) -> wire.StartupMessage | None:
        ssl_done = False
        while True:
            packet = wire.decode_startup_packet(await self._read_packet())
            if isinstance(packet, wire.CancelRequest):
                await self.server.cancel(packet.pid, packet.secret)
                self._close()
                return None
            if isinstance(packet, wire.SpecialRequest):
                if packet.code == wire.SSL_REQUEST and not ssl_done and self.server.ssl_context:
                    if self.inbox.take():
                        # bytes sent before the TLS handshake would be trusted as if
                        # they came over TLS (CVE-2021-23214): refuse.
                        raise wire.ProtocolError("data received before the TLS handshake")
                    assert self.transport is not None
                    self.transport.write(b"S")
                    loop = asyncio.get_running_loop()
                    tls = await loop.start_tls(
                        self.transport, self, self.server.ssl_context, server_side=True
                    )
                    self.transport = cast(asyncio.Transport, tls)
                    self.inbox.attach(self.transport)
                    self.tls = True
                    ssl_done = True
                else:
                    assert self.transport is not None
                    self.transport.write(b"N")
                continue
            if packet.minor > 0 or packet.protocol_options:
                assert self.transport is not None
                self.transport.write(
                    wire.negotiate_protocol_version(0, packet.protocol_options)
                )
            return packet

    async def _read_password_message(self) -> bytes:
        kind, body = await self.inbox.read_message()
        if kind != ord("p"):
            raise wire.ProtocolError(f"expected a password message, got {chr(kind)!r}")
        return body

    async def _authenticate(self, user: str) -> None:
        assert self.transport is not None
        entry = self.settings.users.get(user)
        if self.settings.client_auth == "trust":
            if entry is None:
                self.server.metrics_auth_failure("unknown_user")
                raise Fatal(sqlstate.NOT_AUTHORIZED, f'user "{user}" is not known to pgvouch')
            return
        verifier: scram.Verifier | None = None
        if entry is not None and entry.password_verifier:
            try:
                verifier = scram.parse_verifier(entry.password_verifier)
            except scram.ScramError:
                log.error("user %s has an unusable password_verifier", user)
        mock = verifier is None
        exchange = scram.ScramServer(
            verifier or scram.mock_verifier(user, self.server.server_secret), mock=mock
        )
        self.transport.write(wire.auth_sasl([scram.MECHANISM]))
        reader = wire.Reader(await self._read_password_message())
        mechanism = reader.cstring()
        if mechanism != scram.MECHANISM:
            raise Fatal(sqlstate.PROTOCOL_VIOLATION,
                        "client selected an invalid SASL authentication mechanism")
        length = reader.int32()
        first = reader.bytes(length) if length >= 0 else b""
        try:
            self.transport.write(wire.auth_sasl_continue(exchange.first(first)))
            final = exchange.final(await self._read_password_message())
        except scram.ScramError as exc:
            self.server.metrics_auth_failure("password")
            log.info("authentication failed for user %r from %s: %s", user, self.peer, exc)
            raise Fatal(sqlstate.INVALID_PASSWORD,
                        f'password authentication failed for user "{user}"') from None
        self.transport.write(wire.auth_sasl_final(final))

    def _start_relay(self, target: Target, upstream: UpstreamProtocol,
                     parameters: list[tuple[str, str]], backend_pid: int,
                     backend_secret: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            upstream.close()
            return
        self.upstream = upstream
        self.backend_pid, self.backend_secret = backend_pid, backend_secret
        self.key_pid, self.key_secret = self.server.register_key(self)
        self.info = SessionInfo(
            session_id=self.id,
            user=target.user,
            groups=self.settings.groups_of(target.user),
            resource=target.resource.name,
            account=target.account.name,
            application_name=target.upstream_params.get("application_name", ""),
            client_addr=self.peer,
            options=dict(target.pgvouch),
            server_params=dict(parameters),
        )
        out = [wire.auth_ok()]
        out += [wire.parameter_status(name, value) for name, value in parameters]
        out.append(wire.backend_key_data(self.key_pid, self.key_secret))
        out.append(wire.ready_for_query(b"I"))
        self.transport.write(b"".join(out))
        if upstream.transport is not None:
            upstream.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.phase = advance(self.phase, "upstream_ready")
        log.info(
            "session opened id=%s user=%s resource=%s account=%s client=%s tls=%s app=%r",
            self.id, target.user, target.resource.name, target.account.name, self.peer,
            self.tls, self.info.application_name,
        )
        leftover = self.inbox.take()
        upstream.attach(self)
        if leftover:
            self.data_received(leftover)

    async def _serve_console(self, user: str, params: dict[str, str]) -> None:
        """The admin console: each message in order, answered by ``proxy.console``."""
        assert self.transport is not None
        transport = self.transport
        console = self.console = Console(self.server, user, params.get("application_name", ""))
        self.phase = advance(self.phase, "console")
        self.key_pid, self.key_secret = self.server.register_key(self)
        transport.write(console.greeting(self.key_pid, self.key_secret))
        log.info("console session opened id=%s user=%s client=%s tls=%s", self.id, user,
                 self.peer, self.tls)
        try:
            while True:
                kind, body = await self.inbox.read_message()
                answer = await console.receive(kind, body)
                if answer is None or transport.is_closing():
                    break
                transport.write(answer)
                await self.writable.wait()  # a client that does not read gets no more answers
        except wire.ProtocolError as exc:
            raise Fatal(sqlstate.PROTOCOL_VIOLATION, f"protocol violation: {exc}") from None
        finally:
            log.info("console session closed id=%s user=%s duration=%.3fs", self.id, user,
                     time.time() - self.opened)
        self._close()

    # ---------------------------------------------------- client → upstream relay
    def _decide(self, unit: Unit) -> Decision:
        assert self.info is not None
        try:
            decision = self.server.decider.decide(self.info, unit)
        except Exception:
            log.exception("decider failed; statement refused (session %s)", self.id)
            decision = deny(
                "pgvouch could not evaluate this statement, so it was not run",
                code=sqlstate.INTERNAL_ERROR,
            )
        decisions = self.decisions
        action = decision.action
        decisions[action] = decisions.get(action, 0) + 1
        return decision

    def _relay_client(self, data: bytes) -> None:
        chunk, messages = self.framer.feed(data)
        if not messages:
            return
        fwd = 0  # chunk[fwd:] is not yet written upstream
        tracker = self.tracker
        for kind, start, end in messages:
            if self.client_copy:
                # The server is in COPY IN: it takes CopyData, ends the copy at
                # CopyDone/CopyFail, and ignores Sync and Flush (libpq relies on
                # that). Anything else would be consumed as a copy error, never
                # run: refuse it rather than guess.
                if kind in _COPY:
                    if kind != _d:
                        self.client_copy = False
                        self.copyends += 1
                elif kind not in (_S, _H, _X):
                    raise wire.ProtocolError(
                        f"unexpected message type {chr(kind)!r} during COPY FROM STDIN")
                if kind == _X:
                    self._write_up(chunk, fwd, end)
                    self._close()
                    return
                continue
            if self.skipping is not None and kind != _X:
                # after a denial inside an extended batch, PostgreSQL discards
                # everything up to Sync; so does the proxy, then forwards the Sync
                self._write_up(chunk, fwd, start)
                if kind == _S:
                    self._boundary(_S)
                    self.skipping = None
                    fwd = start
                else:
                    fwd = end
                continue
            if kind in _BATCH:
                if not self.batch_open:
                    if start > fwd:
                        self._write_up(chunk, fwd, start)
                    fwd = start
                    self.batch_open = True
                    self.batch_mark = tracker.mark()
                if not isinstance(chunk, bytes):
                    chunk = bytes(chunk)  # the decoders work on bytes (offsets stay valid)
                if kind == _B:
                    portal, name, tail = wire.read_bind(chunk, start, end)
                    tracker.bind_raw(portal, name, chunk[tail:end])
                elif kind == _E:
                    self.batch_statements.append(tracker.execute(wire.read_execute(chunk, start, end)))
                elif kind == _P:
                    raw, name, prepared = self.last_parse
                    if end - start != len(raw) or chunk[start:end] != raw:
                        name, text, types = wire.read_parse(chunk, start, end)
                        prepared = PreparedSql(text, types)
                        if end - start <= _PARSE_CACHE_MAX:
                            self.last_parse = (chunk[start:end], name, prepared)
                    tracker.parse_prepared(name, prepared)
                elif kind == _D:
                    wire.check_target(chunk, start, end)  # Describe: validate only
                else:
                    tracker.close(*wire.read_target(chunk, start, end))
                continue
            if self.batch_open:
                fwd = self._close_batch(chunk, fwd, start, closed_by=kind)
                if self.held is not None:
                    self._stash_input(chunk, start)
                    return
                if self.skipping is not None and kind != _X:
                    if kind == _S:
                        self._boundary(_S)
                        self.skipping = None
                        fwd = start
                    else:
                        fwd = end
                    continue
            if kind == _S:
                self._boundary(_S)
                if self.barrier_pending:
                    self._write_up(chunk, fwd, end)
                    self._start_barrier(chunk, end)
                    return
            elif kind == _H:
                self.open_extended = True
            elif kind in (_Q, _F):
                if self.open_extended and not self.probe_ok:
                    # A Query after extended messages with no Sync (asyncpg sends
                    # Parse/Describe/Flush, then a COPY Query). If those messages
                    # failed, the server discards the Query and sends no
                    # ReadyForQuery for it; so must the proxy. To know which, it
                    # asks the server with a probe (see _PROBE) before going on.
                    self._write_up(chunk, fwd, start)
                    if self.open_error:
                        fwd = end
                        continue
                    self._send_probe()
                    self._stash_input(chunk, start)
                    return
                sql = wire.decode_query(chunk, start, end) if kind == _Q else None
                statement = Statement(sql) if kind == _Q else Statement(None, "function-call")
                decision = self._decide(Unit((statement,)))
                if decision.action == "allow":
                    self._boundary(kind)
                    if sql is not None and changes_lexing(sql):
                        self._write_up(chunk, fwd, end)
                        self._start_barrier(chunk, end)
                        return
                elif decision.action == "hold" and decision.hold is not None:
                    self._write_up(chunk, fwd, start)
                    self._start_hold(decision.hold, bytes(chunk[start:end]), batch=False)
                    self._stash_input(chunk, end)
                    return
                else:
                    self._write_up(chunk, fwd, start)
                    self._poison(decision, sync=True)
                    fwd = end
            elif kind in _COPY:
                if kind != _d:
                    self.copyends += 1
            elif kind == _X:
                self._write_up(chunk, fwd, end)
                self._close()
                return
            else:
                raise wire.ProtocolError(f"invalid frontend message type {kind!r}")
        if self.batch_open:
            if len(self.batch_buf) + len(chunk) - fwd <= BATCH_BUFFER_LIMIT:
                self.batch_buf += chunk[fwd:]
                return
            # A client that never sends Sync or Flush must not make the proxy
            # buffer without bound: decide on what came so far, as at a Flush.
            fwd = self._close_batch(chunk, fwd, len(chunk), closed_by=_H)
            if self.held is not None:
                self._stash_input(chunk, len(chunk))
                return
            if self.skipping is not None:
                return
        self._write_up(chunk, fwd, len(chunk))

    def _write_up(self, chunk: bytes | memoryview, start: int, end: int) -> None:
        if end > start:
            up = self.upstream
            assert up is not None
            if self.phase is _READY:
                self.phase = _FORWARDED
            up.write(chunk[start:end] if start or end != len(chunk) else chunk)

    def _close_batch(self, chunk: bytes | memoryview, fwd: int, boundary: int, *,
                     closed_by: int) -> int:
        """Decide on the open batch (its bytes are batch_buf + chunk[fwd:boundary])."""
        self.batch_open = False
        statements = self.batch_statements
        if statements:
            self.batch_statements = []
            decision = self._decide(Unit(tuple(statements), True))
        else:
            decision = ALLOW
        lexing = False
        if decision.action == "allow":
            for s in statements:
                sql = s.sql
                if sql is not None and sql is not self.lexing_safe:
                    if changes_lexing(sql):
                        lexing = True
                        break
                    self.lexing_safe = sql
        if lexing and closed_by != _S:
            decision = deny(
                "statements that may change client_encoding or standard_conforming_strings "
                "must end with Sync, not Flush, when sent through pgvouch",
                code=sqlstate.FEATURE_NOT_SUPPORTED,
            )
        if decision.action == "hold" and decision.hold is not None:
            unit = bytes(self.batch_buf) + bytes(chunk[fwd:boundary])
            self.batch_buf.clear()
            self._start_hold(decision.hold, unit, batch=True)
            return boundary
        if decision.action == "allow":
            if self.batch_buf:
                up = self.upstream
                assert up is not None
                up.write(bytes(self.batch_buf))
                self.batch_buf.clear()
            # the batch's bytes in this chunk stay pending from ``fwd``: they go
            # out with whatever follows (usually the Sync) in one write
            self.open_extended = True
            if lexing:
                self.barrier_pending = True
            return fwd
        self.batch_buf.clear()
        self.tracker.rollback(self.batch_mark)
        self._poison(decision, sync=False)
        return boundary

    def _boundary(self, kind: int, subst: Decision | None = None) -> None:
        """A Sync, Query or FunctionCall went upstream: one more ReadyForQuery to come."""
        if (subst is None and self.open_cycle is None and self.pending_watch is None
                and not self.copyends):
            # the common case: nothing to remember about this cycle but its kind
            self.cycles.append(_PLAIN_SYNC if kind == _S else _PLAIN_QUERY)
            self.tracker.sync()
            self.open_extended = self.open_error = self.probe_ok = False
            return
        cycle = self.open_cycle or _Cycle(kind, 0, None)
        self.open_cycle = None
        cycle.boundary = kind
        cycle.copyends_before = self.copyends
        self.copyends = 0
        self.open_error = False
        self.probe_ok = False
        if subst is not None:
            cycle.subst = subst
            self.substitutions += 1
        watch, self.pending_watch = self.pending_watch, None
        if watch is not None:
            cycle.watch = watch
            self.watchers += 1
        self.cycles.append(cycle)
        self.tracker.sync()
        self.open_extended = False

    def _send_probe(self) -> None:
        up = self.upstream
        assert up is not None
        up.write(_PROBE)
        self.probe = 1
        self.substitutions += 1  # the relay must look at every message until it is answered

    def _probe_answered(self, ok: bool) -> None:
        self.probe = 0
        self.substitutions -= 1
        self.probe_ok = ok
        self._resume_input()

    def _poison(self, decision: Decision, *, sync: bool) -> None:
        """Refuse a unit upstream with PostgreSQL's own error semantics (see module doc).

        ``sync``: a simple Query or FunctionCall, answered at once with its own
        ReadyForQuery. Otherwise (extended batch) the poison goes with a Flush,
        so the error comes back at once, and the client's own Sync follows.
        """
        up = self.upstream
        assert up is not None
        if sync:
            up.write(POISON_PARSE + wire.SYNC)
            self._boundary(_S, subst=decision)
        else:
            up.write(POISON_PARSE + FLUSH)
            self.open_extended = True
            self.skipping = decision
            cycle = self.open_cycle = self.open_cycle or _Cycle(_S, 0, None)
            cycle.subst = decision
            self.substitutions += 1
        log.info(
            "statement refused session=%s user=%s resource=%s code=%s policy=%s",
            self.id, self.info.user if self.info else "?", self.info.resource if self.info else "?",
            decision.sqlstate, decision.policy,
        )

    # ------------------------------------------------------------ holds, barriers
    def _start_hold(self, hold: Hold, unit: bytes, *, batch: bool) -> None:
        self.held = hold
        self.held_unit = unit
        self.held_batch = batch
        self.phase = advance(self.phase, "hold")
        self._hold_task = asyncio.get_running_loop().create_task(self._wait_for_hold(hold))

    def _start_barrier(self, chunk: bytes | memoryview, resume_at: int) -> None:
        """Wait for the server to answer everything in flight before going on.

        Used after a statement that may change how the server reads later
        SQL (client_encoding, standard_conforming_strings): the proxy must
        know the server's new settings before it can vouch for the next one.
        """
        self.barrier_pending = False
        self.barrier = True
        self._stash_input(chunk, resume_at)
        if not self.cycles:
            self._lift_barrier()

    def _lift_barrier(self) -> None:
        self.barrier = False
        self._resume_input()

    def _stash_input(self, chunk: bytes | memoryview, resume_at: int) -> None:
        """Keep what followed (in order) until a hold or barrier is released."""
        self.held_input = bytearray(chunk[resume_at:]) + self.framer.take_tail() + self.held_input
        if len(self.held_input) > HELD_INPUT_LIMIT:
            self._refuse_held_input()

    def _buffer_input(self, data: bytes) -> None:
        self.held_input += data
        if len(self.held_input) > HELD_INPUT_LIMIT:
            self._refuse_held_input()

    def _resume_input(self) -> None:
        pending, self.held_input = bytes(self.held_input), bytearray()
        if pending and self.phase is not Phase.CLOSED:
            try:
                self._relay_client(pending)
            except wire.ProtocolError as exc:
                self._fatal(sqlstate.PROTOCOL_VIOLATION, f"protocol violation: {exc}")

    def _refuse_held_input(self) -> None:
        if self.held is not None:
            self.held.cancel("the client sent too much data behind a held statement")
        self._fatal(sqlstate.HELD_INPUT_LIMIT,
                    "too much data pipelined behind a statement that is waiting for approval")

    def cancel_requested(self) -> bool:
        """A CancelRequest for this session: True if it cancelled a hold."""
        if self.held is None:
            return False
        self.held.cancel("cancelled by the client")
        return True

    def _notice(self, text: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(wire.notice_response(text, code=sqlstate.APPROVAL_REQUIRED))

    async def _wait_for_hold(self, hold: Hold) -> None:
        try:
            first = await hold.start()
            if isinstance(first, Decision):
                if self.phase is not Phase.CLOSED:
                    self._release(hold, first)
                return
            self._notice(first)
            outcome = asyncio.ensure_future(hold.outcome())
            while not outcome.done():
                try:
                    await asyncio.wait_for(asyncio.shield(outcome), hold.heartbeat_interval)
                except TimeoutError:
                    text = hold.heartbeat()
                    if text:
                        self._notice(text)
            decision = outcome.result()
        except asyncio.CancelledError:
            return
        except Exception:
            log.exception("hold failed in session %s; statement refused", self.id)
            decision = deny("pgvouch could not complete the approval; the statement was not run",
                            code=sqlstate.INTERNAL_ERROR)
        if self.phase is Phase.CLOSED:
            return
        self._release(hold, decision)

    def _release(self, hold: Hold, decision: Decision) -> None:
        self.held = None
        self.phase = advance(self.phase, "release")
        self.decisions[decision.action] = self.decisions.get(decision.action, 0) + 1
        up = self.upstream
        assert up is not None
        if decision.action == "allow":
            replacement = None if self.held_batch else decision.replacement
            up.write(self.held_unit if replacement is None else replacement)
            self.pending_watch = _Watch(hold)
            if self.held_batch:
                self.open_extended = True
            else:
                self._boundary(_Q)
        elif self.held_batch:
            self.tracker.rollback(self.batch_mark)
            self._poison(decision, sync=False)
        else:
            self._poison(decision, sync=True)
        self.held_unit = b""
        self._resume_input()

    # ---------------------------------------------------- upstream → client relay
    def upstream_data(self, data: bytes) -> None:
        if self.substitutions or self.watchers:
            self._upstream_slow(data)
            return
        try:
            chunk, events = self.server_framer.scan(data, _WATCH_TABLE)
        except wire.ProtocolError as exc:
            log.error("upstream protocol error in session %s: %s", self.id, exc)
            self.upstream_lost(exc)
            return
        if not chunk:
            return
        transport = self.transport
        if transport is None:
            return
        if events:
            tracker = self.tracker
            for kind, start, end in events:
                if kind == _Z:
                    self._ready_for_query(chunk[end - 1])
                elif kind == _PARSE_OK:
                    tracker.parse_complete()
                elif kind == _BIND_OK:
                    tracker.bind_complete()
                else:
                    self._server_event(kind, chunk, start, end)
        self.bytes_out += len(chunk)
        transport.write(chunk)
        if self.barrier and not self.cycles and self.held is None:
            self._lift_barrier()

    def _upstream_slow(self, data: bytes) -> None:
        try:
            chunk, messages = self.server_framer.feed(data)
        except wire.ProtocolError as exc:
            log.error("upstream protocol error in session %s: %s", self.id, exc)
            self.upstream_lost(exc)
            return
        if messages and self.transport is not None:
            self._relay_slow(chunk, messages)

    def _ready_for_query(self, status: int) -> None:
        cycles = self.cycles
        if cycles:
            cycles.popleft()
        else:
            # A ReadyForQuery nobody expected: the proxy is out of step with
            # the server. Forget what it believed, so nothing is vouched for.
            log.error("session %s: unexpected ReadyForQuery; forgetting statements", self.id)
            self.tracker.reset()
        self.tracker.ready(status == _IDLE_STATUS)  # idle: every portal is gone upstream
        self.tx_status = _STATUS[status]
        if not cycles:
            phase = self.phase
            if phase is _IN_QUERY:
                self.phase = _QUERY_DONE
            elif phase is _IN_COPY:
                self.phase = advance(phase, "idle")

    def _server_event(self, kind: int, chunk: bytes | memoryview, start: int, end: int) -> None:
        if kind == _Z:
            self._ready_for_query(chunk[end - 1])
        elif kind == _PARSE_OK:
            self.tracker.parse_complete()
        elif kind == _BIND_OK:
            self.tracker.bind_complete()
        elif kind == _CLOSE_OK:
            self.tracker.close_complete()
        elif kind == _ERR:
            self.tracker.error()
            if not self.cycles and self.open_extended:
                self.open_error = True
        elif kind == _PSTATUS:
            self._parameter_status(*wire.decode_parameter_status(chunk, start, end))
        else:  # CopyInResponse, CopyOutResponse, CopyBothResponse
            if kind != _COPY_OUT:
                self._copy_in_started()
            if self.phase is Phase.IN_QUERY:
                self.phase = advance(self.phase, "copy")

    def _parameter_status(self, name: str, value: str) -> None:
        if self.info is not None:
            self.info.server_params[name] = value
        if not lexing_setting_is_safe(name, value):
            log.warning("session %s: server reports %s=%s; ending the session", self.id, name,
                        value)
            self._fatal(sqlstate.FEATURE_NOT_SUPPORTED,
                        f"pgvouch cannot vouch for statements with {name}={value}; "
                        "the session is closed")

    def _copy_in_started(self) -> None:
        """The server entered COPY IN while answering the oldest cycle.

        From the copy-starting message until the client's CopyDone/CopyFail,
        the server ignores Sync and Flush, so Syncs the proxy already counted
        in that stretch bring no ReadyForQuery: forget them (their tracked
        Parse/Bind move on to the cycle that really ends them), and count no
        further Sync until the copy ends.
        """
        cycles = self.cycles
        index = 0
        if cycles and (cycles[0].boundary != _S or cycles[0].copyends_before > 0):
            index = 1  # a Query started the copy; its own boundary is real
        while (index < len(cycles) and cycles[index].boundary == _S
               and cycles[index].copyends_before == 0 and cycles[index].subst is None
               and cycles[index].watch is None):
            del cycles[index]
            self.tracker.merge_boundary(index)
        if index >= len(cycles) and self.copyends == 0:
            self.client_copy = True

    def _relay_slow(self, chunk: bytes | memoryview, messages: list[tuple[int, int, int]]) -> None:
        """Relay while some cycle needs attention: a poison's answer, a watched
        statement, or the probe."""
        out: list[bytes | memoryview] = []
        for kind, start, end in messages:
            current = self.cycles[0] if self.cycles else self.open_cycle
            if self.probe and not self.cycles and self.tracker.pending_now() == 0:
                if kind == _PARSE_OK and self.probe == 1:
                    self.probe = 2
                    continue
                if kind == _CLOSE_OK and self.probe == 2:
                    self._flush_out(out)
                    out = []
                    self._probe_answered(ok=True)
                    continue
            if current is not None and current.subst is not None and kind == _ERR \
                    and not current.replaced:
                current.replaced = True
                fields = wire.decode_error_fields(chunk, start, end)
                if is_poison_error(fields):
                    decision = current.subst
                    out.append(wire.error_response(
                        decision.sqlstate or sqlstate.POLICY_DENIED, decision.message,
                        detail=decision.detail, hint=decision.hint,
                    ))
                else:
                    # an earlier, allowed part of the cycle failed on its own: the
                    # server skipped the poison, and the client sees that error
                    out.append(chunk[start:end])
                self._server_event(kind, chunk, start, end)
                continue
            if current is not None and current.watch is not None:
                watch = current.watch
                if kind == _ERR and watch.error is None:
                    watch.error = wire.decode_error_fields(chunk, start, end).get("M", "error")
                elif kind == _Z:
                    self.watchers -= 1
                    watch.hold.finished(watch.error is None, watch.error)
            if current is not None and kind == _Z and current.subst is not None:
                self.substitutions -= 1
            if kind in _WATCH:
                self._server_event(kind, chunk, start, end)
            out.append(chunk[start:end])
            if kind == _ERR and self.probe and self.open_error:
                self._flush_out(out)
                out = []
                self._probe_answered(ok=False)
        self._flush_out(out)
        if self.barrier and not self.cycles and self.held is None:
            self._lift_barrier()

    def _flush_out(self, out: list[bytes | memoryview]) -> None:
        if not out:
            return
        data = b"".join(out)
        self.bytes_out += len(data)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # ------------------------------------------------------------------ closing
    def _fatal(self, code: str, message: str, hint: str | None = None) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(wire.error_response(code, message, severity="FATAL", hint=hint))
        self._close()

    def terminate(self, code: str, message: str) -> None:
        """Server-initiated end (drain timeout, revoked access)."""
        self._fatal(code, message)

    def _close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self.upstream is not None:
            self.upstream.close()
        if self.transport is not None:
            self.transport.close()
        self._finish()

    def _finish(self) -> None:
        if self.phase is Phase.CLOSED:
            return
        was_open = self.info is not None
        self.phase = Phase.CLOSED
        if self.upstream is not None:
            self.upstream.close()
        self.server.session_ended(self)
        if was_open:
            assert self.info is not None
            log.info(
                "session closed id=%s user=%s resource=%s account=%s duration=%.3fs "
                "bytes_in=%d bytes_out=%d allowed=%d denied=%d",
                self.id, self.info.user, self.info.resource, self.info.account,
                time.time() - self.opened, self.bytes_in, self.bytes_out,
                self.decisions.get("allow", 0), self.decisions.get("deny", 0),
            )
