"""PostgreSQL protocol 3.0 framing and the few encoders and decoders we need.

Owns: splitting byte streams into messages, decoding the startup packet and
the handful of message types the proxy inspects, and encoding the messages
the proxy originates (errors, notices, authentication, ready-for-query).

Must not: do I/O, keep session state, or look at SQL. Everything here is a
pure function of bytes, so every edge case is testable with byte strings.
Bytes the proxy does not need to inspect are never decoded: the framer hands
back offsets into the chunk it was fed, and the caller forwards the very
same bytes.
"""

from __future__ import annotations

import builtins
import struct
from dataclasses import dataclass
from typing import Final

PROTOCOL_3_0: Final = 196608  # (3 << 16) | 0
SSL_REQUEST: Final = 80877103
GSSENC_REQUEST: Final = 80877104
CANCEL_REQUEST: Final = 80877102

MAX_STARTUP_SIZE: Final = 10_000  # PostgreSQL itself caps the startup packet at 10000 bytes

_I32: Final = struct.Struct("!i")
_unpack_i32 = _I32.unpack_from


def type_table(types: bytes) -> bytes:
    """A 256-byte table for :meth:`Framer.scan`: 1 at each message type in ``types``."""
    table = bytearray(256)
    for kind in types:
        table[kind] = 1
    return bytes(table)


ALL_TYPES: Final = b"\x01" * 256  # every message type, as a type_table


def _i16(data: bytes, pos: int) -> int:
    """The signed Int16 at ``pos`` (by hand: compiled, no tuple or int objects)."""
    value = (data[pos] << 8) | data[pos + 1]
    return value - 0x10000 if value >= 0x8000 else value


def _i32(data: bytes, pos: int) -> int:
    """The signed Int32 at ``pos``."""
    value = (data[pos] << 24) | (data[pos + 1] << 16) | (data[pos + 2] << 8) | data[pos + 3]
    return value - 0x100000000 if value >= 0x80000000 else value


class ProtocolError(Exception):
    """The peer broke the protocol. ``remote`` names which side did."""

    def __init__(self, message: str, *, remote: str = "client") -> None:
        super().__init__(message)
        self.remote = remote


# --------------------------------------------------------------------------
# framing
# --------------------------------------------------------------------------
class Framer:
    """Incremental splitter for typed messages (``Byte1 type, Int32 length``).

    ``feed(data)`` returns ``(chunk, messages)``: ``chunk`` is a bytes-like
    object holding only complete messages and ``messages`` lists them as
    ``(type, start, end)`` offsets into ``chunk`` (``start`` is the type byte,
    ``end`` is exclusive). An incomplete tail is kept for the next call. A
    length below 4 or above ``max_size`` raises :class:`ProtocolError`
    before anything is allocated from it.
    """

    __slots__ = ("_buf", "_need", "max_size", "remote")

    def __init__(self, max_size: int, remote: str = "client") -> None:
        self.max_size = max_size
        self.remote = remote
        self._buf = bytearray()
        self._need = 0  # bytes needed to complete the buffered message, when known

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def take_tail(self) -> bytes:
        """Hand back the incomplete tail (the caller will feed it again later)."""
        tail = bytes(self._buf)
        self._buf.clear()
        self._need = 0
        return tail

    def feed(self, data: bytes) -> tuple[bytes | memoryview, list[tuple[int, int, int]]]:
        """Every complete message (see the class docstring)."""
        return self.scan(data, ALL_TYPES)

    def scan(self, data: bytes, watch: bytes) -> tuple[bytes | memoryview,
                                                        list[tuple[int, int, int]]]:
        """:meth:`feed`, listing only the messages whose type ``watch`` (a
        :func:`type_table`) marks.

        ``chunk`` is empty when no message is complete yet.
        """
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return b"", []
            data = bytes(buf)
            buf.clear()
            self._need = 0
        n = len(data)
        pos = 0
        messages: list[tuple[int, int, int]] = []
        limit = self.max_size
        while n - pos >= 5:
            # the header by hand, not struct: compiled (mypyc), this is plain
            # integer arithmetic with no tuple or int objects per message
            kind = data[pos]
            length = (data[pos + 1] << 24) | (data[pos + 2] << 16) | (data[pos + 3] << 8) | data[pos + 4]
            if length >= 0x80000000:
                length -= 0x100000000  # Int32 is signed: report what the peer sent
            if length < 4 or length > limit:
                raise ProtocolError(
                    f"invalid message length {length} for message type {chr(kind)!r}",
                    remote=self.remote,
                )
            end = pos + 1 + length
            if end > n:
                self._need = end - pos
                break
            if watch[kind]:
                messages.append((kind, pos, end))
            pos = end
        if pos == n:
            return data, messages
        buf += memoryview(data)[pos:]
        return memoryview(data)[:pos], messages


