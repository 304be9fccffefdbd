"""The admin console end to end: real psql (and asyncpg) against the real proxy,
``dbname=pgvouch``, while alice's statements are held against real PostgreSQL.
Reviewers decide from psql; the workflow's rules come from the same
ApprovalService the API uses."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from pathlib import Path

import asyncpg
import psycopg
import pytest

from approvals import workflow
from approvals.model import Status, grant_subject
from approvals.service import ApprovalService
from approvals.store import open_store
from config.settings import settings_from_node
from config.yamlnodes import load_text
from proxy.approval_hold import ApprovalReviewer
from proxy.policy_decider import PolicyDecider, load_live_policies
from tests.approvals.helpers import StepDef
from tests.conftest import GROUPS, PASSWORDS, PSQL, RunningProxy, config_yaml, free_port

POLICY = """
policies:
  - name: app-writes
    description: writes need a DBA, DDL two
    match: {resources: ["app"]}
    rules:
      - when: {kinds: [read, session]}
        action: allow
      - when: {kinds: [write]}
        action: review
        approval: {steps: [{name: DBA review, approvers: ["group:dba"], required: 1}]}
      - when: {kinds: [ddl]}
        action: review
        approval: {steps: [{name: two DBAs, approvers: ["group:dba"], required: 2}]}
defaults: {action: deny}
"""
EXTRA_POLICY = """
policies:
  - name: reporting
    match: {resources: ["reports-*"], users: ["group:analysts"]}
    rules:
      - action: allow
