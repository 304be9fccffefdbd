"""Held statements end to end: real psql/asyncpg through the real proxy, a real
approvals store (SQLite), real PostgreSQL. Reviewers act through the same
ApprovalService the REST API uses."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import time
from pathlib import Path

import asyncpg
import pytest

from approvals.model import Status
from approvals.service import ApprovalService
from approvals.store import open_store
from approvals.workflow import WorkflowError
from proxy.approval_hold import ApprovalReviewer
from proxy.policy_decider import PolicyDecider, load_live_policies
from proxy.statement_audit import StatementAuditor
from tests.conftest import GROUPS, PASSWORDS, PSQL, RunningProxy, make_settings
from tests.e2e.helpers import ALLOW_READS, deny, policy, review, rule

POLICY = policy(
    ALLOW_READS,
    rule("allow", "write", tables='"audited_free"'),
    review(tables='"short_lived"', expires_after="1s"),
    review(message="Writes need a DBA"),
    review("ddl", approval='{steps: [{name: two DBAs, approvers: ["group:dba"], required: 2}]}'),
    deny())


class Approvals:
    def __init__(self, proxy: RunningProxy, service: ApprovalService) -> None:
        self.proxy = proxy
        self.service = service

    def run(self, coro):
        return self.proxy.call(coro)

    def pending(self, timeout: float = 10):
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = self.run(self.service.store.list(status="pending", resource_glob=None, limit=50))
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError("no pending request appeared")

    def vote(self, request_id: str, user: str, decision: str, note: str | None = None):
        return self.run(self.service.vote(request_id, user, decision, note))

    def get(self, request_id: str):
        return self.run(self.service.store.get(request_id))


def _start(pg, tmp_path: Path, extra: str = "", store_url: str | None = None):
    directory = tmp_path / "policies"
    directory.mkdir(exist_ok=True)
    (directory / "app.yaml").write_text(POLICY)
    settings = make_settings(pg, tmp_path, extra=extra)
    proxy = RunningProxy(settings)
    url = store_url or f"sqlite:///{tmp_path / 'approvals.db'}"
    store = proxy.call(open_store(url))
    groups = {u: tuple(g) for u, g in GROUPS.items()}
    service = ApprovalService(store, groups)
    live = load_live_policies(str(directory), groups)
    auditor = StatementAuditor(store)
    proxy.server.decider = PolicyDecider(live, ApprovalReviewer(service, settings), auditor)
    proxy.loop.call_soon_threadsafe(lambda: proxy.loop.create_task(auditor.run(interval=0.05)))
    return proxy, Approvals(proxy, service)


@pytest.fixture
def held(pg, tmp_path):
    proxy, approvals = _start(pg, tmp_path, extra="hold: {wait_timeout: 20s, heartbeat: 1s}\n")
    yield proxy, approvals
    proxy.call(approvals.service.store.close())
    proxy.stop()


def _psql_bg(proxy, sql: str, user: str = "alice", **params: str) -> subprocess.Popen[str]:
    return subprocess.Popen([PSQL, "-X", "-At", "-d", proxy.dsn(user, **params), "-c", sql],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_held_update_runs_after_bob_approves(held, pg):
    proxy, approvals = held
    pg.psql("UPDATE accounts SET balance = 70 WHERE id = 7")
    proc = _psql_bg(proxy, "UPDATE accounts SET balance = 0 WHERE id = 7")
    request = approvals.pending()[0]
    assert request.requester == "alice" and request.subject["sql"].startswith("UPDATE accounts")
    time.sleep(1.5)  # one heartbeat
    assert pg.psql("SELECT balance FROM accounts WHERE id = 7").strip() == "70"
    with pytest.raises(WorkflowError) as info:
        approvals.vote(request.id, "alice", "approve")  # four-eyes
    assert info.value.code == "cannot_self_approve"
    approvals.vote(request.id, "bob", "approve", "looks fine")
    out, err = proc.communicate(timeout=30)
    assert "UPDATE 1" in out or out == "", (out, err)
    assert f"held for approval as request {request.id}" in err
    assert "still waiting" in err
    assert pg.psql("SELECT balance FROM accounts WHERE id = 7").strip() == "0"
    deadline = time.time() + 5
    while approvals.get(request.id).status is not Status.EXECUTED and time.time() < deadline:
        time.sleep(0.1)
    assert approvals.get(request.id).status is Status.EXECUTED


def test_denied_request_shows_the_note(held, pg):
    proxy, approvals = held
    proc = _psql_bg(proxy, "UPDATE accounts SET balance = 1 WHERE id = 8")
    request = approvals.pending()[0]
    approvals.vote(request.id, "carol", "deny", "not during the audit")
    _, err = proc.communicate(timeout=30)
    assert f"request {request.id} was denied by carol: not during the audit" in err
    assert pg.psql("SELECT balance FROM accounts WHERE id = 8").strip() == "80"


def test_ctrl_c_cancels_the_request(held, pg):
    proxy, approvals = held
    proc = _psql_bg(proxy, "UPDATE accounts SET balance = 2 WHERE id = 9")
    request = approvals.pending()[0]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert "cancelled" in err
    assert approvals.get(request.id).status is Status.CANCELLED
    assert pg.psql("SELECT balance FROM accounts WHERE id = 9").strip() == "90"


def test_unreachable_quorum_is_refused_at_once(held):
    proxy, _ = held
    r = proxy.psql("-c", "CREATE TABLE nope(x int)", user="bob", check=False)
    # two DBAs are needed, bob is one of the two and cannot approve his own request
    assert "needs approval" in r.stderr and "PV001" not in r.stdout


def test_wait_timeout_then_resend_runs_exactly_once(pg, tmp_path):
    proxy, approvals = _start(pg, tmp_path, extra="hold: {wait_timeout: 2s, heartbeat: 1s}\n")
    try:
        pg.psql("DELETE FROM events WHERE payload = 'resend'")
        sql = "INSERT INTO events(payload) VALUES ('resend')"
        r = proxy.psql("-c", sql, check=False)
        assert "no decision on request" in r.stderr and "it stays pending" in r.stderr
        request_id = re.search(r"request (R-\w+)", r.stderr).group(1)
        assert approvals.get(request_id).status is Status.PENDING
        approvals.vote(request_id, "bob", "approve")
        assert proxy.psql("-c", sql).returncode == 0
        assert pg.psql("SELECT count(*) FROM events WHERE payload = 'resend'").strip() == "1"
        # the approval was used up: the same statement is held again (new request)
        r = proxy.psql("-c", sql, check=False)
        assert "no decision on request" in r.stderr
        assert re.search(r"request (R-\w+)", r.stderr).group(1) != request_id
        assert pg.psql("SELECT count(*) FROM events WHERE payload = 'resend'").strip() == "1"
    finally:
        proxy.call(approvals.service.store.close())
        proxy.stop()


def test_retry_mode_with_asyncpg_and_parameters(held, pg):
    proxy, approvals = held
    pg.psql("DELETE FROM events WHERE payload LIKE 'retry-%'")

    async def attempt():
        conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="alice",
                                     password=PASSWORDS["alice"], database="app", ssl=False,
                                     server_settings={"options": "-c pgvouch.hold=retry"})
        try:
            return await conn.execute("INSERT INTO events(payload) VALUES ($1)", "retry-1")
        finally:
            await conn.close()

    with pytest.raises(asyncpg.PostgresError) as info:
        asyncio.run(attempt())
    assert info.value.sqlstate == "PV001"
    request_id = re.search(r"request (R-\w+)", str(info.value)).group(1)
    request = approvals.get(request_id)
    (param,) = request.subject["params"]  # asyncpg binds in binary: shown as hex
    assert param["format"] == "binary" and bytes.fromhex(param["value"]) == b"retry-1"
    approvals.vote(request_id, "bob", "approve")
    assert asyncio.run(attempt()) == "INSERT 0 1"
    assert pg.psql("SELECT count(*) FROM events WHERE payload = 'retry-1'").strip() == "1"


def test_store_unavailable_refuses_reviews_but_reads_flow(pg, tmp_path):
    proxy, approvals = _start(pg, tmp_path)
    try:
        proxy.call(approvals.service.store.close())
        (tmp_path / "approvals.db").unlink()
        (tmp_path / "approvals.db").mkdir()  # the path can no longer be opened as a database
        r = proxy.psql("-c", "UPDATE accounts SET balance = 3 WHERE id = 10", check=False)
        assert "approvals store is unavailable" in r.stderr
        assert proxy.psql("-c", "SELECT 1").stdout.strip() == "1"
        assert pg.psql("SELECT balance FROM accounts WHERE id = 10").strip() == "100"
    finally:
        proxy.stop()


def test_restart_keeps_pending_and_approved_requests(pg, tmp_path):
    proxy, approvals = _start(pg, tmp_path, extra="hold: {wait_timeout: 1s}\n")
    sql = "INSERT INTO events(payload) VALUES ('after restart')"
    pg.psql("DELETE FROM events WHERE payload = 'after restart'")
    r = proxy.psql("-c", sql, check=False)
    request_id = re.search(r"request (R-\w+)", r.stderr).group(1)
    proxy.call(approvals.service.store.close())
    proxy.stop()
    # a new proxy on the same store: approve, then the re-sent statement runs
    proxy, approvals = _start(pg, tmp_path, extra="hold: {wait_timeout: 1s}\n")
    try:
        assert approvals.get(request_id).status is Status.PENDING
        approvals.vote(request_id, "bob", "approve")
        proxy.call(approvals.service.store.close())
        proxy.stop()
        proxy, approvals = _start(pg, tmp_path, extra="hold: {wait_timeout: 1s}\n")
        assert approvals.get(request_id).status is Status.APPROVED
        assert proxy.psql("-c", sql).returncode == 0
        assert pg.psql("SELECT count(*) FROM events WHERE payload = 'after restart'").strip() == "1"
    finally:
        proxy.call(approvals.service.store.close())
        proxy.stop()


def test_statements_are_audited_writes_durably_before_they_run(held, pg):
    proxy, approvals = held
    pg.psql("CREATE TABLE IF NOT EXISTS audited_free(x int); GRANT ALL ON audited_free TO pgv_scram")
    proxy.psql("-c", "INSERT INTO audited_free VALUES (42)")
    proxy.psql("-c", "SELECT count(*) FROM accounts")
    proxy.psql("-c", "DROP TABLE accounts", check=False)

    def events():
        return approvals.run(approvals.service.store.audit(None, 1000))

    deadline = time.time() + 5
    while time.time() < deadline and not any(e.type == "statement.denied" for e in events()):
        time.sleep(0.1)
    found = events()
    allowed = [e for e in found if e.type == "statement.allowed"]
    assert [e.data["statements"] for e in allowed] == [["INSERT INTO audited_free VALUES (42)"]]
    assert allowed[0].actor == "alice" and allowed[0].data["kinds"] == ["write"]
    denied = [e for e in found if e.type == "statement.denied"]
    assert denied and denied[0].data["statements"] == ["DROP TABLE accounts"]
    assert not any("SELECT count(*)" in str(e.data) for e in found)  # reads: not by default
    assert approvals.run(approvals.service.store.verify_audit()).ok


def test_allowed_write_is_refused_when_the_audit_log_cannot_be_written(pg, tmp_path):
    proxy, approvals = _start(pg, tmp_path)
    try:
        pg.psql("CREATE TABLE IF NOT EXISTS audited_free(x int); GRANT ALL ON audited_free TO pgv_scram; "
                "TRUNCATE audited_free")
        proxy.call(approvals.service.store.close())
        (tmp_path / "approvals.db").unlink()
        (tmp_path / "approvals.db").mkdir()
        r = proxy.psql("-c", "INSERT INTO audited_free VALUES (1)", check=False)
        assert "audit log cannot be written" in r.stderr
        assert pg.psql("SELECT count(*) FROM audited_free").strip() == "0"
        assert proxy.psql("-c", "SELECT 1").stdout.strip() == "1"
    finally:
        proxy.stop()


def test_expiry_ends_the_wait_and_the_transaction(held, pg, tmp_path):
    proxy, approvals = held
    pg.psql("CREATE TABLE IF NOT EXISTS short_lived(x int); GRANT ALL ON short_lived TO pgv_scram; "
            "TRUNCATE short_lived")
    script = tmp_path / "tx.sql"
    script.write_text("BEGIN;\nINSERT INTO short_lived VALUES (1);\nSELECT 1;\nCOMMIT;\n")
    proc = subprocess.Popen([PSQL, "-X", "-At", "-v", "ON_ERROR_STOP=0", "-d", proxy.dsn("alice"),
                             "-f", str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    request = approvals.pending()[0]
    time.sleep(1.2)
    assert approvals.run(approvals.service.expire_due()) == 1  # the sweeper's job, run now
    _, err = proc.communicate(timeout=30)
    assert f"request {request.id} is expired" in err
    assert "current transaction is aborted" in err  # an expiry aborts the transaction block
    assert approvals.get(request.id).status is Status.EXPIRED
    assert pg.psql("SELECT count(*) FROM short_lived").strip() == "0"
