"""A JIT grant's window running out is a step of its own: ``workflow.end_grant`` moves an
approved grant past its ``approved_until`` to ``expired`` with a ``request.ended`` event,
both stores find such grants (``grants_due``, SQLite and PostgreSQL), and the sweeper
records it exactly once across replicas, in the audit log and on every channel (a webhook,
Slack, a mail to the requester over a real SMTP server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from approvals import workflow
from approvals.email_notify import EmailNotifier
from approvals.model import Status
from approvals.service import ApprovalService
from approvals.slack import SlackNotifier
from approvals.store import Store
from approvals.workflow import SYSTEM, TRANSITIONS, Action, Code, EventType, WorkflowError
from config.settings import Settings, SlackSettings
from proxy.grant_sessions import GrantSessions
from proxy.server import ProxyServer
from tests.approvals.api_harness import Clock
from tests.approvals.helpers import DIRECTORY, HOUR, T0, approve_all, make_grant, make_request
from tests.approvals.test_email import body_of, mail_env, mail_settings, smtp_server, subject_of
from tests.approvals.test_store import OpenMore
from tests.conftest import free_port

APPROVED_AT = T0 + 60
ENDS_AT = APPROVED_AT + HOUR  # make_grant's default duration, approved by approve_all at T0 + 60
HOOK = "http://127.0.0.1:9/hook"


def refused(code: Code) -> pytest.RaisesExc[WorkflowError]:
    return pytest.raises(WorkflowError, check=lambda exc: exc.code == code)


# -- the workflow ---------------------------------------------------------------------


def test_an_approved_grant_ends_once_its_window_has_passed() -> None:
    assert TRANSITIONS[Status.APPROVED][Action.END] is Status.EXPIRED
    running = approve_all(make_grant(), "bob")
    assert running.approved_until == ENDS_AT
    with refused(Code.NOT_DUE) as caught:
        workflow.end_grant(running, ENDS_AT - 1)
    assert "open for 1s more" in caught.value.message
    ended, events = workflow.end_grant(running, ENDS_AT + 5)
    assert ended.status is Status.EXPIRED
    assert (ended.approved_until, ended.decided_at, ended.note) == (ENDS_AT, APPROVED_AT, None)
    assert ended.votes == running.votes and ended.steps == running.steps
    [event] = events
    assert (event.type, event.actor, event.at, event.request_id) == (EventType.ENDED, SYSTEM, ENDS_AT + 5,
                                                                      running.id)
    assert str(event.type) == "request.ended"
    assert event.data == {"approved_until": ENDS_AT}
    assert not workflow.is_usable(ended, ENDS_AT + 5)
    assert workflow.progress(ended, ENDS_AT + 5).summary() == f"{running.id} expired"


def test_only_approved_grants_end() -> None:
    with refused(Code.NOT_APPROVED):
        workflow.end_grant(make_grant(), T0 + 9 * HOUR)  # pending (its own expiry is ``expire``)
    running = approve_all(make_grant(), "bob")
    revoked = workflow.revoke(running, "alice", T0 + 70).request
    with refused(Code.NOT_APPROVED):
        workflow.end_grant(revoked, ENDS_AT)
    ended = workflow.end_grant(running, ENDS_AT).request
    with refused(Code.NOT_APPROVED):
        workflow.end_grant(ended, ENDS_AT + 1)  # once
    with refused(Code.NOT_APPROVED):
        workflow.revoke(ended, "alice", ENDS_AT + 1)  # nothing left to revoke
    with refused(Code.EXPIRED):
        workflow.vote(ended, "carol", "approve", None, ENDS_AT + 1)


def test_statements_never_end_this_way() -> None:
    approved = approve_all(make_request(), "bob")
    assert approved.approved_until is not None
    with refused(Code.WRONG_SUBJECT):
        workflow.end_grant(approved, approved.approved_until + 1)


# -- the stores (SQLite and PostgreSQL) -------------------------------------------------


async def test_grants_due_finds_approved_grants_past_their_window(store: Store) -> None:
    short = await store.create(approve_all(make_grant(duration=HOUR / 2), "bob"))
    running = await store.create(approve_all(make_grant(), "bob"))
    daves = await store.create(approve_all(make_grant(requester="dave"), "bob"))
    await store.create(make_grant())  # pending
    await store.create(approve_all(make_request(), "bob"))  # a statement whose approval lapses too
    revoked = await store.create(approve_all(make_grant(), "bob"))
    await store.update(workflow.revoke(revoked, "alice", T0 + 70).request, revoked.version)

    assert await store.grants_due(APPROVED_AT + HOUR / 2 - 1) == []
    assert await store.grants_due(APPROVED_AT + HOUR / 2) == [short]
    due = await store.grants_due(ENDS_AT)
    assert due[0] == short and {r.id for r in due[1:]} == {running.id, daves.id}
    assert len(await store.grants_due(ENDS_AT, limit=2)) == 2
    await store.update(workflow.end_grant(short, ENDS_AT).request, short.version)
    assert {r.id for r in await store.grants_due(ENDS_AT)} == {running.id, daves.id}


# -- the sweeper: exactly once across replicas, on every channel ----------------------------


def channel_settings() -> Settings:
    settings = mail_settings(free_port(), store="sqlite:///unused.db")
    return dataclasses.replace(settings, slack=SlackSettings("PGV_UNUSED_URL", "PGV_UNUSED_SECRET", "#dba"))


def replica(store: Store, clock: Callable[[], float]) -> ApprovalService:
    settings = channel_settings()
    return ApprovalService(store, DIRECTORY, webhooks=[(HOOK, ("request.ended",))],
                           notifiers=[SlackNotifier(settings), EmailNotifier(settings)], clock=clock)


async def test_two_sweepers_racing_end_a_grant_once(store: Store, open_more: OpenMore) -> None:
    clock = Clock(T0)
    a, b = replica(store, clock), replica(await open_more(), clock)
    grant = await a.create(make_grant())
    approved = await b.vote(grant.id, "bob", "approve", None)
    clock.advance(approved.approved_ttl - 1)
    assert await a.end_due_grants() == 0  # still running
    clock.advance(2)

    counts = await asyncio.gather(a.end_due_grants(), b.end_due_grants(), a.end_due_grants(),
                                  b.end_due_grants())
    assert sum(counts) == 1
    assert await b.end_due_grants() == 0
    ended = await store.get(grant.id)
    assert ended is not None and ended.status is Status.EXPIRED
    assert ended.approved_until == approved.approved_until

    [record] = [e for e in await store.audit() if e.type == "request.ended"]
    assert (record.actor, record.request_id, record.at) == (SYSTEM, grant.id, clock())
    assert record.data["event"] == {"approved_until": approved.approved_until}
    assert record.data["status"] == "expired" and record.data["subject_kind"] == "grant"
    assert [e.type for e in await store.audit()].count("request.ended") == 1

    sent = [d for d in await store.list_deliveries() if d.payload.get("event") == "request.ended"]
    by_channel = {d.channel: d for d in sent}
    assert sorted(d.channel for d in sent) == ["email", "slack", "webhook"]  # one each
    hook = by_channel["webhook"].payload
    assert by_channel["webhook"].target == HOOK
    assert (hook["actor"], hook["request"]["status"]) == (SYSTEM, "expired")
    assert hook["data"] == {"approved_until": approved.approved_until}
    slack = by_channel["slack"].payload["message"]
    assert "ended: its time window closed" in slack["text"]
    assert any("Ended " in str(block) for block in slack["blocks"])
    assert by_channel["email"].target == "alice@example.com"
    assert by_channel["email"].payload["subject"] == f"[pgvouch] {grant.id} ended: your grant on prod-db/app"


async def test_the_sweeper_loop_ends_due_grants(store: Store) -> None:
    clock = Clock(T0)
    service = replica(store, clock)
    grant = await service.create(make_grant(duration=HOUR))
    await service.vote(grant.id, "bob", "approve", None)
    clock.advance(HOUR)
    sweeper = asyncio.create_task(service.run_sweeper(interval=0.05))
    try:
        for _ in range(200):
            current = await store.get(grant.id)
            assert current is not None
            if current.status is Status.EXPIRED:
                break
            await asyncio.sleep(0.05)
        assert current.status is Status.EXPIRED
    finally:
        sweeper.cancel()
    assert [e.type for e in await store.audit()].count("request.ended") == 1


async def test_the_requester_is_mailed_when_the_grant_ends(tmp_path: Path) -> None:
    port = free_port()
    with smtp_server(port) as inbox:
        async with mail_env(tmp_path, port) as env:
            grant = await env.service.create(make_grant(now=env.clock()))
            await env.service.vote(grant.id, "bob", "approve", None)
            while await env.deliver():
                pass
            inbox.mails.clear()
            env.clock.advance(HOUR)
            assert await env.service.end_due_grants() == 1
            while await env.deliver():
                pass
            [mail] = inbox.to("alice@example.com")
            assert inbox.recipients() == ["alice@example.com"]  # only the requester
            assert subject_of(mail) == f"[pgvouch] {grant.id} ended: your grant on prod-db/app"
            assert f"Your grant {grant.id} ended at " in body_of(mail)
            assert "its time window closed" in body_of(mail)


# -- terminate_sessions: a grant the sweeper ended counts as ended ------------------------


async def test_grant_sessions_ends_a_watched_grant_on_the_ended_event(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(T0)
    service = ApprovalService(store, DIRECTORY, clock=clock)
    sessions = GrantSessions(ProxyServer(channel_settings()), service)
    sessions.install()
    grant = make_grant()
    grant = dataclasses.replace(grant, subject={**grant.subject, "terminate_sessions": True})
    stored = await service.create(grant)
    await service.vote(stored.id, "bob", "approve", None)
    assert stored.id in sessions.watched
    clock.advance(HOUR)
    with caplog.at_level(logging.INFO, logger="pgvouch.grants"):
        assert await service.end_due_grants() == 1
    assert stored.id not in sessions.watched
    assert [r.getMessage() for r in caplog.records if stored.id in r.getMessage()] == [
        f"grant {stored.id} expired: closed 0 session(s) of alice on prod-db"]
    ended = await store.get(stored.id)
    assert ended is not None
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pgvouch.grants"):  # the timer got there first: once only
        sessions.on_change(ended, [workflow.Event(EventType.ENDED, stored.id, SYSTEM, clock(), {})])
    assert not [r for r in caplog.records if stored.id in r.getMessage()]
