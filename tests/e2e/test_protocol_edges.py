"""Hostile and unusual clients: the offending connection ends, others go on."""

from __future__ import annotations

import socket
import struct
import time

import psycopg

from proxy import wire
from tests.conftest import PASSWORDS
from tests.rawclient import RawClient, error_fields


def _alive(proxy) -> None:
    with psycopg.connect(proxy.dsn("bob"), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def _closed_after_error(c: RawClient) -> dict[str, str] | None:
    msg = c.read_message()
    fields = error_fields(msg[1]) if msg and msg[0] == "E" else None
    assert c.read_message() is None  # connection closed
    return fields


def test_negotiate_protocol_version(proxy):
    c = RawClient(proxy.port)
    payload = struct.pack("!i", (3 << 16) | 2)
    for k, v in {"user": "alice", "database": "app", "_pq_.magic": "on"}.items():
        payload += k.encode() + b"\0" + v.encode() + b"\0"
    payload += b"\0"
    c.send(struct.pack("!i", len(payload) + 4) + payload)
    kind, body = c.read_message()
    assert kind == "v"
    newest, count = struct.unpack("!ii", body[:8])
    assert newest == 3 << 16 and count == 1 and b"_pq_.magic" in body
    assert c.read_message()[0] == "R"  # authentication continues normally
    c.close()


def test_ssl_and_gss_requests_declined_without_tls(proxy):
    c = RawClient(proxy.port)
    c.send(wire.encode_ssl_request())
    assert c.sock.recv(1) == b"N"
    c.send(struct.pack("!ii", 8, wire.GSSENC_REQUEST))
    assert c.sock.recv(1) == b"N"
    msgs = c.startup("alice", PASSWORDS["alice"])
    assert msgs[-1] == ("Z", b"I")
    c.close()


def test_garbage_before_startup(proxy):
    c = RawClient(proxy.port)
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    fields = _closed_after_error(c)
    assert fields is not None and fields["C"] == "08P01"
    _alive(proxy)


def test_absurd_length_after_login(proxy):
    c = RawClient(proxy.port)
    c.startup("alice", PASSWORDS["alice"])
    c.send(b"Q" + struct.pack("!I", 0x7FFFFFF0) + b"SELECT 1")
    fields = _closed_after_error(c)
    assert fields is not None and fields["C"] == "08P01"
    _alive(proxy)


def test_unknown_message_type(proxy):
    c = RawClient(proxy.port)
    c.startup("alice", PASSWORDS["alice"])
    c.send(wire.message(b"!", b"whatever"))
    fields = _closed_after_error(c)
    assert fields is not None and "invalid frontend message type" in fields["M"]
    _alive(proxy)


def test_malformed_bind(proxy):
    c = RawClient(proxy.port)
    c.startup("alice", PASSWORDS["alice"])
    c.send(wire.message(b"B", b"\0\0\x00\x05"))  # truncated format list
    fields = _closed_after_error(c)
    assert fields is not None and fields["C"] == "08P01"
    _alive(proxy)


def test_disconnect_mid_message(proxy):
    for _ in range(3):
        c = RawClient(proxy.port)
        c.startup("alice", PASSWORDS["alice"])
        c.send(b"Q" + struct.pack("!i", 1000) + b"SELECT")
        c.close()
    s = socket.create_connection(("127.0.0.1", proxy.port))
    s.send(b"\x00\x00")
    s.close()
    time.sleep(0.2)
    _alive(proxy)
    deadline = time.time() + 5
    while time.time() < deadline and len(proxy.server.sessions) > 0:
        time.sleep(0.05)
    assert len(proxy.server.sessions) == 0


def test_auth_timeout(start_proxy):
    proxy = start_proxy(extra="limits: {auth_timeout: 1s}\n")
    c = RawClient(proxy.port)
    started = time.monotonic()
    fields = _closed_after_error(c)
    assert fields is not None and "timed out" in fields["M"]
    assert time.monotonic() - started < 5


def test_cancel_with_wrong_key_is_ignored(proxy):
    s = socket.create_connection(("127.0.0.1", proxy.port))
    s.send(wire.encode_cancel_request(12345, b"\0\0\0\0"))
    assert s.recv(10) == b""
    s.close()
    _alive(proxy)


def test_proxy_key_is_not_the_upstream_key(proxy):
    with psycopg.connect(proxy.dsn("alice")) as conn:
        upstream_pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert conn.info.backend_pid != upstream_pid


def test_query_after_unsynced_batch_keeps_later_packets_in_order(proxy, pg):
    """asyncpg's COPY: Parse/Describe/Flush, then a COPY Query, then the data in
    later packets. The proxy probes the server before forwarding the Query; bytes
    that arrive meanwhile must wait their turn."""
    from tests.rawclient import FLUSH, bind, execute, parse

    pg.psql("CREATE TABLE IF NOT EXISTS copy_probe(x int); TRUNCATE copy_probe; "
            "GRANT ALL ON copy_probe TO pgv_scram")
    c = RawClient(proxy.port)
    c.startup("alice", PASSWORDS["alice"])
    c.send(wire.query("BEGIN"))
    c.read_until_ready()
    # the server is busy with the flushed batch while the probe waits behind it,
    # so the copy data arrives while the probe is unanswered
    c.send(parse("", "SELECT pg_sleep(0.4)") + bind("", "") + execute() + FLUSH
           + wire.query("COPY copy_probe FROM STDIN"))
    time.sleep(0.1)
    c.send(wire.message(b"d", b"1\n"))
    time.sleep(0.05)
    c.send(wire.message(b"d", b"2\n") + wire.message(b"c"))
    kinds = [k for k, _ in c.read_until_ready()]
    assert kinds == ["1", "2", "D", "C", "G", "C", "Z"]
    c.send(wire.query("COMMIT"))
    assert c.read_until_ready()[-1] == ("Z", b"I")
    c.close()
    assert pg.psql("SELECT sum(x) FROM copy_probe").strip() == "3"
