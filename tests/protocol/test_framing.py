"""Framing and decoding of raw protocol bytes, without sockets.

The properties: any sequence of valid messages, cut into any TCP chunks,
gives back the very same messages and the very same bytes; any byte stream
gives messages or a clean ``ProtocolError`` (never another exception, never
a buffer sized from an untrusted length); an incomplete message just waits.
"""

from __future__ import annotations

import itertools
import struct
import tracemalloc
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import wire
from proxy.wire import Framer, ProtocolError

MAX = 1024  # a small max_size keeps bodies and the "too long" boundary cheap to reach

Decoder = Callable[[bytes, int, int], object]

fast = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def frame(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!i", len(body) + 4) + body


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` split at ``points`` (positions, any order, duplicates allowed)."""
    bounds = [0, *sorted(p % (len(data) + 1) for p in points), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def feed_all(framer: Framer, chunks: list[bytes]) -> tuple[list[tuple[int, bytes]], bytes]:
    """Messages (type, body) and the concatenated returned chunks."""
    messages: list[tuple[int, bytes]] = []
    forwarded = bytearray()
    for data in chunks:
        chunk, found = framer.feed(data)
        check_chunk(chunk, found)
        forwarded += chunk
        messages += [(kind, bytes(chunk[start + 5 : end])) for kind, start, end in found]
    return messages, bytes(forwarded)


def check_chunk(chunk: bytes | memoryview, found: list[tuple[int, int, int]]) -> None:
    """A returned chunk is exactly its messages, back to back, nothing more."""
    pos = 0
    for kind, start, end in found:
        assert start == pos
        assert chunk[start] == kind
        (length,) = struct.unpack_from("!i", chunk, start + 1)
        assert end == start + 1 + length
        pos = end
    assert pos == len(chunk)


def reference(data: bytes, max_size: int) -> tuple[list[tuple[int, bytes]], int | None, int]:
    """Frame ``data`` in one go, the slow obvious way.

    Returns the messages, the stream offset at which the error becomes
    detectable (the end of the first invalid header) or None, and the number
    of bytes consumed by complete messages.
    """
    messages: list[tuple[int, bytes]] = []
    pos = 0
    while len(data) - pos >= 5:
        kind = data[pos]
        (length,) = struct.unpack_from("!i", data, pos + 1)
        if length < 4 or length > max_size:
            return messages, pos + 5, pos
        if pos + 1 + length > len(data):
            break
        messages.append((kind, data[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return messages, None, pos


bodies = st.binary(max_size=200)
kinds = st.integers(0, 255)
valid_messages = st.lists(st.tuples(kinds, bodies), max_size=12)
split_points = st.lists(st.integers(0, 10_000), max_size=30)


def segment() -> st.SearchStrategy[bytes]:
    """Stream pieces biased towards what breaks framers: headers with odd lengths."""
    any_length = st.one_of(
        st.integers(-(2**31), 2**31 - 1),
        st.integers(-2, 8),
        st.sampled_from([MAX - 1, MAX, MAX + 1, 2**31 - 1, -(2**31)]),
    )
    return st.one_of(
        st.builds(frame, kinds, bodies),
        st.builds(lambda k, n: bytes([k]) + struct.pack("!i", n), kinds, any_length),
        st.binary(max_size=20),
    )


# --------------------------------------------------------------------------
# Framer: valid streams
# --------------------------------------------------------------------------
@fast
@given(valid_messages, split_points)
def test_any_split_gives_the_same_messages_and_bytes(
    msgs: list[tuple[int, bytes]], points: list[int]
) -> None:
    stream = b"".join(frame(k, b) for k, b in msgs)
    framer = Framer(MAX)
    messages, forwarded = feed_all(framer, cut(stream, points))
    assert messages == msgs
    assert forwarded == stream
    assert framer.buffered == 0


@fast
@given(valid_messages, st.integers(1, 7))
def test_byte_at_a_time(msgs: list[tuple[int, bytes]], step: int) -> None:
    stream = b"".join(frame(k, b) for k, b in msgs)
    framer = Framer(MAX)
    chunks = [stream[i : i + step] for i in range(0, len(stream), step)]
    messages, forwarded = feed_all(framer, chunks)
    assert messages == msgs
    assert forwarded == stream


def test_whole_messages_are_handed_back_without_copying() -> None:
    data = frame(ord("Q"), b"SELECT 1\x00") + frame(ord("S"), b"")
    chunk, found = Framer(MAX).feed(data)
    assert chunk is data
    assert [(k, s, e) for k, s, e in found] == [(ord("Q"), 0, 14), (ord("S"), 14, 19)]


def test_empty_body_and_empty_feed() -> None:
    framer = Framer(MAX)
    assert framer.feed(b"") == (b"", [])
    chunk, found = framer.feed(wire.SYNC)
    assert bytes(chunk) == wire.SYNC and found == [(ord("S"), 0, 5)]


def test_message_of_exactly_max_size_is_accepted() -> None:
    body = b"x" * (MAX - 4)
    messages, _ = feed_all(Framer(MAX), [frame(ord("d"), body)])
    assert messages == [(ord("d"), body)]


# --------------------------------------------------------------------------
# Framer: truncation waits
# --------------------------------------------------------------------------
@fast
@given(kinds, bodies, st.data())
def test_truncated_message_waits_then_completes(kind: int, body: bytes, data: st.DataObject) -> None:
    raw = frame(kind, body)
    keep = data.draw(st.integers(0, len(raw) - 1))
    framer = Framer(MAX)
    chunk, found = framer.feed(raw[:keep])
    assert found == [] and len(chunk) == 0
    assert framer.buffered == keep
    chunk, found = framer.feed(raw[keep:])
    assert [(k, bytes(chunk[s + 5 : e])) for k, s, e in found] == [(kind, body)]
    assert framer.buffered == 0


def test_complete_messages_before_a_partial_one_are_returned_at_once() -> None:
    first = frame(ord("Q"), b"SELECT 1\x00")
    second = frame(ord("Q"), b"SELECT 2\x00")
    framer = Framer(MAX)
    chunk, found = framer.feed(first + second[:7])
    assert bytes(chunk) == first and len(found) == 1
    assert framer.buffered == 7
    chunk, found = framer.feed(second[7:])
    assert bytes(chunk) == second and len(found) == 1


# --------------------------------------------------------------------------
# Framer: hostile streams
# --------------------------------------------------------------------------
@fast
@given(st.lists(segment(), max_size=10), split_points)
def test_any_stream_gives_messages_or_a_clean_protocol_error(
    segments: list[bytes], points: list[int]
) -> None:
    stream = b"".join(segments)
    expected, error_at, consumed = reference(stream, MAX)
    framer = Framer(MAX, remote="server")
    got: list[tuple[int, bytes]] = []
    fed = 0
    for data in cut(stream, points):
        before = fed
        fed += len(data)
        try:
            chunk, found = framer.feed(data)
        except ProtocolError as exc:
            assert exc.remote == "server"
            # raised by the very chunk that completed the bad header
            assert error_at is not None and before < error_at <= fed
            break
        check_chunk(chunk, found)
        got += [(k, bytes(chunk[s + 5 : e])) for k, s, e in found]
        assert error_at is None or fed < error_at
    else:
        assert error_at is None
        assert got == expected
        assert framer.buffered == len(stream) - consumed
        return
    assert got == expected[: len(got)]


@pytest.mark.parametrize("length", [-(2**31), -1, 0, 1, 2, 3])
def test_length_below_four_is_refused(length: int) -> None:
    with pytest.raises(ProtocolError):
        Framer(MAX).feed(b"Q" + struct.pack("!i", length))


@pytest.mark.parametrize("length", [MAX + 1, 2**31 - 1])
def test_length_above_max_is_refused_from_the_header_alone(length: int) -> None:
    framer = Framer(MAX)
    header = b"Q" + struct.pack("!i", length)
    for byte in header[:-1]:
        assert framer.feed(bytes([byte])) == (b"", [])
    with pytest.raises(ProtocolError, match="invalid message length"):
        framer.feed(header[-1:])


def test_two_gigabyte_length_raises_at_once_without_allocating() -> None:
    framer = Framer((1 << 30) + (1 << 20))  # the relay's upstream limit
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            framer.feed(b"D" + struct.pack("!I", 2**31))  # 2 GB, negative as Int32
        with pytest.raises(ProtocolError):
            Framer(64 << 20).feed(b"D" + struct.pack("!i", 2**31 - 1))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_large_but_allowed_length_buffers_only_what_arrived() -> None:
    framer = Framer(1 << 30)
    tracemalloc.start()
    try:
        framer.feed(b"d" + struct.pack("!i", (1 << 30) - 1) + b"abc")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert framer.buffered == 8
    assert peak < 1 << 20


def test_error_names_the_remote_side() -> None:
    with pytest.raises(ProtocolError) as info:
        Framer(MAX, remote="server").feed(b"E" + struct.pack("!i", 2))
    assert info.value.remote == "server"


# --------------------------------------------------------------------------
# startup packet length
# --------------------------------------------------------------------------
@pytest.mark.parametrize("length", [-(2**31), -1, 0, 4, 7, wire.MAX_STARTUP_SIZE + 1, 2**31 - 1])
def test_startup_length_refuses_bad_lengths_from_four_bytes(length: int) -> None:
    with pytest.raises(ProtocolError, match="invalid startup packet length"):
        wire.startup_length(struct.pack("!i", length))


def test_startup_length_accepts_real_packets() -> None:
    packet = wire.encode_startup({"user": "alice"})
    assert wire.startup_length(packet[:4]) == len(packet)


def test_startup_packet_of_maximum_size_is_accepted() -> None:
    payload = struct.pack("!i", wire.PROTOCOL_3_0) + b"a\x00" + b"b" * (wire.MAX_STARTUP_SIZE - 12)
    payload += b"\x00\x00"
    packet = struct.pack("!i", len(payload) + 4) + payload
    assert len(packet) == wire.MAX_STARTUP_SIZE
    assert wire.startup_length(packet[:4]) == len(packet)
    assert isinstance(wire.decode_startup_packet(packet[4:]), wire.StartupMessage)


# --------------------------------------------------------------------------
# decode_startup_packet
# --------------------------------------------------------------------------
def payload(*parts: bytes, version: int = wire.PROTOCOL_3_0) -> bytes:
    return struct.pack("!i", version) + b"".join(parts)


text_no_nul = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)))


@fast
@given(st.dictionaries(text_no_nul.filter(bool), text_no_nul, max_size=8))
def test_startup_message_round_trip(params: dict[str, str]) -> None:
    decoded = wire.decode_startup_packet(wire.encode_startup(params)[4:])
    assert isinstance(decoded, wire.StartupMessage)
    assert decoded.params == params
    assert decoded.version == wire.PROTOCOL_3_0 and decoded.minor == 0


@fast
@given(st.binary(max_size=200))
def test_decode_startup_packet_never_raises_anything_but_protocol_error(raw: bytes) -> None:
    for candidate in (raw, payload(raw), payload(raw + b"\x00")):
        try:
            wire.decode_startup_packet(candidate)
        except ProtocolError:
            pass


def test_empty_parameter_list() -> None:
    decoded = wire.decode_startup_packet(payload(b"\x00"))
    assert decoded == wire.StartupMessage(wire.PROTOCOL_3_0, {})


def test_empty_value_is_kept() -> None:
    decoded = wire.decode_startup_packet(payload(b"user\x00alice\x00application_name\x00\x00\x00"))
    assert isinstance(decoded, wire.StartupMessage)
    assert decoded.params == {"user": "alice", "application_name": ""}


def test_later_duplicate_parameter_wins_like_postgresql() -> None:
    decoded = wire.decode_startup_packet(payload(b"user\x00alice\x00user\x00bob\x00\x00"))
    assert isinstance(decoded, wire.StartupMessage)
    assert decoded.params == {"user": "bob"}


def test_minor_version_and_protocol_options_are_reported() -> None:
    decoded = wire.decode_startup_packet(
        payload(b"user\x00a\x00_pq_.x\x00on\x00\x00", version=(3 << 16) | 2)
    )
    assert isinstance(decoded, wire.StartupMessage)
    assert decoded.minor == 2
    assert decoded.protocol_options == ["_pq_.x"]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\x03",
        payload(),  # no terminator at all
        payload(b"user\x00alice"),  # value not terminated
        payload(b"user\x00alice\x00database\x00\x00"),  # name without value
        payload(b"user\x00\x00"),  # name, then the terminator: no value
        payload(b"\x00x\x00\x00"),  # empty name
        payload(b"user\x00alice\x00\x00junk\x00"),  # bytes after the terminator
        payload(b"user\x00\xff\xfe\x00\x00"),  # not UTF-8
        payload(b"\xc3\x28\x00x\x00\x00"),  # invalid UTF-8 in a name
        payload(b"\x00", version=2 << 16),  # protocol 2.0
        payload(b"\x00", version=4 << 16),
        payload(b"\x00", version=-1),
    ],
)
def test_malformed_startup_packets_are_refused(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        wire.decode_startup_packet(raw)


def test_startup_packet_without_final_terminator_is_refused() -> None:
    # PostgreSQL: "invalid startup packet layout: expected terminator as last
    # byte" -- the list of parameters must end with an empty name.
    with pytest.raises(ProtocolError):
        wire.decode_startup_packet(payload(b"user\x00alice\x00"))


@pytest.mark.parametrize("code", [wire.SSL_REQUEST, wire.GSSENC_REQUEST])
def test_special_requests(code: int) -> None:
    assert wire.decode_startup_packet(struct.pack("!i", code)) == wire.SpecialRequest(code)
    with pytest.raises(ProtocolError):
        wire.decode_startup_packet(struct.pack("!i", code) + b"\x00")


def test_ssl_request_encoder() -> None:
    assert wire.encode_ssl_request() == struct.pack("!ii", 8, wire.SSL_REQUEST)


@pytest.mark.parametrize("secret_len", [4, 32, 256])
def test_cancel_request_round_trip(secret_len: int) -> None:
    secret = bytes(i % 256 for i in range(secret_len))
    packet = wire.encode_cancel_request(1234, secret)
    assert struct.unpack_from("!i", packet)[0] == len(packet)
    assert wire.decode_startup_packet(packet[4:]) == wire.CancelRequest(1234, secret)


@pytest.mark.parametrize("extra", [0, 3, 257])
def test_malformed_cancel_request(extra: int) -> None:
    with pytest.raises(ProtocolError, match="cancel"):
        wire.decode_startup_packet(
            struct.pack("!ii", wire.CANCEL_REQUEST, 1) + b"\x00" * extra
        )


# --------------------------------------------------------------------------
# Reader and the message decoders
# --------------------------------------------------------------------------
def cstr(b: bytes) -> bytes:
    return b + b"\x00"


def enc_parse(name: bytes, sql: bytes, types: list[int]) -> bytes:
    body = cstr(name) + cstr(sql) + struct.pack("!h", len(types))
    body += b"".join(struct.pack("!i", t) for t in types)
    return frame(ord("P"), body)


def enc_bind(portal: bytes, stmt: bytes, formats: list[int], params: list[bytes | None],
             results: list[int]) -> bytes:
    body = cstr(portal) + cstr(stmt) + struct.pack("!h", len(formats))
    body += b"".join(struct.pack("!h", f) for f in formats)
    body += struct.pack("!h", len(params))
    for p in params:
        body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
    body += struct.pack("!h", len(results)) + b"".join(struct.pack("!h", f) for f in results)
    return frame(ord("B"), body)


def whole(msg: bytes) -> tuple[bytes, int, int]:
    return msg, 0, len(msg)


names = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
                max_size=30)


@fast
@given(names, names, st.lists(st.integers(-(2**31), 2**31 - 1), max_size=10))
def test_parse_round_trip(name: str, sql: str, types: list[int]) -> None:
    msg = enc_parse(name.encode(), sql.encode(), types)
    assert wire.decode_parse(*whole(msg)) == wire.Parse(name, sql, tuple(types))


@fast
@given(names, names, st.lists(st.integers(0, 1), max_size=5),
       st.lists(st.one_of(st.none(), st.binary(max_size=20)), max_size=8),
       st.lists(st.integers(0, 1), max_size=5))
def test_bind_round_trip(portal: str, stmt: str, formats: list[int],
                         params: list[bytes | None], results: list[int]) -> None:
    msg = enc_bind(portal.encode(), stmt.encode(), formats, params, results)
    assert wire.decode_bind(*whole(msg)) == wire.Bind(portal, stmt, tuple(formats), tuple(params))


def test_decoders_work_on_offsets_inside_a_larger_chunk() -> None:
    parse = enc_parse(b"s1", b"SELECT $1", [23])
    execute = frame(ord("E"), b"p1\x00" + struct.pack("!i", 0))
    chunk = memoryview(wire.SYNC + parse + execute)
    _, found = Framer(MAX).feed(bytes(chunk))
    (_, _, _), (_, ps, pe), (_, es, ee) = found
    assert wire.decode_parse(chunk, ps, pe) == wire.Parse("s1", "SELECT $1", (23,))
    assert wire.decode_execute(chunk, es, ee) == "p1"


@pytest.mark.parametrize("size", [0, 1, 23, 24, 25, 63, 300])
def test_names_of_every_length_around_the_short_scan(size: int) -> None:
    """Names are found by a short loop, then by bytes.find: both sides of the switch."""
    name = "n" * size
    raw = name.encode()
    assert wire.decode_parse(*whole(enc_parse(raw, b"SELECT 1", []))) == wire.Parse(name, "SELECT 1", ())
    assert wire.decode_bind(*whole(enc_bind(raw, raw, [], [b"7"], []))) == wire.Bind(name, name, (), (b"7",))
    assert wire.decode_execute(*whole(frame(ord("E"), cstr(raw) + struct.pack("!i", 0)))) == name
    assert wire.decode_target(*whole(frame(ord("D"), b"S" + cstr(raw)))) == ("S", name)
    for broken in (frame(ord("E"), raw + struct.pack("!i", 0)),  # name never ends
                   frame(ord("D"), b"S" + raw)):
        with pytest.raises(ProtocolError):
            (wire.decode_execute if broken[0] == ord("E") else wire.decode_target)(*whole(broken))


def test_query_describe_close_execute() -> None:
    assert wire.decode_query(*whole(wire.query("SELECT 'é'"))) == "SELECT 'é'"
    assert wire.decode_target(*whole(frame(ord("D"), b"S" + cstr(b"s1")))) == ("S", "s1")
    assert wire.decode_target(*whole(frame(ord("C"), b"P" + cstr(b"")))) == ("P", "")
    assert wire.decode_execute(*whole(frame(ord("E"), cstr(b"") + struct.pack("!i", 10)))) == ""


@pytest.mark.parametrize(
    ("decoder", "msg"),
    [
        (wire.decode_query, frame(ord("Q"), b"SELECT 1")),  # no terminator
        (wire.decode_query, frame(ord("Q"), b"SELECT 1\x00x")),  # trailing bytes
        # a NUL inside: PostgreSQL would run only "SELECT 1" and then refuse the
        # message, so the text the decider would see is not what runs
        (wire.decode_query, frame(ord("Q"), b"SELECT 1\x00; DROP TABLE t\x00")),
        (wire.decode_query, frame(ord("Q"), b"\x00\x00")),
        (wire.decode_query, frame(ord("Q"), b"\xff\x00")),  # not UTF-8
        (wire.decode_parse, frame(ord("P"), b"s\x00SELECT 1\x00" + struct.pack("!h", -1))),
        (wire.decode_parse, frame(ord("P"), b"s\x00SELECT 1\x00" + struct.pack("!h", 3) + b"\0")),
        (wire.decode_parse, frame(ord("P"), b"s\x00SELECT 1\x00")),  # count missing
        (wire.decode_bind, frame(ord("B"), b"\x00\x00" + struct.pack("!h", -1))),
        (wire.decode_bind, frame(ord("B"), b"\x00\x00" + struct.pack("!hhi", 0, 1, -2))),
        (wire.decode_bind, frame(ord("B"), b"\x00\x00" + struct.pack("!hhi", 0, 1, 2**31 - 1))),
        (wire.decode_bind, frame(ord("B"), b"\x00\x00" + struct.pack("!hhh", 0, 0, -1))),
        (wire.decode_bind, enc_bind(b"", b"", [], [], [])[:-1]),
        (wire.decode_target, frame(ord("D"), b"X\x00")),
        (wire.decode_target, frame(ord("D"), b"")),
        (wire.decode_target, frame(ord("D"), b"Ss1\x00junk")),
        (wire.decode_execute, frame(ord("E"), b"\x00\x00\x00")),
        (wire.decode_execute, frame(ord("E"), b"\x00" + struct.pack("!i", 0) + b"x")),
        (wire.decode_error_fields, frame(ord("E"), b"Sfoo\x00")),  # no final zero
        (wire.decode_error_fields, frame(ord("E"), b"Sfoo")),
    ],
)
def test_malformed_messages_raise_protocol_error(decoder: Decoder, msg: bytes) -> None:
    with pytest.raises(ProtocolError):
        decoder(*whole(msg))


DECODERS = [
    (ord("Q"), wire.decode_query),
    (ord("P"), wire.decode_parse),
    (ord("B"), wire.decode_bind),
    (ord("D"), wire.decode_target),
    (ord("E"), wire.decode_execute),
    (ord("E"), wire.decode_error_fields),
    (ord("S"), wire.decode_parameter_status),
]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(DECODERS), st.binary(max_size=60))
def test_decoders_on_garbage_raise_only_protocol_error(pair: tuple[int, Decoder],
                                                        body: bytes) -> None:
    kind, decoder = pair
    try:
        decoder(*whole(frame(kind, body)))
    except ProtocolError:
        pass


def test_reader_bounds() -> None:
    r = wire.Reader(b"\x00\x01\x00\x00\x00\x02ab\x00rest")
    assert r.int16() == 1
    assert r.int32() == 2
    assert r.cstring() == "ab"
    with pytest.raises(ProtocolError):
        r.done()
    assert r.bytes(2) == b"re"
    with pytest.raises(ProtocolError):
        r.bytes(3)
    with pytest.raises(ProtocolError):
        r.bytes(-1)
    assert r.rest() == b"st"
    r.done()
    for read in (r.byte, r.int16, r.int32, r.cstring):
        with pytest.raises(ProtocolError):
            read()


# --------------------------------------------------------------------------
# encoders
# --------------------------------------------------------------------------
@fast
@given(names, names, st.one_of(st.none(), names), st.one_of(st.none(), names))
def test_error_response_round_trip(code: str, text: str, detail: str | None,
                                   hint: str | None) -> None:
    msg = wire.error_response(code, text, severity="FATAL", detail=detail, hint=hint)
    messages, _ = feed_all(Framer(1 << 20), [msg])
    assert [k for k, _ in messages] == [ord("E")]
    fields = wire.decode_error_fields(*whole(msg))
    expected = {"S": "FATAL", "V": "FATAL", "C": code, "M": text}
    if detail:
        expected["D"] = detail
    if hint:
        expected["H"] = hint
    assert fields == expected


def test_encoders_strip_nul_from_text() -> None:
    msg = wire.notice_response("a\x00b", code="01000")
    assert wire.decode_error_fields(*whole(msg))["M"] == "ab"
    assert msg[0:1] == b"N"


def test_fixed_encoders() -> None:
    assert wire.auth_ok() == b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    assert wire.ready_for_query(b"T") == b"Z\x00\x00\x00\x05T"
    assert wire.TERMINATE == b"X\x00\x00\x00\x04"
    assert wire.SYNC == b"S\x00\x00\x00\x04"
    assert wire.auth_sasl(["SCRAM-SHA-256"]) == (
        b"R" + struct.pack("!ii", 23, 10) + b"SCRAM-SHA-256\x00\x00"
    )
    assert wire.auth_sasl_continue(b"r=x") == b"R" + struct.pack("!ii", 11, 11) + b"r=x"
    assert wire.auth_sasl_final(b"v=x") == b"R" + struct.pack("!ii", 11, 12) + b"v=x"
    assert wire.backend_key_data(7, b"\x01\x02\x03\x04") == (
        b"K" + struct.pack("!ii", 12, 7) + b"\x01\x02\x03\x04"
    )
    assert wire.parameter_status("a", "b") == b"S" + struct.pack("!i", 8) + b"a\x00b\x00"
    msg = wire.parameter_status("server_version", "17")
    assert wire.decode_parameter_status(*whole(msg)) == ("server_version", "17")
    assert wire.sasl_initial_response("SCRAM-SHA-256", b"n,,") == (
        b"p" + struct.pack("!i", 4 + 14 + 4 + 3) + b"SCRAM-SHA-256\x00" + struct.pack("!i", 3)
        + b"n,,"
    )


def test_negotiate_protocol_version() -> None:
    msg = wire.negotiate_protocol_version(0, ["_pq_.a", "_pq_.b"])
    r = wire.body_reader(*whole(msg))
    assert msg[0:1] == b"v"
    assert r.int32() == wire.PROTOCOL_3_0
    assert r.int32() == 2
    assert [r.cstring(), r.cstring()] == ["_pq_.a", "_pq_.b"]
    r.done()


def test_row_description_and_data_row() -> None:
    rows = wire.row_description(["a", "b"]) + wire.data_row(["x", None]) + wire.command_complete(
        "SELECT 1"
    )
    messages, _ = feed_all(Framer(MAX), [rows])
    assert [chr(k) for k, _ in messages] == ["T", "D", "C"]
    r = wire.Reader(messages[1][1])
    assert r.int16() == 2
    assert r.int32() == 1 and r.bytes(1) == b"x"
    assert r.int32() == -1
    r.done()
    r = wire.Reader(messages[0][1])
    assert r.int16() == 2
    assert r.cstring() == "a"
    assert struct.unpack("!ihihih", r.bytes(18)) == (0, 0, 25, -1, -1, 0)