# --------------------------------------------------------------------------
# startup phase
# --------------------------------------------------------------------------
def startup_length(header: bytes) -> int:
    """The total length of a startup-phase packet from its first four bytes."""
    (length,) = _unpack_i32(header, 0)
    if length < 8 or length > MAX_STARTUP_SIZE:
        raise ProtocolError(f"invalid startup packet length {length}")
    return int(length)


@dataclass(frozen=True)
class StartupMessage:
    version: int
    params: dict[str, str]

    @property
    def minor(self) -> int:
        return self.version & 0xFFFF

    @property
    def protocol_options(self) -> list[str]:
        return [name for name in self.params if name.startswith("_pq_.")]


@dataclass(frozen=True)
class CancelRequest:
    pid: int
    secret: bytes


@dataclass(frozen=True)
class SpecialRequest:
    code: int  # SSL_REQUEST or GSSENC_REQUEST


def decode_startup_packet(payload: bytes) -> StartupMessage | CancelRequest | SpecialRequest:
    """Decode a startup-phase packet (the bytes after its length word)."""
    if len(payload) < 4:
        raise ProtocolError("startup packet too short")
    (code,) = _unpack_i32(payload, 0)
    if code in (SSL_REQUEST, GSSENC_REQUEST):
        if len(payload) != 4:
            raise ProtocolError("malformed SSL/GSS request")
        return SpecialRequest(code)
    if code == CANCEL_REQUEST:
        if len(payload) < 12 or len(payload) > 4 + 4 + 256:
            raise ProtocolError("malformed cancel request")
        (pid,) = _unpack_i32(payload, 4)
        return CancelRequest(pid, bytes(payload[8:]))
    if code >> 16 != 3:
        raise ProtocolError(f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}")
    body = payload[4:]
    # name\0value\0 ... \0: the final empty name is required, as in PostgreSQL
    if not body.endswith(b"\x00") or (len(body) > 1 and not body.endswith(b"\x00\x00")):
        raise ProtocolError("startup packet is missing its terminator")
    parts = body[:-2].split(b"\x00") if len(body) > 1 else []
    if len(parts) % 2:
        raise ProtocolError("startup packet has a parameter without a value")
    params: dict[str, str] = {}
    try:
        for i in range(0, len(parts), 2):
            params[parts[i].decode("utf-8")] = parts[i + 1].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("startup packet is not valid UTF-8") from None
    if "" in params:
        raise ProtocolError("startup packet has an empty parameter name")
    return StartupMessage(code, params)


def encode_startup(params: dict[str, str]) -> bytes:
    body = _I32.pack(PROTOCOL_3_0) + b"".join(
        k.encode() + b"\x00" + v.encode() + b"\x00" for k, v in params.items()
    ) + b"\x00"
    return _I32.pack(len(body) + 4) + body


def encode_ssl_request() -> bytes:
    return _I32.pack(8) + _I32.pack(SSL_REQUEST)


def encode_cancel_request(pid: int, secret: bytes) -> bytes:
    body = _I32.pack(CANCEL_REQUEST) + _I32.pack(pid) + secret
    return _I32.pack(len(body) + 4) + body


# --------------------------------------------------------------------------
# encoders for messages the proxy originates
# --------------------------------------------------------------------------
def message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + _I32.pack(len(body) + 4) + body


def cstr(text: str) -> bytes:
    return text.replace("\x00", "").encode("utf-8") + b"\x00"


def _fields(severity: str, code: str, text: str, detail: str | None, hint: str | None) -> bytes:
    body = b"S" + cstr(severity) + b"V" + cstr(severity) + b"C" + cstr(code) + b"M" + cstr(text)
    if detail:
        body += b"D" + cstr(detail)
    if hint:
        body += b"H" + cstr(hint)
    return body + b"\x00"


