"""Store fixtures for the approvals tests.

``store_url`` is parametrized over SQLite (a fresh file) and PostgreSQL (a
fresh schema in the session's server, the ``pg`` fixture of
``tests/conftest.py``), so every test that uses it is the conformance suite
for both backends. ``raw_db`` runs SQL behind the store's back (tampering).
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest

from approvals.store import Store, open_store, split_pg_url, sqlite_path


def pg_dsn(pg: Any, database: str = "postgres") -> str:
    """A superuser DSN for the session's PostgreSQL (the ``pg`` fixture)."""
    if pg.cluster is not None:
        return str(pg.cluster.dsn(database=database))
    auth = quote(pg.superuser, safe="")
    if pg.superuser_password:
        auth += ":" + quote(pg.superuser_password, safe="")
    return f"postgresql://{auth}@{pg.host}:{pg.port}/{quote(database, safe='')}"


@pytest.fixture(params=["sqlite", "postgres"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    async with throwaway_schema_url(request.getfixturevalue("pg"), "pgvouch_t") as url:
        yield url


@asynccontextmanager
async def throwaway_schema_url(pg: Any, prefix: str) -> AsyncIterator[str]:
    """A PostgreSQL store URL with a fresh schema, dropped afterwards."""
    dsn = pg_dsn(pg)
    schema = f"{prefix}{uuid.uuid4().hex[:12]}"
    yield f"{dsn}?schema={schema}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened = await open_store(store_url)
    yield opened
    await opened.close()


@pytest.fixture
async def open_more(store_url: str) -> AsyncIterator[Callable[[], Awaitable[Store]]]:
    """Open further stores on the same database (other connections, "replicas")."""
    opened: list[Store] = []

    async def more() -> Store:
        extra = await open_store(store_url)
        opened.append(extra)
        return extra

    yield more
    for extra in opened:
        await extra.close()


class RawDb:
    """SQL on the store's tables behind its back; ``{t}`` is the table prefix."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite:")

    async def execute(self, sql: str, *, bypass_triggers: bool = True) -> None:
        if self.is_sqlite:
            conn = sqlite3.connect(sqlite_path(self.url), isolation_level=None)
            try:
                if bypass_triggers:
                    conn.execute("DROP TRIGGER IF EXISTS audit_events_no_update")
                    conn.execute("DROP TRIGGER IF EXISTS audit_events_no_delete")
                conn.executescript(sql.replace("{t}", ""))
            finally:
                conn.close()
            return
        dsn, schema = split_pg_url(self.url)
        pg_conn = await asyncpg.connect(dsn)
        try:
            if bypass_triggers:
                await pg_conn.execute("SET session_replication_role = replica")
            await pg_conn.execute(sql.replace("{t}", f'"{schema}".'))
        finally:
            await pg_conn.close()

    @asynccontextmanager
    async def holding(self, sql: str) -> AsyncIterator[None]:
        """Run ``sql`` in a write transaction that stays open (holding its locks) until exit."""
        if self.is_sqlite:
            conn = sqlite3.connect(sqlite_path(self.url), isolation_level=None)
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(sql.replace("{t}", ""))
                yield
                conn.execute("COMMIT")
            finally:
                conn.close()
            return
        dsn, schema = split_pg_url(self.url)
        pg_conn = await asyncpg.connect(dsn)
        try:
            async with pg_conn.transaction():
                await pg_conn.execute(sql.replace("{t}", f'"{schema}".'))
                yield
        finally:
            await pg_conn.close()

    async def fetchval(self, sql: str) -> Any:
        if self.is_sqlite:
            conn = sqlite3.connect(sqlite_path(self.url), isolation_level=None)
            try:
                row = conn.execute(sql.replace("{t}", "")).fetchone()
                return None if row is None else row[0]
            finally:
                conn.close()
        dsn, schema = split_pg_url(self.url)
        pg_conn = await asyncpg.connect(dsn)
        try:
            return await pg_conn.fetchval(sql.replace("{t}", f'"{schema}".'))
        finally:
            await pg_conn.close()


@pytest.fixture
def raw_db(store_url: str) -> Iterator[RawDb]:
    yield RawDb(store_url)
