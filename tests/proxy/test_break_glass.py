"""The proxy's break-glass check on a real SQLite store: it runs first in a hold, and fails closed.

A store that cannot say whether approvals are off refuses the statement; so does an
audit log that cannot be written while they are off (another process holds the
store's write lock, so reads work and writes time out).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from approvals.approval_mode import ApprovalModes
from approvals.service import ApprovalService
from approvals.sqlite_store import SqliteStore
from approvals.store import Store, open_store
from config.settings import HoldSettings, User
from policies.classify import classify
from policies.evaluate import Decision as PolicyDecision
from policies.evaluate import ReviewStep
from policies.model import Action
from proxy import sqlstate
from proxy.approval_hold import StatementHold
from proxy.break_glass import BreakGlassCheck
from proxy.decide import ALLOW, Decision, SessionInfo, Statement, Unit
from proxy.statement_audit import ReviewedUnit, StatementAuditor

SQL = "UPDATE accounts SET balance = 0 WHERE id = 7"
OWNER = User("frank", ("dba",), roles=("owner",))
SESSION = SessionInfo("s1", "alice", ("developers",), "prod-db", "app")
DECISION = PolicyDecision(Action.REVIEW, "prod-writes", "#1", 0, None, "writes need a DBA", (),
                          steps=(ReviewStep("prod-writes", "#1", "DBA", ("group:dba",), 1),))


def check_on(store: Store, session: SessionInfo = SESSION) -> BreakGlassCheck:
    service = ApprovalService(store, {"alice": ("developers",), "bob": ("dba",)})
    return BreakGlassCheck(ApprovalModes(service), StatementAuditor(store),
                           ReviewedUnit(session, Unit((Statement(SQL),)), classify(SQL), DECISION))


async def switch_off(store: Store, glob: str = "prod-*") -> None:
    service = ApprovalService(store, {})
    await ApprovalModes(service).set_approval_mode(OWNER, glob, False, "incident 4711")


async def test_on_means_no_answer_off_means_a_notice_and_an_audit_event(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path}/a.db")
    try:
        assert await check_on(store).run() is None
        await switch_off(store, "staging-*")
        assert await check_on(store).run() is None  # another resource
        await switch_off(store)
        notice = await check_on(store).run()
        assert isinstance(notice, str) and "approvals are OFF for prod-*" in notice
        [event] = [e for e in await store.audit() if e.type == "statement.break_glass"]
        assert (event.actor, event.data["resource"], event.data["statements"]) == (
            "alice", "prod-db", [SQL])
        assert event.data["break_glass"]["switched_off_by"] == "frank"
        assert event.data["break_glass"]["reason"] == "incident 4711"
    finally:
        await store.close()


async def test_the_hold_runs_the_statement_unreviewed_without_a_request(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path}/a.db")
    try:
        await switch_off(store)
        service = ApprovalService(store, {"alice": ("developers",), "bob": ("dba",)})
        hold = StatementHold(service, HoldSettings(), SESSION, {"sql": SQL}, DECISION,
                             break_glass=check_on(store))
        first = await hold.start()
        assert isinstance(first, str) and "runs without review" in first
        assert await hold.outcome() == ALLOW
        assert await store.list() == []  # nothing was held or submitted
        hold.finished(False, 'column "nope" does not exist')  # it failed upstream: recorded too
        assert hold.break_glass is not None
        await hold.break_glass.auditor.flush()
        [failed] = [e for e in await store.audit() if e.type == "statement.failed"]
        assert failed.data["error"] == 'column "nope" does not exist'
        assert failed.data["break_glass"]["switched_off_by"] == "frank"
    finally:
        await store.close()


async def test_a_store_that_cannot_answer_refuses(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path}/a.db")
    await switch_off(store)
    await store.close()
    refused = await check_on(store).run()
    assert isinstance(refused, Decision) and refused.action == "deny"
    assert refused.sqlstate == sqlstate.STORE_UNAVAILABLE
    assert "approvals store is unavailable" in refused.message


async def test_an_audit_log_that_cannot_be_written_refuses(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    store = SqliteStore(path, busy_timeout=0.3)
    try:
        await switch_off(store)
        before = len(await store.audit())
        locker = sqlite3.connect(path, isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")  # another writer holds the lock: reads still work
            refused = await check_on(store).run()
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert isinstance(refused, Decision) and refused.action == "deny"
        assert refused.sqlstate == sqlstate.STORE_UNAVAILABLE
        assert "audit log cannot be written" in refused.message
        assert len(await store.audit()) == before
    finally:
        await store.close()
