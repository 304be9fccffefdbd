"""PostgreSQL-only deployment details: least privilege, durable commits."""

from __future__ import annotations

from collections.abc import Iterator

import asyncpg
import pytest

from approvals.pg_store import PgStore
from approvals.store import open_store
from proxy.pgcluster import LocalPostgres
from tests.approvals.helpers import make_request


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalPostgres]:
    with LocalPostgres() as pg:
        yield pg


async def test_a_role_owning_a_precreated_schema_needs_nothing_else(cluster: LocalPostgres) -> None:
    cluster.create_role("vouch_owner", "owner-pw")
    cluster.psql("CREATE SCHEMA team_a AUTHORIZATION vouch_owner;")
    # no CREATE on the database, no superuser: only its own schema
    store = await open_store(cluster.dsn("vouch_owner", password="owner-pw") + "?schema=team_a")
    try:
        created = await store.create(make_request())
        assert await store.get(created.id) == created
        assert (await store.verify_audit()).ok
    finally:
        await store.close()


async def test_commits_are_durable_even_if_the_server_defaults_to_async_commit(
    cluster: LocalPostgres,
) -> None:
    cluster.psql("ALTER DATABASE postgres SET synchronous_commit = off;")
    store = PgStore(cluster.dsn(), schema="durable", min_size=1, max_size=1)
    try:
        await store.start()
        async with store._connection() as conn:  # the store's own session
            assert await conn.fetchval("SHOW synchronous_commit") == "on"
        plain = await asyncpg.connect(cluster.dsn())
        try:
            assert await plain.fetchval("SHOW synchronous_commit") == "off"
        finally:
            await plain.close()
    finally:
        await store.close()
        cluster.psql("ALTER DATABASE postgres RESET synchronous_commit;")
