"""The decide() interception point, with a small test decider.

The decider here is a real Decider implementation (not a mock of the proxy):
it refuses statements containing a marker word and records everything it was
asked, so the tests can check both what the client sees and what the proxy
vouched for.
"""

from __future__ import annotations

import asyncio
import threading

import asyncpg
import psycopg
import pytest

from proxy.decide import ALLOW, Decision, SessionInfo, Unit, deny
from tests.conftest import PASSWORDS
from tests.rawclient import SYNC, RawClient, bind, close, error_fields, execute, parse


class MarkerDecider:
    def __init__(self, marker: str = "forbidden") -> None:
        self.marker = marker
        self.seen: list[tuple[str | None, ...]] = []
        self.lock = threading.Lock()

    def decide(self, session: SessionInfo, unit: Unit) -> Decision:
        with self.lock:
            self.seen.append(tuple(s.sql for s in unit.statements))
        for statement in unit.statements:
            if statement.sql is None or self.marker in statement.sql.lower():
                return deny(f"test policy refuses this ({self.marker})", policy="test")
        return ALLOW


class ExplodingDecider:
    def decide(self, session: SessionInfo, unit: Unit) -> Decision:
        raise RuntimeError("boom")


@pytest.fixture
def guarded(start_proxy):
    decider = MarkerDecider()
    proxy = start_proxy(decider)
    proxy.decider = decider
    return proxy


def test_denied_simple_query_keeps_session_usable(guarded):
    r = guarded.psql("-v", "ON_ERROR_STOP=0", "-c", "SELECT 'forbidden'", "-c", "SELECT 2",
                     check=False)
    assert "test policy refuses this" in r.stderr
    assert r.stdout.strip() == "2"


def test_denied_statement_aborts_transaction_like_postgres(guarded, pg):
    pg.psql("DELETE FROM events WHERE payload = 'tx-deny'")
    script = """
    BEGIN;
    INSERT INTO events(payload) VALUES ('tx-deny');
    SELECT 'forbidden';
    SELECT 1;
    COMMIT;
    """
    r = guarded.psql("-v", "ON_ERROR_STOP=0", "-f", "-", input=script, check=False)
    assert "test policy refuses this" in r.stderr
    assert "current transaction is aborted" in r.stderr
    assert pg.psql("SELECT count(*) FROM events WHERE payload = 'tx-deny'").strip() == "0"


def test_denied_error_fields(guarded):
    c = RawClient(guarded.port)
    c.startup("alice", PASSWORDS["alice"])
    c.send(b"Q" + (4 + len(b"SELECT 'forbidden'\0")).to_bytes(4, "big") + b"SELECT 'forbidden'\0")
    msgs = c.read_until_ready()
    assert [k for k, _ in msgs] == ["E", "Z"]
    fields = error_fields(msgs[0][1])
    assert fields["C"] == "42501" and fields["S"] == "ERROR"
    assert msgs[1][1] == b"I"
    c.close()


def test_extended_denial_skips_to_sync(guarded):
    async def main():
        conn = await asyncpg.connect(host="127.0.0.1", port=guarded.port, user="alice",
                                     password=PASSWORDS["alice"], database="app", ssl=False)
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="test policy"):
                await conn.fetchval("SELECT $1::text || 'forbidden'", "x")
            assert await conn.fetchval("SELECT $1::int", 3) == 3
            async with conn.transaction():
                await conn.execute("SELECT 1")
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute("SELECT 'forbidden'")
                with pytest.raises(asyncpg.InFailedSQLTransactionError):
                    await conn.execute("SELECT 1")
        finally:
            await conn.close()

    asyncio.run(main())


def test_pipeline_with_a_denied_statement(guarded):
    with psycopg.connect(guarded.dsn("alice"), autocommit=True) as conn:
        with conn.pipeline() as pipe:
            first = conn.execute("SELECT 1")
            pipe.sync()
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT %s::text, 'forbidden'", ("a",))
                pipe.sync()
            last = conn.execute("SELECT 3")
        assert first.fetchone() == (1,)
        assert last.fetchone() == (3,)


def test_redefining_a_named_statement_cannot_smuggle_a_write(guarded, pg):
    """Parse s1 as DELETE (never executed), then 'redefine' it as SELECT: the
    server keeps the DELETE, so the proxy must not vouch for the SELECT."""
    pg.psql("CREATE TABLE IF NOT EXISTS victim(x int); TRUNCATE victim; "
            "INSERT INTO victim VALUES (1), (2); GRANT ALL ON victim TO pgv_scram")
    c = RawClient(guarded.port)
    c.startup("alice", PASSWORDS["alice"])
    c.send(parse("s1", "DELETE FROM victim") + SYNC)
    assert [k for k, _ in c.read_until_ready()] == ["1", "Z"]
    c.send(parse("s1", "SELECT 1") + SYNC)
    kinds = [k for k, _ in c.read_until_ready()]
    assert kinds == ["E", "Z"]  # 'prepared statement "s1" already exists'
    guarded.decider.marker = "delete"
    c.send(bind("", "s1") + execute() + SYNC)
    msgs = c.read_until_ready()
    assert msgs[0][0] == "E" and error_fields(msgs[0][1])["C"] == "42501"
    assert pg.psql("SELECT count(*) FROM victim").strip() == "2"
    # after Close the name really is free, and the new definition is believed
    c.send(close("S", "s1") + parse("s1", "SELECT 1") + SYNC)
    assert [k for k, _ in c.read_until_ready()] == ["3", "1", "Z"]
    c.send(bind("", "s1") + execute() + SYNC)
    assert [k for k, _ in c.read_until_ready()] == ["2", "D", "C", "Z"]
    c.close()


def test_decider_failure_fails_closed(start_proxy, pg):
    proxy = start_proxy(ExplodingDecider())
    pg.psql("DELETE FROM events WHERE payload = 'explode'")
    r = proxy.psql("-c", "INSERT INTO events(payload) VALUES ('explode')", check=False)
    assert "could not evaluate this statement" in r.stderr
    assert pg.psql("SELECT count(*) FROM events WHERE payload = 'explode'").strip() == "0"


def test_every_statement_reaches_the_decider(guarded):
    guarded.psql("-c", "SELECT 11", "-c", "SELECT 12")
    with psycopg.connect(guarded.dsn("alice"), autocommit=True) as conn:
        conn.execute("SELECT %s::int + 13", (0,))
    flat = [sql for unit in guarded.decider.seen for sql in unit]
    assert "SELECT 11" in flat and "SELECT 12" in flat
    assert any(sql and "+ 13" in sql for sql in flat)


def test_batch_without_sync_is_not_buffered_forever(guarded):
    """Megabytes of Parse/Bind/Execute with no Sync: the proxy decides and
    forwards at its buffer limit instead of growing without bound."""
    from proxy.client import BATCH_BUFFER_LIMIT

    c = RawClient(guarded.port)
    c.startup("alice", PASSWORDS["alice"])
    payload = "x" * 100_000
    one = parse("", f"SELECT '{payload}'") + bind("", "") + execute()
    count = BATCH_BUFFER_LIMIT // len(one) + 5
    c.send(one * count + SYNC)
    kinds = [k for k, _ in c.read_until_ready()]
    assert kinds.count("D") == count and kinds[-1] == "Z"
    assert guarded.server.sessions and all(
        len(s.batch_buf) == 0 for s in guarded.server.sessions)
    c.close()