"""


class Console:
    """A proxy with approvals, alice's held statements, and psql on dbname=pgvouch."""

    def __init__(self, proxy: RunningProxy, service: ApprovalService, policies: Path) -> None:
        self.proxy = proxy
        self.service = service
        self.policies = policies

    def psql(self, sql: str, user: str = "bob", check: bool = True, **kwargs: str
             ) -> subprocess.CompletedProcess[str]:
        """``psql -c`` on the console; errors show their SQLSTATE (VERBOSITY=verbose)."""
        return self.proxy.psql("-F", "|", "-v", "VERBOSITY=verbose", "-c", sql, user=user,
                               dbname="pgvouch", check=check, **kwargs)

    def rows(self, sql: str, user: str = "bob") -> list[list[str]]:
        out = self.psql(sql, user).stdout
        return [line.split("|") for line in out.splitlines() if line]

    def held(self, sql: str) -> subprocess.Popen[str]:
        """alice runs ``sql`` through the proxy in the background (it will be held)."""
        return subprocess.Popen([PSQL, "-X", "-At", "-d", self.proxy.dsn("alice"), "-c", sql],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def pending(self, count: int = 1, timeout: float = 15) -> list[list[str]]:
        """SHOW REQUESTS PENDING from bob's psql, once ``count`` rows are there."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = self.rows("SHOW REQUESTS PENDING")
            if len(found) >= count:
                return found
            time.sleep(0.2)
        raise AssertionError(f"fewer than {count} pending request(s) appeared")

    def status(self, request_id: str) -> Status:
        request = self.proxy.call(self.service.store.get(request_id))
        assert request is not None
        return Status(request.status)


@pytest.fixture
def console(pg, tmp_path: Path):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "app.yaml").write_text(POLICY)
    text = config_yaml(pg, port=free_port(), api_port=free_port(),
                       extra="hold: {wait_timeout: 30s, heartbeat: 1s}\n")
    text = text.replace("  - name: carol\n", "  - name: carol\n    roles: [owner]\n")
    settings = settings_from_node(load_text(text, str(tmp_path / "pgvouch.yaml")))
    proxy = RunningProxy(settings)
    store = proxy.call(open_store(f"sqlite:///{tmp_path / 'approvals.db'}"))
    groups = {user: tuple(names) for user, names in GROUPS.items()}
    service = ApprovalService(store, groups)
    live = load_live_policies(str(policies), groups)
    proxy.server.decider = PolicyDecider(live, ApprovalReviewer(service, settings))
    proxy.server.approvals = service
    yield Console(proxy, service, policies)
    proxy.call(store.close())
    proxy.stop()


def test_bob_finds_inspects_and_approves_alices_update(console, pg):
    pg.psql("UPDATE accounts SET balance = 30 WHERE id = 61")
    alice = console.held("UPDATE accounts SET balance = 0 WHERE id = 61")
    ((rid, status, progress, requester, resource, account, statement, submitted, left,
      may_vote),) = console.pending()
    assert (status, progress, requester, resource, account) == ("pending", "0/1", "alice", "app", "app")
    assert statement == "UPDATE accounts SET balance = 0 WHERE id = 61"
    assert submitted.endswith(" ago") and left and may_vote == "bob, carol"

    detail = dict(console.rows(f"SHOW REQUEST '{rid}'"))
    assert detail["statement"] == "UPDATE accounts SET balance = 0 WHERE id = 61"
    assert detail["requester"] == "alice" and detail["policies"] == "app-writes"
    assert detail["step 1/1"] == "DBA review: 0/1 approvals (current); approvers: group:dba"
    assert detail["may vote"] == "bob, carol" and "left)" in detail["expires"]
    assert detail["kinds"] == "write" and detail["tables"] == "accounts"

    # four-eyes: alice cannot approve her own request, from the console either
    refused = console.psql(f"APPROVE '{rid}'", user="alice", check=False)
    assert refused.returncode != 0
    assert "ERROR:  42501: alice requested" in refused.stderr and "four-eyes" in refused.stderr
    assert pg.psql("SELECT balance FROM accounts WHERE id = 61").strip() == "30"

    assert console.rows(f"approve '{rid.lower()}' note 'ok';") == [
        [rid, "approved", f"{rid} approved; usable for 1h"]]
    _, err = alice.communicate(timeout=30)
    assert alice.returncode == 0, err
    assert f"held for approval as request {rid}" in err
    assert pg.psql("SELECT balance FROM accounts WHERE id = 61").strip() == "0"
    deadline = time.time() + 5
    while console.status(rid) is not Status.EXECUTED and time.time() < deadline:
        time.sleep(0.1)
    detail = dict(console.rows(f"SHOW REQUEST '{rid}'"))
    assert detail["status"] == "executed"
    assert detail["vote"].startswith("bob approved step 1 at ") and detail["vote"].endswith(": ok")
    assert console.rows("SHOW REQUESTS PENDING") == []


def test_deny_with_a_note_reaches_alice(console, pg):
    alice = console.held("UPDATE accounts SET balance = 1 WHERE id = 62")
    rid = console.pending()[0][0]
    missing_note = console.psql(f"DENY '{rid}'", check=False)
    assert "42601: DENY needs a note" in missing_note.stderr
    assert console.rows(f"DENY '{rid}' NOTE 'not during the audit; it''s frozen'")[0][:2] == [
        rid, "denied"]
    _, err = alice.communicate(timeout=30)
    assert f"request {rid} was denied by bob: not during the audit; it's frozen" in err
    assert pg.psql("SELECT balance FROM accounts WHERE id = 62").strip() == "620"
    late = console.psql(f"APPROVE '{rid}'", user="carol", check=False)
    assert "ERROR:  55000:" in late.stderr


def test_alice_cancels_her_own_request(console, pg):
    alice = console.held("UPDATE accounts SET balance = 2 WHERE id = 63")
    rid = console.pending()[0][0]
    not_hers = console.psql(f"CANCEL '{rid}'", check=False)
    assert "ERROR:  42501: only alice" in not_hers.stderr
    assert console.rows(f"CANCEL '{rid}'", user="alice")[0][:2] == [rid, "cancelled"]
    _, err = alice.communicate(timeout=30)
    assert alice.returncode != 0 and f"request {rid} is cancelled" in err
    assert console.status(rid) is Status.CANCELLED
    assert pg.psql("SELECT balance FROM accounts WHERE id = 63").strip() == "630"


def test_the_dba_clears_the_queue_from_psql(console, pg):
    table = f"console_{uuid.uuid4().hex[:8]}"
    pg.psql("DELETE FROM events WHERE payload = 'from the console'")
    held = [
        console.held("UPDATE accounts SET balance = 7 WHERE id = 64"),
        console.held("INSERT INTO events(payload) VALUES ('from the console')"),
        console.held(f"CREATE TABLE {table} (id int)"),
    ]
    queue = console.pending(3)
    by_statement = {row[6].split()[0]: row[0] for row in queue}
    update, insert, ddl = by_statement["UPDATE"], by_statement["INSERT"], by_statement["CREATE"]
    assert {row[2] for row in queue} == {"0/1", "0/2"}
    # one psql call, three commands in one Query string
    out = console.rows(f"APPROVE '{update}'; DENY '{insert}' NOTE 'use the loader'; "
                       f"APPROVE '{ddl}' NOTE 'first of two';")
    assert [row[:2] for row in out] == [[update, "approved"], [insert, "denied"], [ddl, "pending"]]
    assert "has 1/2 approvals; may approve: carol" in out[2][2]
    assert [row[0] for row in console.pending()] == [ddl]
    assert console.rows(f"APPROVE '{ddl}'", user="carol")[0][:2] == [ddl, "approved"]
    assert console.rows("SHOW REQUESTS PENDING") == []
    results = [proc.communicate(timeout=30) for proc in held]
    assert [proc.returncode for proc in held] == [0, 1, 0], results
    assert pg.psql("SELECT balance FROM accounts WHERE id = 64").strip() == "7"
    assert pg.psql("SELECT count(*) FROM events WHERE payload = 'from the console'").strip() == "0"
    assert pg.psql(f"SELECT count(*) FROM {table}").strip() == "0"
    pg.psql(f"DROP TABLE {table}")
    statuses = {row[0]: row[1] for row in console.rows("SHOW REQUESTS")}
    assert statuses[insert] == "denied" and statuses[ddl] in ("executing", "executed")


def test_grants_are_shown_approved_and_revoked(console, pg):
    grant = workflow.submit(
        subject_kind="grant", requester="alice", resource="app", account="app",
        subject=grant_subject(kinds=["write"], tables=["accounts"], duration=3600,
                              reason="incident 4711"),
        policies=["app-writes"], steps=[StepDef("DBA review", ("group:dba",), policy="app-writes")],
        directory=console.service.directory, now=time.time(), expires_after=3600,
        max_duration=4 * 3600,
    )
    gid = console.proxy.call(console.service.create(grant)).id
    ((row),) = console.rows("SHOW GRANTS")
    assert row == [gid, "pending", "0/1", "alice", "app", "app", "write", "accounts", "1h",
                   "incident 4711", row[10], "bob, carol"]
    assert console.rows(f"APPROVE '{gid}'")[0][:2] == [gid, "approved"]
    assert console.rows("SHOW GRANTS")[0][1] == "approved"
    # a statement's request is not a grant
    alice = console.held("UPDATE accounts SET balance = 9 WHERE id = 66")
    rid = console.pending()[0][0]
    wrong = console.psql(f"REVOKE GRANT '{rid}'", user="alice", check=False)
    assert "ERROR:  42809:" in wrong.stderr
    console.psql(f"CANCEL '{rid}'", user="alice")
    alice.communicate(timeout=30)
    assert console.rows(f"REVOKE GRANT '{gid}' NOTE 'incident over'", user="alice")[0][:2] == [
        gid, "revoked"]
    assert console.rows("SHOW GRANTS") == []


def test_show_sessions_lists_alices_held_session(console):
    alice = console.held("UPDATE accounts SET balance = 8 WHERE id = 65")
    rid = console.pending()[0][0]
    sessions = console.rows("SHOW SESSIONS")
    by_user = {row[1]: row for row in sessions}
    sid, _, resource, account, client, phase, app, since, request = by_user["alice"]
    assert (resource, account, phase, app, request) == ("app", "app", "held", "psql", rid)
    assert client.startswith("127.0.0.1:") and since.endswith(" UTC") and len(sid) == 8
    assert by_user["bob"][2] == "pgvouch" and by_user["bob"][5] == "console"
    console.psql(f"DENY '{rid}' NOTE 'test over'")
    alice.communicate(timeout=30)


def test_show_policies_and_reload_for_owners_only(console):
    assert console.rows("SHOW POLICIES") == [
        ["app-writes", f"{console.policies / 'app.yaml'}:3", "app", "*", "*", "3",
         "writes need a DBA, DDL two"]]
    (console.policies / "reports.yaml").write_text(EXTRA_POLICY)
    refused = console.psql("RELOAD", check=False)
    assert refused.returncode != 0 and "ERROR:  42501: permission denied: RELOAD" in refused.stderr
    assert console.rows("RELOAD", user="carol") == [["2", "2"]]
    policies = {row[0]: row for row in console.rows("SHOW POLICIES")}
    assert policies["reporting"][2:6] == ["reports-*", "*", "group:analysts", "1"]
    # a broken file: RELOAD says so, and the policies in force stay
    (console.policies / "reports.yaml").write_text("policies: [oops")
    broken = console.psql("RELOAD", user="carol", check=False)
    assert "ERROR:  F0000: the policies did not load" in broken.stderr
    assert "reports.yaml" in broken.stderr
    shown = console.psql("SHOW POLICIES")
    assert "reporting" in shown.stdout and "the last policy reload failed" in shown.stderr


def test_bad_commands_are_errors_and_the_session_goes_on(console):
    script = "\n".join([
        "SELECT 1;",
        "SHOW HELP;",
        "APPROVE R-7KQ2X;",
        "SHOW REQUEST 'R-ZZZZZ';",
        "SHOW HELP; SHOW NOTHING;",
        "show sessions;",
    ])
    result = console.proxy.psql("-F", "|", "-v", "VERBOSITY=verbose", "-v", "ON_ERROR_STOP=0",
                                "-f", "-", user="bob", dbname="pgvouch", input=script)
    errors = [line for line in result.stderr.splitlines() if "ERROR:" in line]
    assert len(errors) == 4, result.stderr
    assert 'ERROR:  42601: syntax error at or near "SELECT"' in errors[0]
    assert 'ERROR:  42601: syntax error at or near "R"' in errors[1]
    assert "HINT:  Put the request id in single quotes" in result.stderr
    assert 'ERROR:  42704: request "R-ZZZZZ" does not exist' in errors[2]
    assert 'ERROR:  42601: syntax error at or near "NOTHING"' in errors[3]
    rows = [line.split("|") for line in result.stdout.splitlines()]
    assert sum(row[0] == "SHOW HELP" for row in rows) == 2  # psql sends each line on its own
    assert any(row[1] == "bob" and row[5] == "console" for row in rows if len(row) == 9)
    # one Query string: a syntax error anywhere means none of it ran
    whole = console.psql("SHOW HELP; SHOW NOTHING", check=False)
    assert whole.stdout == "" and 'syntax error at or near "NOTHING"' in whole.stderr


def test_extended_protocol_gets_a_clean_error(console):
    async def session() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=console.proxy.port, user="bob",
                                     password=PASSWORDS["bob"], database="pgvouch", ssl=False)
        try:
            with pytest.raises(asyncpg.PostgresError) as info:
                await conn.fetch("SHOW REQUESTS")
            assert info.value.sqlstate == "0A000"
            assert "simple query protocol" in str(info.value)
            with pytest.raises(asyncpg.PostgresError) as info:
                await conn.execute("APPROVE $1", "R-7KQ2X")
            assert info.value.sqlstate == "0A000"
            assert await conn.execute("SHOW HELP") == "SHOW"  # the session is still usable
            with pytest.raises(asyncpg.PostgresError) as info:
                await conn.execute("APPROVE 'R-7KQ2X' NOTE")
            assert info.value.sqlstate == "42601"
        finally:
            await conn.close()

    asyncio.run(session())
    # psycopg sends a query without parameters as a simple Query; with parameters, extended
    with psycopg.connect(console.proxy.dsn("bob", "pgvouch"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("APPROVE %s", ["R-7KQ2X"])
        assert conn.execute("SHOW HELP").fetchall()[-1][0] == "SHOW HELP"


def test_wrong_password_and_no_approvals(console, start_proxy):
    bad = subprocess.run([PSQL, "-X", "-At", "-c", "SHOW HELP", "-d",
                          console.proxy.dsn("bob", "pgvouch").replace("bob-pw", "wrong")],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and 'password authentication failed for user "bob"' in bad.stderr
    plain = start_proxy()  # no policies, no approvals: requests cannot be shown
    result = plain.psql("-v", "VERBOSITY=verbose", "-c", "SHOW REQUESTS", user="bob",
                        dbname="pgvouch", check=False)
    assert "ERROR:  55000: approvals are not configured on this proxy" in result.stderr
    assert "ERROR:  55000: no policies are configured" in plain.psql(
        "-v", "VERBOSITY=verbose", "-c", "SHOW POLICIES", dbname="pgvouch", check=False).stderr
    assert "|console|" in plain.psql("-c", "SHOW SESSIONS", dbname="pgvouch").stdout
