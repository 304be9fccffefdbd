"""The store conformance suite: every test runs on SQLite and on real PostgreSQL.

Races use two stores opened on the same database (two connections; for
SQLite two threads) and ``asyncio.gather``, so the database, not the test,
decides who wins.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Awaitable, Callable
from fnmatch import fnmatchcase

import asyncpg
import pytest

from approvals import workflow
from approvals.audit import export, request_record
from approvals.model import Request, Status
from approvals.pg_store import PgStore
from approvals.sqlite_store import MIGRATIONS
from approvals.store import (
    Conflict,
    DeliveryStatus,
    Effects,
    NotFound,
    Outbound,
    Store,
    StoreUnavailable,
    open_store,
    split_pg_url,
    sqlite_path,
)
from approvals.workflow import Code, Outcome, WorkflowError
from tests.approvals.conftest import RawDb
from tests.approvals.helpers import DIRECTORY, HOUR, T0, StepDef, approve_all, make_grant, make_request

OpenMore = Callable[[], Awaitable[Store]]


def effects_of(outcome: Outcome) -> Effects:
    """What a service would write with a transition: audit records and a webhook per event."""
    return Effects(
        audit=[request_record(event, outcome.request) for event in outcome.events],
        deliveries=[
            Outbound("webhook", "http://127.0.0.1:9/hook", {"event": str(event.type), "id": event.request_id})
            for event in outcome.events
        ],
    )


async def transition(
    store: Store, request_id: str, step: Callable[[Request], Outcome]
) -> Request | WorkflowError:
    """Read, apply the workflow, compare-and-swap; re-read on Conflict (how callers use the store)."""
    while True:
        current = await store.get(request_id)
        assert current is not None
        try:
            outcome = step(current)
        except WorkflowError as refused:
            return refused
        try:
            return await store.update(outcome.request, current.version, effects=effects_of(outcome))
        except Conflict:
            continue


def approval_by(user: str) -> Callable[[Request], Outcome]:
    return lambda request: workflow.vote(request, user, "approve", None, T0 + 5)


# -- requests --------------------------------------------------------------------


async def test_create_and_get_round_trip(store: Store) -> None:
    request = make_request()
    stored = await store.create(request)
    assert stored == request
    assert await store.get(request.id) == request
    assert await store.get("R-NONE0") is None
    grant = await store.create(approve_all(make_grant(), "bob"))
    assert await store.get(grant.id) == grant


async def test_create_with_a_taken_id_gets_a_fresh_one(store: Store) -> None:
    first = await store.create(make_request(request_id="R-SAME0"))
    second = await store.create(make_request(request_id="R-SAME0", account="admin"))
    assert first.id == "R-SAME0"
    assert second.id != "R-SAME0"
    assert second.id.startswith("R-")
    fetched_first = await store.get("R-SAME0")
    fetched_second = await store.get(second.id)
    assert fetched_first is not None and fetched_first.account == "app"
    assert fetched_second is not None and fetched_second.account == "admin"


async def test_create_writes_its_effects_with_the_stored_id(store: Store) -> None:
    await store.create(make_request(request_id="R-TAKEN"))

    def created(request: Request) -> Effects:
        return Effects(audit=[request_record(e, request) for e in workflow.submitted_events(request)])

    stored = await store.create(make_request(request_id="R-TAKEN"), effects=created)
    events = await store.audit()
    assert [(e.type, e.request_id) for e in events] == [("request.created", stored.id)]
    assert stored.id != "R-TAKEN"


async def test_list_filters_newest_first(store: Store) -> None:
    resources = ["prod-db", "prod-dw", "staging-db", "prod-db-2", "Prod-db"]
    for index, resource in enumerate(resources):
        await store.create(make_request(resource=resource, now=T0 + index))
    everything = await store.list()
    assert [r.resource for r in everything] == list(reversed(resources))
    assert len(await store.list(limit=2)) == 2
    for glob in ["prod-*", "prod-d?", "*db", "[ps]*-db", "[!p]*", "Prod-*", "prod-db", "*", "x*"]:
        found = {r.resource for r in await store.list(resource_glob=glob)}
        assert found == {r for r in resources if fnmatchcase(r, glob)}, glob
    approved = await store.create(approve_all(make_request(now=T0 + 10), "bob"))
    assert [r.id for r in await store.list(status="approved")] == [approved.id]
    assert [r.id for r in await store.list(status=Status.APPROVED, resource_glob="staging*")] == []
    assert len(await store.list(status="pending", resource_glob="prod-*")) == 3


async def test_update_is_compare_and_swap(store: Store) -> None:
    created = await store.create(make_request())
    voted = workflow.vote(created, "bob", "approve", None, T0 + 1).request
    stored = await store.update(voted, expected_version=0)
    assert stored.version == 1
    assert await store.get(created.id) == stored
    stale = workflow.vote(created, "carol", "deny", "no", T0 + 2).request
    with pytest.raises(Conflict):
        await store.update(stale, expected_version=0)
    fetched = await store.get(created.id)
    assert fetched is not None and fetched.status is Status.APPROVED
    ghost = make_request(request_id="R-GH0ST")
    with pytest.raises(NotFound):
        await store.update(ghost, expected_version=0)


async def test_two_racing_votes_cannot_both_count(store: Store, open_more: OpenMore) -> None:
    other = await open_more()
    for _ in range(10):
        created = await store.create(make_request())  # one approval of group:dba needed
        seen_by_a, seen_by_b = await store.get(created.id), await other.get(created.id)
        assert seen_by_a is not None and seen_by_b is not None
        by_bob = workflow.vote(seen_by_a, "bob", "approve", None, T0 + 1)
        by_carol = workflow.vote(seen_by_b, "carol", "deny", "no", T0 + 1)
        results = await asyncio.gather(
            store.update(by_bob.request, seen_by_a.version, effects=effects_of(by_bob)),
            other.update(by_carol.request, seen_by_b.version, effects=effects_of(by_carol)),
            return_exceptions=True,
        )
        winners = [r for r in results if isinstance(r, Request)]
        assert len(winners) == 1
        assert sum(isinstance(r, Conflict) for r in results) == 1
        final = await store.get(created.id)
        assert final == winners[0]
        assert final is not None and len(final.votes) == 1
    votes = [e for e in await store.audit() if e.type == "request.voted"]
    assert len(votes) == 10  # the loser's audit rows were rolled back with its update


async def test_concurrent_voters_reach_quorum_exactly(store: Store, open_more: OpenMore) -> None:
    directory = {**DIRECTORY, "gina": ("dba",), "hank": ("dba",)}
    others = [await open_more() for _ in range(2)]
    stores = [store, *others]
    created = await store.create(
        make_request(steps=[StepDef("3 DBAs", ("group:dba",), 3)], directory=directory)
    )
    voters = ["bob", "carol", "frank", "gina", "hank"]
    results = await asyncio.gather(
        *(transition(stores[i % len(stores)], created.id, approval_by(user)) for i, user in enumerate(voters))
    )
    final = await store.get(created.id)
    assert final is not None
    assert final.status is Status.APPROVED
    assert len(final.votes) == 3
    assert final.version == 3
    refusals = [r for r in results if isinstance(r, WorkflowError)]
    assert len(refusals) == 2
    assert {r.code for r in refusals} == {Code.NOT_PENDING}
    assert [e.type for e in await store.audit()].count("request.approved") == 1


async def test_expiry_happens_exactly_once_across_replicas(store: Store, open_more: OpenMore) -> None:
    other = await open_more()
    ids = [(await store.create(make_request(now=T0 + i, expires_after=HOUR))).id for i in range(8)]
    fresh = await store.create(make_request(now=T0 + HOUR, expires_after=HOUR))
    now = T0 + HOUR + 30
    assert {r.id for r in await store.pending_due(now)} == set(ids)

    async def sweep(replica: Store) -> int:
        expired = 0
        for request in await replica.pending_due(now):
            outcome = workflow.expire(request, now)
            try:
                await replica.update(outcome.request, request.version, effects=effects_of(outcome))
                expired += 1
            except Conflict:
                pass
        return expired

    counts = await asyncio.gather(sweep(store), sweep(other), sweep(store), sweep(other))
    assert sum(counts) == 8
    for request_id in ids:
        request = await store.get(request_id)
        assert request is not None and request.status is Status.EXPIRED
    assert [e.type for e in await store.audit()].count("request.expired") == 8
    assert len(await store.list_deliveries()) == 8
    still_pending = await store.get(fresh.id)
    assert still_pending is not None and still_pending.status is Status.PENDING
    assert await store.pending_due(now) == []


async def test_effects_are_atomic_with_the_update(store: Store) -> None:
    created = await store.create(make_request())
    outcome = workflow.vote(created, "bob", "approve", None, T0 + 1)
    broken = Effects(audit=[{"type": "request.voted"}], deliveries=[Outbound("webhook", "x", {})])
    with pytest.raises(ValueError, match="actor"):
        await store.update(outcome.request, 0, effects=broken)
    assert await store.get(created.id) == created
    assert await store.list_deliveries() == []
    assert await store.audit() == []
    with pytest.raises(ValueError):
        await store.create(make_request(), effects=lambda r: broken)
    assert len(await store.list()) == 1


async def test_find_approved(store: Store) -> None:
    pending = await store.create(make_request())
    assert await store.find_approved(pending.fingerprint, T0 + 1) is None
    approved = await store.update(approve_all(pending, "bob", now=T0 + 60), 0)
    assert approved.approved_until == T0 + 60 + HOUR
    assert await store.find_approved(approved.fingerprint, T0 + 61) == approved
    assert await store.find_approved(approved.fingerprint, T0 + 60 + HOUR) is None  # lapsed
    assert await store.find_approved("0" * 64, T0 + 61) is None
    claimed = await store.update(workflow.consume(approved, T0 + 62).request, approved.version)
    assert await store.find_approved(approved.fingerprint, T0 + 63) is None  # runs once
    assert claimed.status is Status.EXECUTING
    grant = approve_all(make_grant(), "bob")
    await store.create(grant)
    assert await store.find_approved(grant.fingerprint, T0 + 61) is None  # grants are not statements


async def test_active_grants(store: Store) -> None:
    grant = await store.create(approve_all(make_grant(duration=HOUR), "bob", now=T0 + 60))
    await store.create(make_grant())  # pending
    await store.create(approve_all(make_grant(requester="dave"), "bob"))
    await store.create(approve_all(make_request(), "bob"))  # a statement
    assert await store.active_grants("alice", "prod-db", "app", T0 + 61) == [grant]
    assert await store.active_grants("alice", "prod-db", "app", T0 + 60 + HOUR) == []
    assert await store.active_grants("alice", "prod-db", "admin", T0 + 61) == []
    revoked = workflow.revoke(grant, "bob", T0 + 70).request
    await store.update(revoked, grant.version)
    assert await store.active_grants("alice", "prod-db", "app", T0 + 71) == []


# -- audit -------------------------------------------------------------------------


async def fill_audit(store: Store, count: int) -> None:
    for index in range(count):
        await store.append_audit(
            {"type": "statement.allowed", "actor": "alice", "at": T0 + index, "sql": f"SELECT {index}"}
        )


async def test_audit_append_query_and_verify(store: Store) -> None:
    first = await store.append_audit({"type": "policy.reloaded", "actor": "system", "at": T0, "files": ["a"]})
    assert (first.id, first.type, first.actor, first.data) == (
        1,
        "policy.reloaded",
        "system",
        {"files": ["a"]},
    )
    assert first.prev_hash == "0" * 64
    batch = await store.append_audit_many(
        [
            {"type": "statement.allowed", "actor": "bob", "at": T0 + i, "request_id": "R-1"}
            for i in range(1, 4)
        ]
    )
    assert [e.id for e in batch] == [2, 3, 4]
    assert batch[0].prev_hash == first.hash
    assert await store.audit() == [first, *batch]
    assert [e.id for e in await store.audit(since=T0 + 2)] == [3, 4]
    assert [e.id for e in await store.audit(limit=2, after_id=1)] == [2, 3]
    ok, bad, message = await store.verify_audit()
    assert (ok, bad) == (True, None)
    assert "4 events verified" in message
    lines = [line async for line in export(store, since=T0 + 1)]
    assert [json.loads(line)["id"] for line in lines] == [2, 3, 4]
    assert all(line.endswith("\n") for line in lines)
    assert json.loads(lines[0])["hash"] == batch[0].hash


async def test_concurrent_appends_never_fork_the_chain(store: Store, open_more: OpenMore) -> None:
    other = await open_more()
    await asyncio.gather(
        *(
            (store if i % 2 else other).append_audit(
                {"type": "statement.allowed", "actor": f"u{i}", "at": T0}
            )
            for i in range(40)
        )
    )
    events = await store.audit()
    assert [e.id for e in events] == list(range(1, 41))
    assert (await other.verify_audit()).ok


async def test_the_log_refuses_updates_and_deletes(store: Store, raw_db: RawDb) -> None:
    await fill_audit(store, 2)
    for sql in ["UPDATE {t}audit_events SET actor = 'mallory' WHERE id = 1", "DELETE FROM {t}audit_events"]:
        with pytest.raises((sqlite3.DatabaseError, asyncpg.PostgresError), match="append-only"):
            await raw_db.execute(sql, bypass_triggers=False)
    assert (await store.verify_audit()).ok


@pytest.mark.parametrize(
    ("tamper", "first_bad", "words"),
    [
        ("UPDATE {t}audit_events SET actor = 'mallory' WHERE id = 3", 3, "modified"),
        ('UPDATE {t}audit_events SET data = \'{"sql":"SELECT 99"}\' WHERE id = 2', 2, "modified"),
        ("UPDATE {t}audit_events SET at = at + 1 WHERE id = 4", 4, "modified"),
        ("DELETE FROM {t}audit_events WHERE id = 2", 2, "missing"),
        ("DELETE FROM {t}audit_events WHERE id >= 4", 4, "missing at the end"),
        (
            "UPDATE {t}audit_events SET id = -2 WHERE id = 2; "
            "UPDATE {t}audit_events SET id = 2 WHERE id = 3; "
            "UPDATE {t}audit_events SET id = 3 WHERE id = -2",
            2,
            "",
        ),
    ],
    ids=["edit-actor", "edit-data", "edit-time", "delete-middle", "delete-tail", "reorder"],
)
async def test_verify_detects_tampering(
    store: Store, raw_db: RawDb, tamper: str, first_bad: int, words: str
) -> None:
    await fill_audit(store, 5)
    assert (await store.verify_audit()).ok
    await raw_db.execute(tamper)
    ok, bad, message = await store.verify_audit()
    assert (ok, bad) == (False, first_bad), message
    assert words in message


# -- deliveries ------------------------------------------------------------------------


async def test_delivery_lifecycle(store: Store) -> None:
    delivery = await store.enqueue_delivery("webhook", "http://127.0.0.1:9/a", {"event": "x"}, now=T0)
    assert (delivery.status, delivery.attempts, delivery.next_attempt_at) == (DeliveryStatus.PENDING, 0, T0)
    assert await store.claim_due_deliveries(T0 - 1) == []  # not due yet
    [claimed] = await store.claim_due_deliveries(T0, lease_seconds=30)
    assert (claimed.id, claimed.status, claimed.attempts, claimed.lease_until) == (
        delivery.id,
        DeliveryStatus.CLAIMED,
        1,
        T0 + 30,
    )
    assert claimed.payload == {"event": "x"}
    assert await store.claim_due_deliveries(T0 + 10) == []  # leased
    assert await store.finish_delivery(claimed.id, False, "HTTP 503", T0 + 60, now=T0 + 1, attempt=1)
    assert await store.claim_due_deliveries(T0 + 59) == []  # backing off
    [again] = await store.claim_due_deliveries(T0 + 60, lease_seconds=30)
    assert (again.attempts, again.last_error) == (2, "HTTP 503")
    assert not await store.finish_delivery(again.id, True, attempt=1)  # a stale claim
    assert await store.finish_delivery(again.id, True, now=T0 + 61, attempt=2)
    [done] = await store.list_deliveries()
    assert (done.status, done.delivered_at, done.lease_until) == (DeliveryStatus.DELIVERED, T0 + 61, None)
    assert not await store.finish_delivery(done.id, True)  # not claimed any more
    assert await store.claim_due_deliveries(T0 + 10_000) == []


async def test_dead_deliveries_and_expired_leases(store: Store) -> None:
    first = await store.enqueue_delivery("email", "bob@example.com", {"subject": "review"}, now=T0)
    second = await store.enqueue_delivery("slack", "#dba", {"text": "hi"}, now=T0 + 1)
    claims = await store.claim_due_deliveries(T0 + 5, lease_seconds=10)
    assert [c.id for c in claims] == [first.id, second.id]
    assert await store.finish_delivery(first.id, False, "550 no such user", None, now=T0 + 6)
    # the claimer of `second` died: its lease runs out and another worker gets it
    [reclaimed] = await store.claim_due_deliveries(T0 + 15)
    assert (reclaimed.id, reclaimed.attempts) == (second.id, 2)
    statuses = {d.id: d.status for d in await store.list_deliveries()}
    assert statuses == {first.id: DeliveryStatus.DEAD, second.id: DeliveryStatus.CLAIMED}
    assert [d.id for d in await store.list_deliveries(status="dead")] == [first.id]
    assert [d.id for d in await store.list_deliveries(limit=1)] == [second.id]  # newest first


async def test_each_delivery_is_claimed_by_exactly_one_worker(store: Store, open_more: OpenMore) -> None:
    other = await open_more()
    for index in range(60):
        await store.enqueue_delivery("webhook", "http://127.0.0.1:9/", {"n": index}, now=T0)

    async def worker(replica: Store) -> list[int]:
        mine: list[int] = []
        while batch := await replica.claim_due_deliveries(T0 + 1, limit=4, lease_seconds=600):
            mine.extend(d.id for d in batch)
            await asyncio.sleep(0)
        return mine

    claimed = await asyncio.gather(worker(store), worker(other), worker(store), worker(other))
    every = [delivery_id for mine in claimed for delivery_id in mine]
    assert len(every) == 60
    assert len(set(every)) == 60
    assert sum(1 for mine in claimed if mine) >= 2  # they really competed


# -- durability ---------------------------------------------------------------------------


async def test_nothing_is_lost_across_a_restart(store_url: str, raw_db: RawDb) -> None:
    first = await open_store(store_url)
    pending = await first.create(make_request())
    created = await first.create(make_request(account="admin"))
    outcome = workflow.vote(created, "bob", "approve", "ok", T0 + 60)
    approved = await first.update(outcome.request, 0, effects=effects_of(outcome))
    await first.enqueue_delivery("webhook", "http://127.0.0.1:9/", {"n": 1}, now=T0)
    await first.close()

    second = await open_store(store_url)  # migrations run again: nothing changes
    try:
        assert await second.get(pending.id) == pending
        assert await second.get(approved.id) == approved
        assert await second.find_approved(approved.fingerprint, T0 + 61) == approved
        assert [e.type for e in await second.audit()] == [
            "request.voted",
            "request.step_completed",
            "request.approved",
        ]
        assert (await second.verify_audit()).ok
        assert len(await second.list_deliveries()) == 4
        assert await raw_db.fetchval("SELECT count(*) FROM {t}schema_migrations") == len(MIGRATIONS)
        await second.append_audit({"type": "x", "actor": "system"})
        assert (await second.verify_audit()).ok
    finally:
        await second.close()


async def test_a_closed_store_is_unavailable(store_url: str) -> None:
    closed = await open_store(store_url)
    await closed.close()
    with pytest.raises(StoreUnavailable):
        await closed.get("R-00000")


async def test_simultaneous_first_starts_migrate_once(store_url: str, raw_db: RawDb) -> None:
    stores = await asyncio.gather(*(open_store(store_url) for _ in range(3)))
    try:
        assert await raw_db.fetchval("SELECT count(*) FROM {t}schema_migrations") == len(MIGRATIONS)
        await stores[0].append_audit({"type": "x", "actor": "system"})
        assert (await stores[2].verify_audit()).ok
    finally:
        for opened in stores:
            await opened.close()


async def test_a_store_newer_than_the_code_is_refused(store: Store, store_url: str, raw_db: RawDb) -> None:
    columns = "(version, applied_at) VALUES (99, 0)" if raw_db.is_sqlite else "(version) VALUES (99)"
    await raw_db.execute(f"INSERT INTO {{t}}schema_migrations {columns}")
    with pytest.raises(StoreUnavailable, match="upgrade pgvouch"):
        await open_store(store_url)


# -- URLs ----------------------------------------------------------------------------------


async def test_store_urls() -> None:
    assert sqlite_path("sqlite:///pgvouch.db") == "pgvouch.db"  # relative to the working directory
    assert sqlite_path("sqlite:////var/lib/pgvouch/store.db") == "/var/lib/pgvouch/store.db"
    for bad in ("sqlite://pgvouch.db", "sqlite:///"):
        with pytest.raises(ValueError, match="sqlite:///path"):
            sqlite_path(bad)
    assert split_pg_url("postgresql://u:p@db:5432/app?schema=team_a&sslmode=require") == (
        "postgresql://u:p@db:5432/app?sslmode=require",
        "team_a",
    )
    assert split_pg_url("postgres://db/app") == ("postgres://db/app", "pgvouch")
    with pytest.raises(ValueError, match="unsupported store URL"):
        await open_store("mysql://db/app")
    with pytest.raises(ValueError, match="lowercase SQL identifier"):
        PgStore("postgresql://db/app", schema='x"; DROP TABLE t; --')


async def test_find_pending(store: Store) -> None:
    pending = await store.create(make_request(expires_after=HOUR))
    assert await store.find_pending(pending.fingerprint, T0 + 1) == pending
    assert await store.find_pending(pending.fingerprint, T0 + HOUR) is None  # its time is up
    assert await store.find_pending("0" * 64, T0 + 1) is None
    await store.update(workflow.cancel(pending, "alice", T0 + 2).request, pending.version)
    assert await store.find_pending(pending.fingerprint, T0 + 3) is None