def error_response(
    code: str, text: str, *, severity: str = "ERROR", detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    return message(b"E", _fields(severity, code, text, detail, hint))


def notice_response(
    text: str, *, code: str = "00000", severity: str = "NOTICE", detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    return message(b"N", _fields(severity, code, text, detail, hint))


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def auth_ok() -> bytes:
    return message(b"R", _I32.pack(0))


def auth_sasl(mechanisms: list[str]) -> bytes:
    return message(b"R", _I32.pack(10) + b"".join(cstr(m) for m in mechanisms) + b"\x00")


def auth_sasl_continue(data: bytes) -> bytes:
    return message(b"R", _I32.pack(11) + data)


def auth_sasl_final(data: bytes) -> bytes:
    return message(b"R", _I32.pack(12) + data)


def auth_cleartext_request() -> bytes:
    return message(b"R", _I32.pack(3))


def backend_key_data(pid: int, secret: bytes) -> bytes:
    return message(b"K", _I32.pack(pid) + secret)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstr(name) + cstr(value))


def negotiate_protocol_version(newest_minor: int, unsupported: list[str]) -> bytes:
    body = _I32.pack(PROTOCOL_3_0 | newest_minor) + _I32.pack(len(unsupported))
    return message(b"v", body + b"".join(cstr(o) for o in unsupported))


def query(sql: str) -> bytes:
    return message(b"Q", cstr(sql))


def password_message(data: bytes) -> bytes:
    return message(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", cstr(mechanism) + _I32.pack(len(data)) + data)


TERMINATE: Final = message(b"X")
SYNC: Final = message(b"S")


def row_description(columns: list[str]) -> bytes:
    """Text columns of type ``text`` (OID 25), for rows the proxy answers itself."""
    body = struct.pack("!h", len(columns))
    for name in columns:
        body += cstr(name) + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0)
    return message(b"T", body)


def data_row(values: list[str | None]) -> bytes:
    body = struct.pack("!h", len(values))
    for value in values:
        if value is None:
            body += _I32.pack(-1)
        else:
            raw = value.encode("utf-8")
            body += _I32.pack(len(raw)) + raw
    return message(b"D", body)


def command_complete(tag: str) -> bytes:
    return message(b"C", cstr(tag))


# --------------------------------------------------------------------------
# decoders for messages the proxy inspects
# --------------------------------------------------------------------------
class Reader:
    """A cursor over one message body; every read is bounds-checked."""

    __slots__ = ("data", "end", "pos", "remote")

    def __init__(self, data: bytes, remote: str = "client") -> None:
        self.data = data
        self.pos = 0
        self.end = len(data)
        self.remote = remote

    def _fail(self, what: str) -> ProtocolError:
        return ProtocolError(f"truncated message while reading {what}", remote=self.remote)

    def int32(self) -> int:
        if self.pos + 4 > self.end:
            raise self._fail("an Int32")
        (value,) = _unpack_i32(self.data, self.pos)
        self.pos += 4
        return int(value)

    def int16(self) -> int:
        if self.pos + 2 > self.end:
            raise self._fail("an Int16")
        value = int.from_bytes(self.data[self.pos : self.pos + 2], "big", signed=True)
        self.pos += 2
        return value

    def byte(self) -> int:
        if self.pos >= self.end:
            raise self._fail("a byte")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def bytes(self, n: int) -> builtins.bytes:
        if n < 0 or self.pos + n > self.end:
            raise self._fail(f"{n} bytes")
        value = self.data[self.pos : self.pos + n]
        self.pos += n
        return value

    def cstring(self) -> str:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise self._fail("a string")
        raw = self.data[self.pos : end]
        self.pos = end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("string is not valid UTF-8", remote=self.remote) from None

    def rest(self) -> builtins.bytes:
        value = self.data[self.pos :]
        self.pos = self.end
        return value

    def done(self) -> None:
        if self.pos != self.end:
            raise ProtocolError("trailing bytes in message", remote=self.remote)


def body_reader(chunk: bytes | memoryview, start: int, end: int, remote: str = "client") -> Reader:
    """A :class:`Reader` over the body of the message at ``chunk[start:end]``."""
    return Reader(bytes(chunk[start + 5 : end]), remote)


# The relay's decoders below work on ``bytes`` (``data``) with offsets, use
# ``bytes.find`` and never build a Reader: they run for every extended-protocol
# message. Names are read as PostgreSQL reads them: up to the first NUL after
# the start of the body. Anything malformed raises ProtocolError.
def _truncated(what: str) -> ProtocolError:
    return ProtocolError(f"truncated message while reading {what}")


def _trailing() -> ProtocolError:
    return ProtocolError("trailing bytes in message")


def _bad_utf8() -> ProtocolError:
    return ProtocolError("string is not valid UTF-8")


def _as_bytes(chunk: bytes | memoryview, start: int, end: int) -> tuple[bytes, int, int]:
    if isinstance(chunk, bytes):
        return chunk, start, end
    return bytes(chunk[start:end]), 0, end - start


def decode_query(chunk: bytes | memoryview, start: int, end: int) -> str:
    """The SQL of a Query message (exactly one terminating NUL, valid UTF-8)."""
    if not isinstance(chunk, bytes):
        chunk, start, end = bytes(chunk[start:end]), 0, end - start
    if end - start < 6 or chunk[end - 1] != 0:
        raise ProtocolError("malformed Query message")
    try:
        sql = chunk[start + 5 : end - 1].decode("utf-8")
    except UnicodeDecodeError:
        raise _bad_utf8() from None
    # no NUL before the terminator: UTF-8 encodes nothing else with a zero
    # byte, so the decoded text tells (and `in` on a str compiles to one call)
    if "\x00" in sql:
        raise ProtocolError("malformed Query message")
    return sql


def _nul(data: bytes, pos: int, end: int) -> int:
    """The offset of the first NUL in ``data[pos:end]``, or -1.

    Names (statements, portals) are short: compiled, a loop over the first
    bytes costs less than the method call of ``bytes.find``, which takes over
    for anything longer (SQL text).
    """
    stop = pos + 24
    if stop > end:
        stop = end
    while pos < stop:
        if data[pos] == 0:
            return pos
        pos += 1
    return data.find(b"\x00", pos, end) if pos < end else -1


def _two_cstrings(data: bytes, pos: int, end: int) -> tuple[str, str, int]:
    """The two NUL-terminated strings that open Parse and Bind, and the second NUL's offset."""
    z = _nul(data, pos, end)
    if z < 0:
        raise _truncated("a string")
    z2 = _nul(data, z + 1, end)
    if z2 < 0:
        raise _truncated("a string")
    try:
        first = data[pos:z].decode("utf-8") if z > pos else ""
        second = data[z + 1 : z2].decode("utf-8") if z2 > z + 1 else ""
    except UnicodeDecodeError:
        raise _bad_utf8() from None
    return first, second, z2


def read_parse(data: bytes, start: int, end: int) -> tuple[str, str, tuple[int, ...]]:
    """Parse: (statement name, SQL, parameter type OIDs); ``data`` must be bytes."""
    name, sql, z2 = _two_cstrings(data, start + 5, end)
    pos = z2 + 3
    if pos > end:
        raise _truncated("an Int16")
    count = _i16(data, pos - 2)
    if count < 0:
        raise ProtocolError("negative parameter count in Parse")
    if not count:
        if pos != end:
            raise _trailing()
        return name, sql, ()
    stop = pos + 4 * count
    if stop != end:
        raise _truncated("an Int32") if stop > end else _trailing()
    return name, sql, struct.unpack_from(f"!{count}i", data, pos)


def read_bind(data: bytes, start: int, end: int) -> tuple[str, str, int]:
    """Bind: (portal, statement, offset of the parameter formats); ``data`` must be bytes.

    The whole message is validated; the values are decoded only on demand,
    by :func:`bind_values` on ``data[offset:end]``.
    """
    portal, statement, z2 = _two_cstrings(data, start + 5, end)
    # the same checks as _bind_tail, without building anything
    pos = tail = z2 + 1
    if pos + 4 > end:
        raise _truncated("an Int16")
    nfmt = _i16(data, pos)
    if nfmt:
        if nfmt < 0:
            raise ProtocolError("negative format count in Bind")
        pos += 2 * nfmt
        if pos + 4 > end:
            raise _truncated("an Int16")
    nparams = _i16(data, pos + 2)
    pos += 4
    if nparams:
        if nparams < 0:
            raise ProtocolError("negative parameter count in Bind")
        for _ in range(nparams):
            if pos + 4 > end:
                raise _truncated("an Int32")
            length = _i32(data, pos)
            pos += 4
            if length > 0:
                pos += length
                if pos > end:
                    raise _truncated(f"{length} bytes")
            elif length < -1:
                raise _truncated(f"{length} bytes")
    if pos + 2 > end:
        raise _truncated("an Int16")
    nres = _i16(data, pos)
    if nres < 0:
        raise ProtocolError("negative result format count in Bind")
    stop = pos + 2 + 2 * nres
    if stop != end:
        raise _truncated("an Int16") if stop > end else _trailing()
    return portal, statement, tail


_NO_VALUES: tuple[tuple[int, ...], tuple[bytes | None, ...]] = ((), ())


def _bind_tail(data: bytes, pos: int, end: int,
               want: bool) -> tuple[tuple[int, ...], tuple[bytes | None, ...]]:
    """Check (and with ``want``, decode) a Bind's formats, values and result formats.

    :func:`read_bind` makes the same checks inline (keep the two in step).
    """
    if pos + 2 > end:
        raise _truncated("an Int16")
    nfmt = _i16(data, pos)
    if nfmt < 0:
        raise ProtocolError("negative format count in Bind")
    fmt_at = pos + 2
    pos = fmt_at + 2 * nfmt
    if pos + 2 > end:
        raise _truncated("an Int16")
    nparams = _i16(data, pos)
    if nparams < 0:
        raise ProtocolError("negative parameter count in Bind")
    pos += 2
    params: list[bytes | None] = []
    for _ in range(nparams):
        if pos + 4 > end:
            raise _truncated("an Int32")
        length = _i32(data, pos)
        pos += 4
        if length == -1:
            if want:
                params.append(None)
            continue
        if length < 0 or pos + length > end:
            raise _truncated(f"{length} bytes")
        if want:
            params.append(data[pos : pos + length])
        pos += length
    if pos + 2 > end:
        raise _truncated("an Int16")
    nres = _i16(data, pos)
    if nres < 0:
        raise ProtocolError("negative result format count in Bind")
    stop = pos + 2 + 2 * nres
    if stop != end:
        raise _truncated("an Int16") if stop > end else _trailing()
    if not want:
        return _NO_VALUES
    formats = struct.unpack_from(f"!{nfmt}h", data, fmt_at) if nfmt else ()
    return formats, tuple(params)


def bind_values(tail: bytes) -> tuple[tuple[int, ...], tuple[bytes | None, ...]]:
    """(parameter formats, parameter values) from a Bind's bytes after its two names."""
    return _bind_tail(tail, 0, len(tail), True)


def read_execute(data: bytes, start: int, end: int) -> str:
    """Execute: the portal name; ``data`` must be bytes."""
    pos = start + 5
    z = _nul(data, pos, end)
    if z < 0:
        raise _truncated("a string")
    if z + 5 != end:
        raise _truncated("an Int32") if z + 5 > end else _trailing()
    if z == pos:
        return ""
    try:
        return data[pos:z].decode("utf-8")
    except UnicodeDecodeError:
        raise _bad_utf8() from None


def check_target(data: bytes, start: int, end: int) -> None:
    """Describe and Close: check the form (``S`` or ``P``, then one NUL-terminated name)."""
    if end - start < 6:
        raise _truncated("a byte")
    which = data[start + 5]
    if which != 0x53 and which != 0x50:
        raise ProtocolError(f"invalid Describe/Close target {which!r}")
    z = _nul(data, start + 6, end)
    if z != end - 1:
        raise _truncated("a string") if z < 0 else _trailing()
    if z > start + 6:
        try:
            data[start + 6 : z].decode("utf-8")
        except UnicodeDecodeError:
            raise _bad_utf8() from None


def read_target(data: bytes, start: int, end: int) -> tuple[str, str]:
    """Describe and Close: (``S`` or ``P``, name); ``data`` must be bytes."""
    check_target(data, start, end)
    try:
        return chr(data[start + 5]), data[start + 6 : end - 1].decode("utf-8")
    except UnicodeDecodeError:
        raise _bad_utf8() from None


@dataclass(frozen=True)
class Parse:
    name: str
    sql: str
    param_types: tuple[int, ...]


def decode_parse(chunk: bytes | memoryview, start: int, end: int) -> Parse:
    return Parse(*read_parse(*_as_bytes(chunk, start, end)))


@dataclass(frozen=True)
class Bind:
    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]


def decode_bind(chunk: bytes | memoryview, start: int, end: int) -> Bind:
    data, start, end = _as_bytes(chunk, start, end)
    portal, statement, pos = read_bind(data, start, end)
    return Bind(portal, statement, *_bind_tail(data, pos, end, True))


def decode_target(chunk: bytes | memoryview, start: int, end: int) -> tuple[str, str]:
    """Describe and Close: (``S`` or ``P``, name)."""
    return read_target(*_as_bytes(chunk, start, end))


def decode_execute(chunk: bytes | memoryview, start: int, end: int) -> str:
    return read_execute(*_as_bytes(chunk, start, end))


def decode_error_fields(chunk: bytes | memoryview, start: int, end: int) -> dict[str, str]:
    """ErrorResponse / NoticeResponse fields keyed by their one-letter code."""
    r = body_reader(chunk, start, end, remote="server")
    fields: dict[str, str] = {}
    while True:
        code = r.byte()
        if code == 0:
            break
        fields[chr(code)] = r.cstring()
    return fields


def decode_parameter_status(chunk: bytes | memoryview, start: int, end: int) -> tuple[str, str]:
    r = body_reader(chunk, start, end, remote="server")
    return r.cstring(), r.cstring()
