"""Review findings: protocol-level ways around decide() and relay bugs.

Each test drives the real proxy in front of a real PostgreSQL with a raw
protocol client, so the exact bytes and their order are under the test's
control. Every test fails while the bug it names is present.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pglast
import pytest
from pglast import ast

from proxy import scram, wire
from proxy.decide import ALLOW, Decision, SessionInfo, Unit, deny
from tests.conftest import PASSWORDS
from tests.rawclient import FLUSH, SYNC, RawClient, bind, error_fields, execute, parse


class SelectOnlyDecider:
    """Allows plain SELECTs, BEGIN/COMMIT/ROLLBACK, ``SET client_encoding``
    and a COPY into the scratch table; refuses the rest.

    It classifies with the real PostgreSQL parser (pglast), as a policy
    would, so a test failure means the proxy handed it SQL that differs from
    what runs upstream, not that the decider was naive. Statements the proxy
    cannot tell (``sql is None``) are refused, as the decide() contract asks.
    ``seen`` records every statement it was asked about.
    """

    def __init__(self) -> None:
        self.seen: list[str | None] = []
        self.lock = threading.Lock()

    @staticmethod
    def _harmless(sql: str | None) -> bool:
        if sql is None:
            return False
        try:
            parsed = pglast.parse_sql(sql)
        except pglast.parser.ParseError:
            return False
        for raw in parsed:
            stmt = raw.stmt
            if isinstance(stmt, ast.CopyStmt):
                if not (stmt.is_from and stmt.relation.relname == "review_scratch"):
                    return False
            elif isinstance(stmt, ast.VariableSetStmt):
                if stmt.name != "client_encoding":  # a session setting deemed harmless
                    return False
            elif not isinstance(stmt, (ast.SelectStmt, ast.TransactionStmt)):
                return False
        return True

    def decide(self, session: SessionInfo, unit: Unit) -> Decision:
        with self.lock:
            self.seen.extend(s.sql for s in unit.statements)
        if all(self._harmless(s.sql) for s in unit.statements):
            return ALLOW
        return deny("review policy: only SELECT", policy="review")


@pytest.fixture
def guarded(start_proxy):
    decider = SelectOnlyDecider()
    proxy = start_proxy(decider)
    proxy.decider = decider
    return proxy


@pytest.fixture
def victim(pg):
    pg.psql("DROP TABLE IF EXISTS review_victim; CREATE TABLE review_victim(x int); "
            "INSERT INTO review_victim VALUES (1), (2), (3); "
            "GRANT ALL ON review_victim TO pgv_scram; "
            "DROP TABLE IF EXISTS review_scratch; CREATE TABLE review_scratch(x int); "
            "GRANT ALL ON review_scratch TO pgv_scram")

    def remaining() -> int:
        return int(pg.psql("SELECT count(*) FROM review_victim").strip())

    return remaining


def _client(proxy) -> RawClient:
    c = RawClient(proxy.port)
    assert c.startup("alice", PASSWORDS["alice"])[-1] == ("Z", b"I")
    return c


def _kinds(msgs: list[tuple[str, bytes]]) -> list[str]:
    return [k for k, _ in msgs]


def _codes(msgs: list[tuple[str, bytes]]) -> list[str]:
    return [error_fields(body)["C"] for kind, body in msgs if kind == "E"]


def test_flush_then_denial_hides_unnamed_statement_from_tracker(guarded, victim):
    """Bypass: the acknowledgements of a Flush-ed prefix are swallowed with the poison.

    Attack: confirm the unnamed statement as ``SELECT 1``; then, in one cycle,
    send ``Parse "" DELETE`` + Flush (no Execute, so it is allowed and
    forwarded) followed by ``Bind/Execute`` of it + Sync (denied: poison).
    The server answers ParseComplete for the DELETE, but it arrives while the
    cycle is being substituted, so the substituting relay
    (``_relay_substituting``; ``_relay_slow`` in the work in progress) drops
    it without telling the tracker, and the poison's error then clears the
    tracker's pending Parse. The tracker still believes the unnamed statement is
    ``SELECT 1`` while upstream it is the DELETE: a later ``Bind "" ""`` +
    Execute is decided as ``SELECT 1`` and runs the DELETE.

    Expected: the tracker learns every acknowledgement, also in a poison
    cycle, so the later Execute is decided as the DELETE (or as "cannot
    tell") and refused; nothing is deleted.
    """
    c = _client(guarded)
    c.send(parse("", "SELECT 1") + SYNC)
    assert _kinds(c.read_until_ready()) == ["1", "Z"]
    c.send(parse("", "DELETE FROM review_victim") + FLUSH + bind("", "") + execute() + SYNC)
    assert _codes(c.read_until_ready()) == ["42501"]
    c.send(bind("", "") + execute() + SYNC)
    c.read_until_ready()
    c.close()
    assert victim() == 3, "the DELETE ran while decide() was shown 'SELECT 1'"


def test_flush_then_denial_drops_results_of_the_allowed_prefix(guarded, victim):
    """Responses to an allowed, already forwarded prefix vanish when the rest
    of the cycle is denied.

    ``Parse/Bind/Execute SELECT 42`` + Flush is a unit of its own: decided,
    allowed, forwarded, and PostgreSQL answers it at once (that is what Flush
    asks for). When the next unit in the same cycle is denied, the cycle is
    marked as a poison cycle and the substituting relay drops every message
    of it except ParameterStatus/Notification, so the client never gets the
    ParseComplete, BindComplete, DataRow and CommandComplete it asked for with
    Flush (a driver in pipeline mode then waits forever or mismatches results).
    The same happens when a batch is cut at ``BATCH_BUFFER_LIMIT``.

    Expected, as PostgreSQL without the proxy would answer if the second
    Execute failed: ``1 2 D C`` for the prefix, then the denial, then ``Z``.
    """
    c = _client(guarded)
    c.send(parse("", "SELECT 42") + bind("", "") + execute() + FLUSH
           + parse("", "DELETE FROM review_victim") + bind("", "") + execute() + SYNC)
    answer = c.read_until_ready()
    c.close()
    assert _kinds(answer) == ["1", "2", "D", "C", "E", "Z"]
    assert _codes(answer) == ["42501"]


def test_denial_at_flush_is_answered_before_sync(guarded, victim):
    """Hang: a unit denied at a Flush gets no answer until the client sends Sync.

    ``Parse/Bind/Execute`` + Flush asks the server to answer now; PostgreSQL
    sends an ErrorResponse for a failing Execute at once (without the proxy,
    this exact sequence with a missing table answers 42P01 immediately). The
    proxy only remembers the denial in ``skipping`` and sends the poison when
    the client's Sync arrives, so a client that waits for the answer to its
    Flush before syncing waits forever. psycopg's pipeline mode does exactly
    that: ``cur = conn.execute(denied)`` then ``cur.fetchone()`` inside
    ``conn.pipeline()`` hangs.

    Expected: the denial's ErrorResponse (42501) arrives right after the
    Flush (e.g. forward the poison Parse with a Flush at once, and the
    client's own Sync later), and the Sync still gets exactly one ReadyForQuery.
    """
    c = RawClient(guarded.port, timeout=5)
    assert c.startup("alice", PASSWORDS["alice"])[-1] == ("Z", b"I")
    c.send(parse("", "DELETE FROM review_victim") + bind("", "") + execute() + FLUSH)
    try:
        first = c.read_message()
    except TimeoutError:
        first = None
    assert first is not None, "no answer to the Flush within 5 s"
    assert first[0] == "E" and error_fields(first[1])["C"] == "42501"
    c.send(SYNC)
    assert c.read_until_ready() == [("Z", b"I")]
    c.close()


def _copy_in_with_sync(c: RawClient) -> None:
    """Simple-protocol COPY IN with a Sync sent in the middle of the data."""
    c.send(wire.query("COPY review_scratch FROM STDIN"))
    assert c.read_message()[0] == "G"
    c.send(SYNC + wire.message(b"d", b"7\n") + wire.message(b"c"))
    assert _kinds(c.read_until_ready()) == ["C", "Z"]


def _libpq_extended_copy(c: RawClient) -> None:
    """COPY IN through the extended protocol, exactly as libpq does it
    (PQexecParams; PQputCopyEnd sends CopyDone *and* a Sync)."""
    c.send(parse("", "COPY review_scratch FROM STDIN") + bind("", "") + execute() + SYNC)
    assert [c.read_message()[0] for _ in range(3)] == ["1", "2", "G"]
    c.send(wire.message(b"d", b"8\n") + wire.message(b"c") + SYNC)
    assert _kinds(c.read_until_ready()) == ["C", "Z"]


def _query_after_extended_error(c: RawClient) -> None:
    """An extended-protocol error, then a Query before the Sync: PostgreSQL
    discards the Query (everything up to Sync), so one ReadyForQuery comes."""
    c.send(parse("", "this is not sql") + wire.query("SELECT 1") + SYNC)
    assert _kinds(c.read_until_ready()) == ["E", "Z"]


DESYNC_TRIGGERS = {
    "sync-in-copy": _copy_in_with_sync,
    "libpq-extended-copy": _libpq_extended_copy,
    "query-after-extended-error": _query_after_extended_error,
}


@pytest.mark.parametrize("trigger", list(DESYNC_TRIGGERS))
def test_one_readyforquery_too_many_expected_lets_a_write_through(guarded, victim, trigger):
    """Bypass: the proxy counts sync points from the client's messages, but the
    server sends no ReadyForQuery for some of them, so the ExtendedTracker
    applies acknowledgements to the wrong cycle.

    PostgreSQL ignores Sync and Flush in COPY IN mode (libpq relies on it: an
    extended-protocol COPY sends Parse/Bind/Execute/Sync and then another Sync
    after CopyDone), and after an extended-protocol error everything up to
    Sync is discarded, Query messages included. In each case the proxy still calls
    ``tracker.sync()`` and appends to ``cycles`` for the client's Sync/Query,
    so from then on it expects one ReadyForQuery too many and the tracker is
    one cycle behind the server. The attack then:

    1. ``Parse x <syntax error>; Parse s1 SELECT 1; Sync``: the server fails
       at ``x``; the tracker clears its stale, empty cycle instead and keeps
       both Parses pending.
    2. ``Parse s1 DELETE; Parse s2 SELECT 2; Sync``: the server's two
       ParseCompletes are matched to step 1's pending Parses, so the tracker
       confirms ``s1 = SELECT 1``; upstream ``s1`` is the DELETE.
    3. ``Parse zz <syntax error>; Sync``: the error clears step 2's pending
       ``s1 = DELETE``.
    4. ``Bind "" s1; Execute; Sync``: decided as ``SELECT 1``, runs the DELETE.

    Expected: the proxy stays in step with the server's ReadyForQuery
    messages (Sync/Flush/Query that the server ignores or consumes are not
    counted as sync points), so the Execute is decided as the DELETE and
    refused.
    """
    c = _client(guarded)
    DESYNC_TRIGGERS[trigger](c)
    c.send(parse("x", "this is not sql") + parse("s1", "SELECT 1") + SYNC)
    assert _kinds(c.read_until_ready()) == ["E", "Z"]
    c.send(parse("s1", "DELETE FROM review_victim") + parse("s2", "SELECT 2") + SYNC)
    assert _kinds(c.read_until_ready()) == ["1", "1", "Z"]
    c.send(parse("zz", "this is not sql either") + SYNC)
    assert _kinds(c.read_until_ready()) == ["E", "Z"]
    c.send(bind("", "s1") + execute() + SYNC)
    c.read_until_ready()
    c.close()
    assert victim() == 3, "the DELETE ran while decide() was shown 'SELECT 1'"


@pytest.mark.parametrize("trigger", list(DESYNC_TRIGGERS))
def test_one_readyforquery_too_many_expected_misattributes_results(guarded, victim, trigger):
    """After the same desynchronisation, responses go to the wrong statement.

    The next denied Query's poison answer is relayed raw (the client sees the
    poison's syntax error, 42601, instead of 42501), and the *following*,
    allowed statement's results are swallowed and replaced by the denial.
    ``libpq-extended-copy`` is plain libpq behaviour, so ordinary drivers hit
    this.

    Expected: the denied statement gets 42501 and the next ``SELECT 1`` its row.
    """
    c = _client(guarded)
    DESYNC_TRIGGERS[trigger](c)
    c.send(wire.query("DELETE FROM review_victim"))
    denied = c.read_until_ready()
    c.send(wire.query("SELECT 1"))
    after = c.read_until_ready()
    c.close()
    assert _codes(denied) == ["42501"]
    assert _kinds(after) == ["T", "D", "C", "Z"]


_SJIS_SMUGGLE = "SELECT E'\u0081\\'; DELETE FROM review_victim; --'"


@pytest.mark.parametrize("how", ["startup-parameter", "options", "set"])
def test_client_encoding_makes_decider_see_other_sql(guarded, victim, how):
    """Bypass: the proxy decodes every Query as UTF-8, the server as client_encoding.

    With ``client_encoding=SJIS`` (or BIG5, GBK, UHC, GB18030: the
    client-only encodings whose multibyte characters may end in an ASCII
    byte), the UTF-8 text ``SELECT E'\u0081\\'; DELETE ...; --'`` is, to the
    proxy and its decider, one SELECT of a string literal: the backslash
    escapes the quote. The server reads the same bytes as SJIS: ``C2`` is a
    half-width katakana, ``81 5C`` is one double-byte character that swallows
    the backslash, so the quote ends the literal and the DELETE runs. The
    encoding can be chosen by a startup parameter, by ``options=-c
    client_encoding=SJIS``, or by ``SET client_encoding`` (psql's
    ``\\encoding``), which a policy has no reason to refuse.

    Expected: the proxy only lets a session use a client encoding it decodes
    exactly as the server does (in practice: refuse the client-only encodings
    at startup and refuse, or end the session on, a ParameterStatus that
    switches to one), so the DELETE never runs.
    """
    c = RawClient(guarded.port)
    params = {"startup-parameter": {"client_encoding": "SJIS"},
              "options": {"options": "-c client_encoding=SJIS"}, "set": {}}[how]
    login = c.startup("alice", PASSWORDS["alice"], **params)
    try:  # refusing the login, or ending the session at the SET, are both fine
        if login[-1] == ("Z", b"I"):
            if how == "set":
                c.send(wire.query("SET client_encoding TO 'SJIS'"))
                c.read_until_ready()
            sql = _SJIS_SMUGGLE.encode("utf-8") + b"\0"
            c.send(b"Q" + (4 + len(sql)).to_bytes(4, "big") + sql)
            c.read_until_ready()
    except OSError:
        pass
    c.close()
    assert victim() == 3, "the DELETE ran while decide() was shown one SELECT"


_SCS_SMUGGLE = "SELECT '\\', ' ; DELETE FROM review_victim; -- '"


@pytest.mark.parametrize("how", ["startup-parameter", "options"])
def test_standard_conforming_strings_off_at_login_hides_sql(guarded, victim, how):
    """Bypass: a startup setting changes how the server lexes SQL; decide() is not told.

    ``standard_conforming_strings=off`` as a startup parameter (or in
    ``options``) is forwarded upstream as an ordinary setting. With it, a
    backslash escapes a quote in ``'...'``: ``SELECT '\\', ' ; DELETE ...; -- '``
    is, for the decider (and any parser using PostgreSQL's default lexing,
    such as libpg_query/pglast), a SELECT of two string literals; the server
    reads ``'\\', '`` as one literal and runs the DELETE. The decider never
    sees the setting: it is not a statement, ``SessionInfo`` does not carry it
    and ``Unit`` has no lexing context.

    Expected: the proxy refuses connection-time settings that change how SQL
    is lexed (``standard_conforming_strings``, ``backslash_quote``,
    ``client_encoding`` other than UTF8), or tracks the server's
    ParameterStatus for them and gives the decider the context; either way
    the DELETE does not run. (``SET standard_conforming_strings = off`` is
    seen by the decider but a policy has no way to carry it to later
    statements either; the same ParameterStatus tracking would cover it.)
    """
    c = RawClient(guarded.port)
    params = {"startup-parameter": {"standard_conforming_strings": "off"},
              "options": {"options": "-c standard_conforming_strings=off"}}[how]
    login = c.startup("alice", PASSWORDS["alice"], **params)
    if login[-1] == ("Z", b"I"):
        c.send(wire.query(_SCS_SMUGGLE))
        c.read_until_ready()
    c.close()
    assert victim() == 3, "the DELETE ran while decide() was shown one SELECT"


def test_input_during_upstream_login_is_not_buffered_without_bound(start_proxy):
    """Memory DoS: while the proxy logs in upstream, it reads everything the
    client sends into its handshake Inbox, without limit and without pausing.

    A client that has authenticated may pipeline its first statements before
    the proxy's ReadyForQuery; they wait in ``ClientSession.inbox``. But
    ``Inbox.feed`` appends whatever arrives and the transport is never
    paused, so while the upstream is slow to answer (overloaded, or
    unreachable until ``connect_timeout``, 10 s by default) one client can make
    the proxy hold hundreds of megabytes per second (about 400 MB/s here), and
    when the upstream finally answers, all of it is framed and decided in one
    synchronous call that stalls every other session.

    Expected: the proxy stops reading from the client once a modest amount is
    buffered (as it does in the relay with pause_reading), so a client cannot
    push more than a few megabytes (socket buffers included) before the relay
    starts.
    """
    silent = socket.socket()  # accepts TCP connections (backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    proxy = start_proxy(upstream_port=silent.getsockname()[1],
                        resource_extra="    connect_timeout: 8s\n")
    c = RawClient(proxy.port)
    try:
        c.send(wire.encode_startup({"user": "alice", "database": "app"}))
        exchange = scram.ScramClient(PASSWORDS["alice"])
        while True:
            msg = c.read_message()
            assert msg is not None and msg[0] == "R"
            (code,) = struct.unpack("!i", msg[1][:4])
            if code == 10:
                c.send(wire.sasl_initial_response(scram.MECHANISM, exchange.first()))
            elif code == 11:
                c.send(wire.password_message(exchange.final(msg[1][4:])))
            elif code == 12:
                break
        pipelined = wire.query("SELECT 1") * 70_000  # about 1 MB
        limit = 128 * 1024 * 1024
        c.sock.settimeout(2)
        sent = 0
        started = time.monotonic()
        try:
            while sent < limit and time.monotonic() - started < 5:
                c.sock.sendall(pipelined)
                sent += len(pipelined)
        except OSError:  # blocked (timeout) or refused (connection closed): both fine
            pass
    finally:
        c.close()
        silent.close()
    assert sent < 32 * 1024 * 1024, f"the proxy accepted {sent >> 20} MB before upstream login"
