"""Replicas hear each other's changes: NOTIFY from the PostgreSQL store, the listener, wake-ups.

Everything runs against the session's real PostgreSQL (the ``pg`` fixture);
"replicas" are separate stores (separate pools) on one schema.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from approvals import workflow
from approvals.pg_notify import APPLICATION_NAME, REQUEST, ChangeListener, change_channel, notify
from approvals.pg_store import PgStore
from approvals.service import ApprovalService
from approvals.store import split_pg_url
from tests.approvals.conftest import pg_dsn, throwaway_schema_url
from tests.approvals.helpers import DIRECTORY, T0, make_request

Heard = list[str]


@pytest.fixture
async def pg_url(pg: Any) -> AsyncIterator[str]:
    async with throwaway_schema_url(pg, "pgvouch_n") as url:
        yield url


@pytest.fixture
async def stores(pg_url: str) -> AsyncIterator[tuple[PgStore, PgStore]]:
    dsn, schema = split_pg_url(pg_url)
    a, b = PgStore(dsn, schema=schema), PgStore(dsn, schema=schema)
    await a.start()
    await b.start()
    yield a, b
    await a.close()
    await b.close()


@pytest.fixture
async def listening(stores: tuple[PgStore, PgStore]) -> AsyncIterator[tuple[ChangeListener, Heard]]:
    store = stores[0]
    heard: Heard = []
    listener = ChangeListener(store.dsn, store.channel, backoff=(0.1,))
    listener.on(REQUEST, heard.append)
    task = asyncio.create_task(listener.run())
    await asyncio.wait_for(listener.listening.wait(), 10)
    yield listener, heard
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def eventually(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_the_channel_belongs_to_the_schema() -> None:
    assert change_channel("pgvouch") == "pgvouch_changes"
    assert change_channel("team_a") != change_channel("team_b")
    assert len(change_channel("s" * 63)) == 63  # still a valid channel name


async def test_every_request_write_is_announced_on_commit(
    stores: tuple[PgStore, PgStore], listening: tuple[ChangeListener, Heard]
) -> None:
    _, heard = listening
    a, b = stores
    created = await b.create(make_request())
    await eventually(lambda: heard == [created.id])
    approved = workflow.vote(created, "bob", "approve", None, T0 + 1).request
    await a.update(approved, created.version)
    await eventually(lambda: heard == [created.id, created.id])


async def test_a_rolled_back_change_is_not_announced(
    stores: tuple[PgStore, PgStore], listening: tuple[ChangeListener, Heard]
) -> None:
    _, heard = listening
    store = stores[1]
    conn = await asyncpg.connect(store.dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        await notify(conn, store.channel, REQUEST, "rolled-back")
        await tx.rollback()
        async with conn.transaction():
            await notify(conn, store.channel, REQUEST, "committed")
    finally:
        await conn.close()
    await eventually(lambda: heard == ["committed"])
    await asyncio.sleep(0.2)
    assert heard == ["committed"]


async def test_dispatch_by_kind_survives_bad_handlers_and_unknown_payloads() -> None:
    listener = ChangeListener("postgresql://unused", "c")
    got: list[tuple[str, str]] = []

    def broken(_key: str) -> None:
        raise RuntimeError("boom")

    listener.on("request", broken)
    listener.on("request", lambda key: got.append(("request", key)))
    listener.on("approval_mode", lambda key: got.append(("approval_mode", key)))
    for payload in ("request:r-1", "approval_mode:prod-*", "grant:g-1", "no-kind", "request:"):
        listener.dispatch(payload)
    assert got == [("request", "r-1"), ("approval_mode", "prod-*"), ("request", "")]
    with pytest.raises(ValueError):
        listener.on("a:b", got.append)  # type: ignore[arg-type]


async def test_the_listener_reconnects_after_its_connection_is_killed(
    stores: tuple[PgStore, PgStore], pg: Any
) -> None:
    a, b = stores
    heard: Heard = []
    listened = 0

    def on_listening() -> None:
        nonlocal listened
        listened += 1

    listener = ChangeListener(a.dsn, a.channel, on_listening=on_listening, backoff=(0.1,))
    listener.on(REQUEST, heard.append)
    task = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(listener.listening.wait(), 10)
        admin = await asyncpg.connect(pg_dsn(pg))
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = $1 AND query LIKE 'LISTEN%' AND query LIKE $2",
                APPLICATION_NAME, f"%{a.channel}%")
        finally:
            await admin.close()
        assert killed == 1
        await eventually(lambda: listener.connections == 2 and listener.listening.is_set(), 10)
        assert listened == 2  # everyone re-reads after a gap in which changes went unheard
        created = await b.create(make_request())
        await eventually(lambda: heard == [created.id])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_hold_on_one_replica_wakes_when_another_replica_decides(
    stores: tuple[PgStore, PgStore],
) -> None:
    a, b = stores
    here, there = ApprovalService(a, DIRECTORY), ApprovalService(b, DIRECTORY)
    listener = ChangeListener(a.dsn, a.channel, on_listening=here.wake_all)
    listener.on(REQUEST, here.wake)
    task = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(listener.listening.wait(), 10)
        request = await here.create(make_request(now=time.time()))
        waiting = asyncio.create_task(here.wait_change(request.id, within=30))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        started = time.monotonic()
        await there.vote(request.id, "bob", "approve", None)
        await asyncio.wait_for(waiting, 5)
        assert time.monotonic() - started < 1.0  # NOTIFY, not the 30 s fallback
        assert not here._waiters  # the waiter list is cleaned up
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
