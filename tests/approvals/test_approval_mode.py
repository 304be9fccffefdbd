"""Break-glass (approval mode) in the store and the service, on SQLite and on real PostgreSQL.

The ``store`` fixture is parametrized over both backends (``tests/approvals/conftest.py``),
so these are conformance tests of the mode table: its writes are atomic with their
audit event and announcement, it survives a reopen, and a replica sees it at once.
The REST endpoints are tested through the real API on 127.0.0.1 (``running_api``),
every answer checked against the served OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from approvals import pg_store, sqlite_store
from approvals.approval_mode import (
    MODE_OFF,
    MODE_ON,
    ApprovalModeError,
    ApprovalModes,
    off_for,
)
from approvals.model import Status
from approvals.service import ApprovalService
from approvals.store import ApprovalMode, Effects, Store, open_store
from config.settings import User
from tests.approvals.api_harness import ApiEnv, running_api
from tests.approvals.helpers import DIRECTORY, T0, make_grant, make_request

OpenMore = Callable[[], Awaitable[Store]]
HOOK = "http://127.0.0.1:9/hook"
OWNER = User("frank", ("dba", "developers"), roles=("owner",))
DBA = User("bob", ("dba",))


def service_on(store: Store) -> ApprovalService:
    return ApprovalService(store, DIRECTORY, webhooks=[(HOOK, ("request.created",))],
                           clock=lambda: T0 + 60)


# -- the store -----------------------------------------------------------------------------


def test_both_backends_have_the_same_migrations() -> None:
    assert len(sqlite_store.MIGRATIONS) == len(pg_store.MIGRATIONS) >= 2


async def test_a_mode_is_written_with_its_audit_event_and_deliveries(store: Store) -> None:
    assert await store.approval_modes() == []
    off = ApprovalMode("prod-*", False, "incident 4711", "frank", T0)
    effects = Effects(audit=[{"type": MODE_OFF, "actor": "frank", "at": T0, "resources": "prod-*"}])
    assert await store.set_approval_mode(off, effects=effects) == off
    other = ApprovalMode("dev-*", True, None, "frank", T0 + 1)
    await store.set_approval_mode(other, effects=Effects())
    assert await store.approval_modes() == [other, off]  # by glob
    on = ApprovalMode("prod-*", True, "fixed", "carol", T0 + 2)
    await store.set_approval_mode(on, effects=Effects())
    assert await store.approval_modes() == [other, on]  # one current mode per glob
    [event] = await store.audit()
    assert (event.type, event.actor, event.data["resources"]) == (MODE_OFF, "frank", "prod-*")


async def test_a_mode_whose_audit_event_fails_is_not_written(store: Store) -> None:
    off = ApprovalMode("prod-*", False, "incident", "frank", T0)
    broken = Effects(audit=[{"type": MODE_OFF, "actor": ""}])  # no actor: refused by the audit log
    with pytest.raises(ValueError):
        await store.set_approval_mode(off, effects=broken)
    assert await store.approval_modes() == []
    assert await store.audit() == []


async def test_the_mode_survives_a_reopen_and_replicas_see_it(store: Store, store_url: str,
                                                               open_more: OpenMore) -> None:
    replica = await open_more()
    await store.set_approval_mode(ApprovalMode("prod-*", False, "incident", "frank", T0),
                                  effects=Effects())
    assert off_for(await replica.approval_modes(), "prod-db") is not None
    await store.close()
    reopened = await open_store(store_url)
    try:
        [mode] = await reopened.approval_modes()
        assert (mode.glob, mode.enabled, mode.reason, mode.actor, mode.changed_at) == (
            "prod-*", False, "incident", "frank", T0)
    finally:
        await reopened.close()


def test_off_for_matches_globs_case_sensitively() -> None:
    modes = [ApprovalMode("prod-*", False, "a", "frank", T0 + 5),
             ApprovalMode("prod-db", False, "b", "frank", T0),
             ApprovalMode("dev-*", True, None, "frank", T0)]
    found = off_for(modes, "prod-db")
    assert found is not None and found.glob == "prod-db"  # the earliest switched off
    assert off_for(modes, "dev-1") is None  # on
    assert off_for(modes, "PROD-db") is None
    assert off_for(modes, "staging") is None


# -- the service ---------------------------------------------------------------------------


async def test_only_owners_switch_and_off_needs_a_reason(store: Store) -> None:
    modes = ApprovalModes(service_on(store))
    with pytest.raises(ApprovalModeError) as info:
        await modes.set_approval_mode(DBA, "prod-*", False, "incident")
    assert info.value.code == "not_owner"
    for reason in (None, "", "   "):
        with pytest.raises(ApprovalModeError) as info:
            await modes.set_approval_mode(OWNER, "prod-*", False, reason)
        assert info.value.code == "bad_request" and "reason" in info.value.message
    for glob in ("", "prod *", "x" * 201):
        with pytest.raises(ApprovalModeError) as info:
            await modes.set_approval_mode(OWNER, glob, False, "incident")
        assert info.value.code == "bad_request"
    with pytest.raises(ApprovalModeError) as info:
        await modes.set_approval_mode(OWNER, "prod-*", True, None)  # never switched off
    assert info.value.code == "not_off"
    assert await store.approval_modes() == [] and await store.audit() == []
    assert await store.list_deliveries() == []


async def test_switching_off_expires_pending_requests_and_announces(store: Store) -> None:
    service = service_on(store)
    statement = await service.create(make_request(resource="prod-db"))
    grant = await service.create(make_grant())  # on prod-db too
    elsewhere = await service.create(make_request(resource="staging", requester="alice"))
    approved = await service.create(make_request(resource="prod-db", requester="dave"))
    await service.vote(approved.id, "bob", "approve", None)
    created = len(await store.list_deliveries())

    change = await ApprovalModes(service).set_approval_mode(OWNER, "prod-*", False, "incident 4711")

    assert sorted(change.expired) == sorted([statement.id, grant.id])
    assert (change.mode.glob, change.mode.enabled, change.mode.actor) == ("prod-*", False, "frank")
    for request_id in (statement.id, grant.id):
        expired = await store.get(request_id)
        assert expired is not None and expired.status is Status.EXPIRED
        assert expired.note == "approvals were switched off for prod-* by frank: incident 4711"
    assert (await store.get(elsewhere.id)).status is Status.PENDING  # type: ignore[union-attr]
    assert (await store.get(approved.id)).status is Status.APPROVED  # type: ignore[union-attr]
    events = await store.audit()
    [switched] = [e for e in events if e.type == MODE_OFF]
    assert (switched.actor, switched.data) == (
        "frank", {"resources": "prod-*", "enabled": False, "reason": "incident 4711"})
    expiries = [e for e in events if e.type == "request.expired"]
    assert {e.request_id for e in expiries} == {statement.id, grant.id}
    assert all(e.actor == "frank" for e in expiries)
    # the announcement goes to every webhook, whatever its events filter
    announced = [d for d in await store.list_deliveries() if d.payload.get("event") == MODE_OFF]
    assert [(d.channel, d.target) for d in announced] == [("webhook", HOOK)]
    assert announced[0].payload["data"]["reason"] == "incident 4711"
    assert len(await store.list_deliveries()) == created + 1
    assert (await ApprovalModes(service).off_for("prod-db")) == change.mode
    assert (await ApprovalModes(service).off_for("staging")) is None


async def test_switching_back_on_is_audited_and_announced(store: Store) -> None:
    service = service_on(store)
    modes = ApprovalModes(service)
    await modes.set_approval_mode(OWNER, "prod-*", False, "incident")
    change = await modes.set_approval_mode(OWNER, "prod-*", True, None)
    assert change.expired == () and change.mode.enabled
    assert await modes.off_for("prod-db") is None
    [event] = [e for e in await store.audit() if e.type == MODE_ON]
    assert (event.actor, event.data["resources"], event.data["reason"]) == ("frank", "prod-*", None)
    events = [d.payload["event"] for d in await store.list_deliveries()]
    assert sorted(events) == [MODE_OFF, MODE_ON]
    with pytest.raises(ApprovalModeError) as info:
        await modes.set_approval_mode(OWNER, "prod-*", True, None)  # already on
    assert info.value.code == "not_off"


# -- the REST API ----------------------------------------------------------------------------


@pytest.fixture
async def env(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with running_api(tmp_path) as running:
        yield running


async def test_the_api_switches_for_owners_only(env: ApiEnv) -> None:
    pending = await env.submit(resource="prod-db")
    body = {"resources": "prod-*", "enabled": False, "reason": "incident 4711"}
    refused = await env.call("POST", "/approval-mode", user="bob", body=body)
    assert (refused.status, refused.code) == (403, "not_owner")
    missing = await env.call("POST", "/approval-mode", user="frank",
                             body={"resources": "prod-*", "enabled": False})
    assert (missing.status, missing.code) == (400, "bad_request")
    assert "reason" in missing.body["error"]["message"]
    for bad in ({"resources": "prod-*", "enabled": "no", "reason": "x"},
                {"resources": 7, "enabled": False, "reason": "x"},
                {"resources": "prod-*", "enabled": False, "reason": 1},
                {"resources": "prod-*", "enabled": False, "reason": "x", "extra": 1}):
        reply = await env.call("POST", "/approval-mode", user="frank", body=bad)
        assert (reply.status, reply.code) == (400, "bad_request"), bad
    assert (await env.call("POST", "/approval-mode", body=body)).status == 401
    assert (await env.call("GET", "/approval-mode", user="bob")).body == {"modes": []}

    off = await env.call("POST", "/approval-mode", user="frank", body=body)
    assert off.status == 200
    assert off.body["expired"] == [pending.id]
    assert off.body["mode"] == {"resources": "prod-*", "enabled": False, "reason": "incident 4711",
                                "changed_by": "frank", "changed_at": env.clock()}
    listed = await env.call("GET", "/approval-mode", user="alice")
    assert listed.body == {"modes": [off.body["mode"]]}
    again = await env.call("GET", f"/requests/{pending.id}", user="bob")
    assert again.body["status"] == "expired"

    on = await env.call("POST", "/approval-mode", user="frank",
                        body={"resources": "prod-*", "enabled": True})
    assert (on.status, on.body["mode"]["enabled"], on.body["expired"]) == (200, True, [])
    twice = await env.call("POST", "/approval-mode", user="frank",
                           body={"resources": "prod-*", "enabled": True})
    assert (twice.status, twice.code) == (409, "not_off")
    audit = await env.call("GET", "/audit", user="bob")
    types = [e["type"] for e in audit.body["events"]]
    assert types.count(MODE_OFF) == 1 and types.count(MODE_ON) == 1


# -- the command line ----------------------------------------------------------------------


def test_the_cli_needs_a_token_and_a_reachable_api(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.cli import main
    from tests.conftest import free_port

    monkeypatch.delenv("PGVOUCH_TOKEN", raising=False)
    assert main(["approval-mode", "status"]) == 2
    assert "PGVOUCH_TOKEN" in capsys.readouterr().err
    monkeypatch.setenv("PGVOUCH_TOKEN", "pgv_not_checked_here")
    api = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["approval-mode", "off", "--resources", "prod-*", "--reason", "x", "--api", api]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the API" in err and "pgv_not_checked_here" not in err
    assert main(["approval-mode", "status", "--api", "ftp://127.0.0.1/"]) == 2
