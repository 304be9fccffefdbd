"""asyncpg and psycopg 3 through the real proxy to the real PostgreSQL."""

from __future__ import annotations

import asyncio
import io

import asyncpg
import psycopg
import pytest

from tests.conftest import PASSWORDS


def _asyncpg_connect(proxy, user="alice", **kw):
    return asyncpg.connect(host="127.0.0.1", port=proxy.port, user=user,
                           password=PASSWORDS[user], database="app", ssl=False, **kw)


def test_asyncpg_prepared_statements_and_types(proxy):
    async def main():
        conn = await _asyncpg_connect(proxy)
        try:
            stmt = await conn.prepare("SELECT id, owner, balance FROM accounts WHERE id = $1")
            rows = [await stmt.fetchrow(i) for i in (1, 2, 3)]
            assert [r["owner"] for r in rows] == ["owner1", "owner2", "owner3"]
            assert await conn.fetchval("SELECT $1::int + $2::int", 40, 2) == 42
            assert await conn.fetchval("SELECT $1::text", "héllo ✓") == "héllo ✓"
            async with conn.transaction():
                await conn.execute("INSERT INTO events(payload) VALUES ($1)", "asyncpg")
            assert await conn.fetchval(
                "SELECT count(*) FROM events WHERE payload = 'asyncpg'") >= 1
        finally:
            await conn.close()

    asyncio.run(main())


def test_asyncpg_copy_in_and_out(proxy):
    async def main():
        conn = await _asyncpg_connect(proxy)
        try:
            await conn.execute("CREATE TEMP TABLE c(id int, t text)")
            await conn.copy_records_to_table("c", records=[(i, f"r{i}") for i in range(5000)])
            assert await conn.fetchval("SELECT sum(id) FROM c") == sum(range(5000))
            buf = io.BytesIO()
            await conn.copy_from_query("SELECT * FROM c ORDER BY id", output=buf, format="csv")
            lines = buf.getvalue().decode().splitlines()
            assert len(lines) == 5000 and lines[0] == "0,r0"
        finally:
            await conn.close()

    asyncio.run(main())


def test_asyncpg_cancellation_by_timeout(proxy):
    async def main():
        conn = await _asyncpg_connect(proxy)
        try:
            with pytest.raises(asyncio.TimeoutError):
                await conn.execute("SELECT pg_sleep(30)", timeout=0.5)
            # the connection is still usable after the cancel
            assert await conn.fetchval("SELECT 5") == 5
        finally:
            await conn.close()

    asyncio.run(main())


def test_asyncpg_executemany_pipelined(proxy):
    async def main():
        conn = await _asyncpg_connect(proxy)
        try:
            await conn.execute("CREATE TEMP TABLE m(id int, v text)")
            await conn.executemany("INSERT INTO m VALUES ($1, $2)",
                                   [(i, str(i)) for i in range(2000)])
            assert await conn.fetchval("SELECT count(*) FROM m") == 2000
        finally:
            await conn.close()

    asyncio.run(main())


def test_asyncpg_server_error_and_recovery(proxy):
    async def main():
        conn = await _asyncpg_connect(proxy)
        try:
            with pytest.raises(asyncpg.UndefinedTableError):
                await conn.fetch("SELECT * FROM no_such_table")
            with pytest.raises(asyncpg.DivisionByZeroError):
                await conn.fetchval("SELECT 1 / $1::int", 0)
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()

    asyncio.run(main())


def _psycopg(proxy, user="alice", **kw):
    return psycopg.connect(proxy.dsn(user), **kw)


def test_psycopg_simple_and_extended(proxy):
    with _psycopg(proxy, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        row = conn.execute("SELECT owner FROM accounts WHERE id = %s", (7,)).fetchone()
        assert row == ("owner7",)
        cur = conn.cursor()
        cur.execute("SELECT %s::int * 2", (21,), prepare=True)
        assert cur.fetchone() == (42,)
        cur.execute("SELECT %s::int * 2", (50,), prepare=True)
        assert cur.fetchone() == (100,)
        # binary parameters and results
        cur = conn.cursor(binary=True)
        cur.execute("SELECT %b::bytea", (b"\x00\x01\xff",))
        assert cur.fetchone() == (b"\x00\x01\xff",)


def test_psycopg_pipeline_mode(proxy):
    with _psycopg(proxy) as conn:
        conn.execute("CREATE TEMP TABLE p(id int)")
        with conn.pipeline():
            cursors = [conn.execute("INSERT INTO p VALUES (%s) RETURNING id", (i,))
                       for i in range(50)]
            conn.execute("SELECT count(*) FROM p")
        assert [c.fetchone()[0] for c in cursors] == list(range(50))
        with conn.pipeline() as pipe:
            cur = conn.execute("SELECT 1")
            pipe.sync()
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("SELECT 1/0")
                pipe.sync()
        assert cur.fetchone() == (1,)
        conn.rollback()
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_psycopg_server_side_cursor(proxy):
    with _psycopg(proxy) as conn, conn.cursor(name="big") as cur:
        cur.itersize = 100
        cur.execute("SELECT g FROM generate_series(1, 10000) g")
        total = sum(row[0] for row in cur)
        assert total == sum(range(1, 10001))


def test_psycopg_copy(proxy):
    with _psycopg(proxy) as conn:
        conn.execute("CREATE TEMP TABLE cp(id int, t text)")
        with conn.cursor().copy("COPY cp FROM STDIN") as copy:
            for i in range(1000):
                copy.write_row((i, f"t{i}"))
        assert conn.execute("SELECT count(*) FROM cp").fetchone() == (1000,)
        with conn.cursor().copy("COPY (SELECT id FROM cp ORDER BY id) TO STDOUT") as copy:
            rows = [int(r[0]) for r in copy.rows()]
        assert rows == list(range(1000))


def test_psycopg_transactions(proxy, pg):
    with _psycopg(proxy) as conn:
        conn.execute("INSERT INTO events(payload) VALUES ('rolled back')")
        conn.rollback()
        conn.execute("INSERT INTO events(payload) VALUES ('committed')")
        conn.commit()
    assert pg.psql("SELECT count(*) FROM events WHERE payload = 'rolled back'").strip() == "0"
    assert int(pg.psql("SELECT count(*) FROM events WHERE payload = 'committed'")) >= 1
