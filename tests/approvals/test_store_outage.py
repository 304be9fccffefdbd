"""When the store cannot be written, every call says so with StoreUnavailable (callers fail closed).

These need a database the test may break, so they are per backend: a SQLite
file locked by another process or in a place that cannot exist, and a
private PostgreSQL cluster that is stopped under the store.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from approvals import workflow
from approvals.pg_store import PgStore
from approvals.sqlite_store import SqliteStore
from approvals.store import Conflict, Store, StoreUnavailable, open_store
from proxy.pgcluster import LocalPostgres
from tests.approvals.conftest import RawDb, pg_dsn
from tests.approvals.helpers import T0, make_request

Call = Callable[[], Awaitable[Any]]


def reads(store: Store, request_id: str) -> list[Call]:
    return [
        lambda: store.get(request_id),
        lambda: store.list(),
        lambda: store.find_approved("0" * 64, T0),
        lambda: store.active_grants("alice", "prod-db", "app", T0),
        lambda: store.pending_due(T0),
        lambda: store.grants_due(T0),
        lambda: store.audit(),
        lambda: store.verify_audit(),
        lambda: store.list_deliveries(),
    ]


def writes(store: Store, request_id: str) -> list[Call]:
    request = make_request(request_id=request_id)
    return [
        lambda: store.create(make_request()),
        lambda: store.update(workflow.vote(request, "bob", "approve", None, T0 + 1).request, 0),
        lambda: store.append_audit({"type": "statement.allowed", "actor": "alice"}),
        lambda: store.append_audit_many([{"type": "statement.allowed", "actor": "alice"}]),
        lambda: store.enqueue_delivery("webhook", "http://127.0.0.1:9/", {}),
        lambda: store.claim_due_deliveries(T0),
        lambda: store.finish_delivery(1, True),
    ]


async def test_sqlite_in_a_place_that_cannot_exist(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StoreUnavailable, match="unable to open"):
        await open_store(f"sqlite:///{tmp_path / 'a-file' / 'store.db'}")
    with pytest.raises(StoreUnavailable):
        await open_store(f"sqlite:///{tmp_path / 'missing-dir' / 'store.db'}")


async def test_sqlite_locked_by_someone_else_fails_closed_then_heals(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = SqliteStore(path, busy_timeout=0.2)
    await store.start()
    created = await store.create(make_request())
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process holding the write lock too long
    try:
        for write in writes(store, created.id):
            with pytest.raises(StoreUnavailable, match="locked"):
                await write()
            for read in reads(store, created.id):  # WAL: readers are not blocked by a writer
                await read()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert await store.get(created.id) == created  # reconnects on the next call
    await store.close()


async def test_an_update_blocked_behind_another_writer_then_conflicts(store_url: str, raw_db: RawDb) -> None:
    """Real concurrency: our update waits on the database lock while another writer commits."""
    store = await open_store(store_url)
    try:
        created = await store.create(make_request())
        voted = workflow.vote(created, "bob", "approve", None, T0 + 1).request
        bump = f"UPDATE {{t}}requests SET version = version + 1 WHERE id = '{created.id}'"
        async with raw_db.holding(bump):
            pending = asyncio.create_task(store.update(voted, created.version))
            await asyncio.sleep(0.3)
            assert not pending.done()  # blocked on the other writer's lock
        with pytest.raises(Conflict):
            await pending
    finally:
        await store.close()


async def test_postgres_stopped_under_the_store() -> None:
    cluster = LocalPostgres().start()
    try:
        store = await open_store(cluster.dsn() + "?schema=outage")
        created = await store.create(make_request())
        assert await store.get(created.id) == created
    finally:
        cluster.stop()
    started = time.monotonic()
    for call in reads(store, created.id) + writes(store, created.id):
        with pytest.raises(StoreUnavailable):
            await call()
    assert time.monotonic() - started < 30
    await store.close()


async def test_postgres_that_is_not_there() -> None:
    cluster = LocalPostgres().start()
    dsn = cluster.dsn()
    cluster.stop()
    with pytest.raises(StoreUnavailable, match="cannot start"):
        await open_store(dsn)
    lazy = await open_store(dsn, connect=False)  # a proxy may start while its store is down
    with pytest.raises(StoreUnavailable):
        await lazy.get("R-00000")
    await lazy.close()


async def test_postgres_heals_after_its_connections_are_dropped(pg: Any) -> None:
    """A failover or restart drops every connection: at worst some calls fail closed, then it works."""
    admin = await asyncpg.connect(pg_dsn(pg))
    await admin.execute("DROP DATABASE IF EXISTS pgvouch_heal")
    await admin.execute("CREATE DATABASE pgvouch_heal")
    dsn = pg_dsn(pg, database="pgvouch_heal")
    store = PgStore(dsn, min_size=2, max_size=2)
    try:
        await store.start()
        created = await store.create(make_request())
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'pgvouch_heal'"
        )
        outcomes: list[object] = []
        for _ in range(4):
            try:
                outcomes.append(await store.get(created.id))
            except StoreUnavailable as exc:
                outcomes.append(exc)
        assert outcomes[2:] == [created, created]  # at worst one failure per dropped connection
    finally:
        await store.close()
        await admin.execute("DROP DATABASE IF EXISTS pgvouch_heal")
        await admin.close()
