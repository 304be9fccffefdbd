"""Just-in-time grants end to end through the real ``pgvouch serve``: alice asks for a
window from psql, the REST API or the ``pgvouch grant`` command, bob approves through
the API, and alice's statements through the proxy to the real PostgreSQL run without
per-statement review until the grant is revoked or expires; deny rules still win."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from approvals.service import ApprovalService
from approvals.store import open_store
from proxy import wire
from tests.conftest import PASSWORDS, PSQL, config_yaml, free_port
from tests.e2e.helpers import (
    ALLOW_READS,
    add_tokens,
    api_call,
    balance,
    deny,
    policy,
    proxy_dsn,
    review,
    serve_extra,
    serving,
    write_policies,
)
from tests.rawclient import RawClient, bind, error_fields, execute, parse

POLICY = policy(ALLOW_READS, review(name="writes", jit="4h"), review("ddl", name="schema changes"),
                deny(name="dangerous", message="not through pgvouch"))
# The same, plus a deny for writes to events (loaded while a grant is running).
POLICY_DENY_EVENTS = POLICY.replace(
    "      - name: writes\n",
    "      - name: no event writes\n"
    "        when: {kinds: [write], tables: [events]}\n"
    "        action: deny\n"
    "        message: events are append-only via the app\n"
    "      - name: writes\n",
)
TOKENS = {"alice": "tok-alice-jit-0123456789", "bob": "tok-bob-jit-0123456789",
          "carol": "tok-carol-jit-0123456789", "dave": "tok-dave-jit-0123456789"}


@dataclass
class Served:
    port: int
    api_port: int
    proc: subprocess.Popen[bytes]
    policies: Path
    log: Path

    def api(self, method: str, path: str, user: str, body: Any = None) -> tuple[int, Any]:
        return api_call(self.api_port, method, f"/api/v1{path}", token=TOKENS[user], body=body,
                        timeout=15)

    def dsn(self, user: str = "alice") -> str:
        return proxy_dsn(self.port, user)

    def psql(self, sql: str, *, retry: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """alice's psql; in retry mode a statement that needs review fails at once with PV001."""
        env = dict(os.environ, PGOPTIONS="-c pgvouch.hold=retry" if retry else "")
        return subprocess.run([PSQL, "-X", "-At", "-v", "VERBOSITY=verbose", "-d", self.dsn(),
                               "-c", sql], capture_output=True, text=True, env=env, timeout=timeout)

    def interactive(self) -> subprocess.Popen[str]:
        """An open psql session of alice's that reads statements from stdin."""
        return subprocess.Popen([PSQL, "-X", "-At", "-v", "VERBOSITY=verbose", "-d", self.dsn()],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def approve(self, request_id: str, user: str = "bob") -> dict[str, Any]:
        status, body = self.api("POST", f"/requests/{request_id}/approve", user, {"note": "ok"})
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    def audit(self) -> list[dict[str, Any]]:
        status, body = self.api("GET", "/audit?limit=1000", "bob")
        assert status == 200
        return body["events"]  # type: ignore[no-any-return]


@pytest.fixture
def served(pg, tmp_path: Path) -> Iterator[Served]:
    policies = write_policies(tmp_path / "policies", POLICY)
    port, api_port = free_port(), free_port()
    extra = serve_extra(policies, f"sqlite:///{tmp_path}/approvals.db", "wait_timeout: 30s, heartbeat: 5s")
    config = tmp_path / "pgvouch.yaml"
    config.write_text(add_tokens(config_yaml(pg, port=port, api_port=api_port, extra=extra), TOKENS))
    log = tmp_path / "pgvouch.log"
    with serving(config, (port, api_port), log=log) as proc:
        yield Served(port, api_port, proc, policies, log)


_balance = balance


def _request_from_psql(served: Served, sql: str) -> list[str]:
    result = served.psql(sql)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split("|")


def _held(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode != 0 and "PV001" in result.stderr and "approval required" in result.stderr


def test_psql_grant_lets_updates_run_without_review_until_revoked(served: Served, pg) -> None:
    pg.psql("UPDATE accounts SET balance = 410 WHERE id = 41")
    update = "UPDATE accounts SET balance = balance + 1 WHERE id = 41"
    assert _held(served.psql(update))  # no grant: reviewed (retry mode: refused with PV001 at once)
    assert _balance(pg, 41) == "410"

    row = _request_from_psql(served, "SELECT pgvouch.request_access('write', '1h', 'incident 4711')")
    grant_id, status, progress, following = row
    assert re.fullmatch(r"R-\w{5,}", grant_id) and status == "pending"
    assert "step 1/1 'DBA review'" in progress and "bob" in following
    status, grant = served.api("GET", f"/requests/{grant_id}", "bob")
    assert grant["kind"] == "grant" and grant["requester"] == "alice"
    assert grant["subject"]["kinds"] == ["write"] and grant["subject"]["duration"] == 3600
    assert grant["subject"]["reason"] == "incident 4711"
    assert _held(served.psql(update))  # pending is not approved

    approved = served.approve(grant_id)
    assert approved["status"] == "approved"
    assert approved["approved_until"] == pytest.approx(approved["decided_at"] + 3600)  # clock starts now
    for _ in range(3):  # no prompt, no hold, not even in wait mode
        started = time.monotonic()
        result = served.psql(update, retry=False)
        assert result.returncode == 0 and result.stdout.strip() == "UPDATE 1", result.stderr
        assert "held" not in result.stderr and time.monotonic() - started < 10
    assert _balance(pg, 41) == "413"

    # asyncpg too (extended protocol, a bound parameter), and each statement is audited with the grant
    async def bump() -> str:
        conn = await asyncpg.connect(host="127.0.0.1", port=served.port, user="alice",
                                     password=PASSWORDS["alice"], database="app", ssl=False)
        try:
            return await conn.execute("UPDATE accounts SET balance = balance + $1 WHERE id = 41", 10)
        finally:
            await conn.close()

    assert asyncio.run(bump()) == "UPDATE 1"
    assert _balance(pg, 41) == "423"
    under_grant = [e for e in served.audit() if e["type"] == "statement.allowed"
                   and e["data"].get("grant") == grant_id]
    assert len(under_grant) == 4
    assert all(e["request_id"] == grant_id and e["actor"] == "alice" for e in under_grant)

    # one Query holding BEGIN, the UPDATE and COMMIT: only the UPDATE was under review, and the
    # grant covers it; a Query with a statement the grant does not cover is reviewed as a whole
    result = served.psql("BEGIN; UPDATE accounts SET balance = balance + 1 WHERE id = 41; COMMIT")
    assert result.returncode == 0 and result.stdout.strip().endswith("COMMIT"), result.stderr
    assert _balance(pg, 41) == "424"
    assert _held(served.psql("UPDATE accounts SET balance = 0 WHERE id = 41; CREATE TABLE t41 (x int)"))
    assert _balance(pg, 41) == "424"

    # carol (an approver) revokes it: the next UPDATE is reviewed again
    status, revoked = served.api("POST", f"/grants/{grant_id}/revoke", "carol", {"note": "incident over"})
    assert status == 200 and revoked["status"] == "revoked"
    assert _held(served.psql(update))
    assert _balance(pg, 41) == "424"
    assert any(e["type"] == "request.revoked" and e["request_id"] == grant_id for e in served.audit())


def test_api_grant_cap_rules_without_jit_and_deny(served: Served, pg) -> None:
    ask = {"resource": "app", "account": "app", "kinds": ["write"], "duration": "5h",
           "reason": "migration"}
    status, body = served.api("POST", "/grants", "alice", ask)
    assert status == 400 and body["error"]["code"] == "duration_too_long"
    assert "4h" in body["error"]["message"]
    status, body = served.api("POST", "/grants", "alice", {**ask, "kinds": ["ddl"], "duration": "1h"})
    assert status == 403 and body["error"]["code"] == "grant_not_allowed"
    assert "schema changes" in body["error"]["message"]
    status, body = served.api("POST", "/grants", "alice", {**ask, "kinds": ["write", "destructive"],
                                                           "duration": "1h"})
    assert status == 403 and body["error"]["code"] == "grant_denied"
    assert '"app-writes" rule dangerous' in body["error"]["message"]
    status, body = served.api("POST", "/grants", "alice", {**ask, "kinds": ["read"], "duration": "1h"})
    assert status == 409 and body["error"]["code"] == "no_approval_needed"
    status, body = served.api("POST", "/grants", "alice", {**ask, "account": "admin", "duration": "1h"})
    assert status == 403 and body["error"]["code"] == "account_not_allowed"  # admin: group:dba only
    status, body = served.api("POST", "/grants", "alice", {**ask, "kinds": ["writes"], "duration": "1h"})
    assert status == 400 and body["error"]["code"] == "invalid_grant"
    # from psql: the cap and the deny come back as errors with SQLSTATE PV007
    result = served.psql("SELECT pgvouch.request_access('write', '5h', 'migration')")
    assert result.returncode != 0 and "PV007" in result.stderr and "4h" in result.stderr
    result = served.psql("SELECT pgvouch.request_access('write,destructive', '1h', 'x')")
    assert "PV007" in result.stderr and "dangerous" in result.stderr
    status, body = served.api("GET", "/requests", "bob")
    assert body["requests"] == []  # nothing refused was stored

    # the same through `pgvouch grant` with alice's token from the environment
    env = dict(os.environ, PGVOUCH_TOKEN=TOKENS["alice"])
    api = f"http://127.0.0.1:{served.api_port}"
    cli = [sys.executable, "-m", "proxy.cli", "grant"]
    made = subprocess.run([*cli, "request", "--api", api, "--resource", "app", "--account", "app",
                           "--kinds", "write", "--tables", "public.accounts, events", "--duration",
                           "30m", "--reason", "ticket 12"], capture_output=True, text=True, env=env,
                          timeout=30)
    assert made.returncode == 0, made.stderr
    grant_id = made.stdout.split("\t")[0]
    refused = subprocess.run([*cli, "request", "--api", api, "--resource", "app", "--account", "app",
                              "--kinds", "write", "--duration", "9h", "--reason", "x"],
                             capture_output=True, text=True, env=env, timeout=30)
    assert refused.returncode == 1 and "4h" in refused.stderr
    served.approve(grant_id)
    listed = subprocess.run([*cli, "list", "--api", api, "--active", "--mine"], capture_output=True,
                            text=True, env=env, timeout=30)
    assert listed.returncode == 0 and listed.stdout.startswith(f"{grant_id}\tapproved\talice\tapp/app")
    assert "events,public.accounts" in listed.stdout
    revoked = subprocess.run([*cli, "revoke", grant_id, "--api", api, "--note", "done"],
                             capture_output=True, text=True, env=env, timeout=30)
    assert revoked.returncode == 0 and revoked.stdout.strip() == f"{grant_id}\trevoked"
    for output in (made, refused, listed, revoked):
        assert TOKENS["alice"] not in output.stdout + output.stderr
    status, body = served.api("GET", "/grants?active=true", "bob")
    assert status == 200 and body["grants"] == []


def test_table_grant_covers_only_its_tables(served: Served, pg) -> None:
    status, grant = served.api("POST", "/grants", "alice", {
        "resource": "app", "account": "app", "kinds": ["write"], "tables": ["public.accounts"],
        "duration": "1h", "reason": "fix balances"})
    assert status == 201, grant
    served.approve(grant["id"])
    assert served.psql("UPDATE public.accounts SET balance = 420 WHERE id = 42").returncode == 0
    # an unqualified name may be another schema's table: not certainly covered, so reviewed
    assert _held(served.psql("UPDATE accounts SET balance = 421 WHERE id = 42"))
    assert _held(served.psql("INSERT INTO public.events(payload) VALUES ('not granted')"))
    assert _balance(pg, 42) == "420"


def test_grant_expires_on_time_and_closes_sessions(served: Served, pg) -> None:
    status, grant = served.api("POST", "/grants", "alice", {
        "resource": "app", "account": "app", "kinds": ["write"], "duration": "6s",
        "reason": "quick fix", "terminate_sessions": True})
    assert status == 201 and grant["subject"]["terminate_sessions"] is True
    session = served.interactive()
    ends_at = served.approve(grant["id"])["approved_until"]
    assert session.stdin is not None
    session.stdin.write("UPDATE accounts SET balance = 430 WHERE id = 43;\n")
    session.stdin.flush()
    deadline = time.time() + 2
    while _balance(pg, 43) != "430" and time.time() < deadline:
        time.sleep(0.05)
    assert served.psql("UPDATE accounts SET balance = 431 WHERE id = 43").returncode == 0
    time.sleep(max(0.0, ends_at - time.time()) + 1)  # the window passes
    assert _held(served.psql("UPDATE accounts SET balance = 432 WHERE id = 43"))
    assert _balance(pg, 43) == "431"
    out, err = session.communicate("SELECT 'still open';\n", timeout=30)
    assert "UPDATE 1" in out and "still open" not in out
    assert "PV006" in err and f"grant {grant['id']} expired" in err


def test_revoke_with_terminate_sessions_closes_alices_open_psql(served: Served, pg) -> None:
    row = _request_from_psql(served, "SELECT pgvouch.request_access('write', '1h', 'debugging')")
    grant_id = row[0]
    # turn on terminate_sessions through the API instead: a second grant, then revoke that one
    status, grant = served.api("POST", "/grants", "alice", {
        "resource": "app", "account": "app", "kinds": ["write"], "duration": "1h",
        "reason": "debugging", "terminate_sessions": True})
    assert status == 201
    served.approve(grant["id"])
    bob_session = subprocess.Popen([PSQL, "-X", "-At", "-d", served.dsn("bob")], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    session = served.interactive()
    assert session.stdin is not None
    session.stdin.write("UPDATE accounts SET balance = 440 WHERE id = 44;\n")
    session.stdin.flush()
    deadline = time.time() + 10
    while _balance(pg, 44) != "440" and time.time() < deadline:
        time.sleep(0.1)
    assert _balance(pg, 44) == "440"
    status, body = served.api("POST", f"/grants/{grant['id']}/revoke", "dave")
    assert status == 403 and body["error"]["code"] == "not_eligible"
    status, _ = served.api("POST", f"/grants/{grant['id']}/revoke", "alice", {"note": "done"})
    assert status == 200
    out, err = session.communicate("SELECT 'after revoke';\n", timeout=30)
    assert "after revoke" not in out
    assert "PV006" in err and f"grant {grant['id']} was revoked by alice" in err
    out, err = bob_session.communicate("SELECT 'bob stays';\n", timeout=30)
    assert "bob stays" in out  # only the grant holder's sessions are closed
    status, pending = served.api("GET", f"/requests/{grant_id}", "bob")
    assert pending["status"] == "pending"


def test_a_grant_never_overrides_a_deny_rule(served: Served, pg) -> None:
    status, grant = served.api("POST", "/grants", "alice", {
        "resource": "app", "account": "app", "kinds": ["write"], "duration": "1h", "reason": "x"})
    assert status == 201
    served.approve(grant["id"])
    pg.psql("DELETE FROM events WHERE payload LIKE 'jit-%'")
    assert served.psql("INSERT INTO events(payload) VALUES ('jit-1')").returncode == 0
    # the policy now denies writes to events; the running grant (any table) does not override it
    (served.policies / "app.yaml").write_text(POLICY_DENY_EVENTS)
    served.proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 15
    while True:
        result = served.psql("INSERT INTO events(payload) VALUES ('jit-2')")
        if result.returncode != 0 or time.time() > deadline:
            break
        pg.psql("DELETE FROM events WHERE payload = 'jit-2'")
        time.sleep(0.3)
    assert "42501" in result.stderr and "events are append-only" in result.stderr
    assert pg.psql("SELECT count(*) FROM events WHERE payload LIKE 'jit-%'").strip() == "1"
    assert served.psql("UPDATE accounts SET balance = 450 WHERE id = 45").returncode == 0
    # and a new grant for writes is refused outright, naming the deny
    status, body = served.api("POST", "/grants", "alice", {
        "resource": "app", "account": "app", "kinds": ["write"], "duration": "1h", "reason": "x"})
    assert status == 403 and "no event writes" in body["error"]["message"]


def test_convert_a_pending_statement_into_a_grant(served: Served, pg) -> None:
    pg.psql("UPDATE accounts SET balance = 460 WHERE id = 46")
    waiting = subprocess.Popen([PSQL, "-X", "-At", "-d", served.dsn(), "-c",
                                "UPDATE accounts SET balance = 461 WHERE id = 46"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 15
    pending: list[dict[str, Any]] = []
    while not pending and time.time() < deadline:
        pending = served.api("GET", "/requests?status=pending", "alice")[1]["requests"]
        time.sleep(0.1)
    statement_id = pending[0]["id"]
    status, body = served.api("POST", f"/requests/{statement_id}/convert-to-grant", "bob",
                              {"duration": "1h", "reason": "more of these"})
    assert status == 403 and body["error"]["code"] == "not_requester"
    status, body = served.api("POST", f"/requests/{statement_id}/convert-to-grant", "alice",
                              {"duration": "8h", "reason": "more of these"})
    assert status == 400 and "4h" in body["error"]["message"]
    status, body = served.api("POST", f"/requests/{statement_id}/convert-to-grant", "alice",
                              {"duration": "1h", "reason": "more of these"})
    assert status == 201, body
    grant = body["grant"]
    assert body["cancelled"]["status"] == "cancelled"
    assert body["cancelled"]["note"] == f"converted to grant {grant['id']}"
    assert grant["kind"] == "grant" and grant["status"] == "pending"
    assert grant["subject"]["kinds"] == ["write"] and grant["subject"]["tables"] == ["accounts"]
    _, err = waiting.communicate(timeout=30)
    assert f"request {statement_id} is cancelled" in err  # the waiting psql hears it
    served.approve(grant["id"])
    result = served.psql("UPDATE accounts SET balance = 462 WHERE id = 46")
    assert result.returncode == 0, result.stderr
    assert _balance(pg, 46) == "462"


def test_request_access_misuse_is_refused_and_never_forwarded(served: Served) -> None:
    for sql in ["SELECT pgvouch.request_access('write', '1h', 'x'), 1",
                "SELECT * FROM pgvouch.request_access('write', '1h', 'x')",
                "SELECT pgvouch.request_access('write', '1h')",
                "SELECT pgvouch.drop_everything()"]:
        result = served.psql(sql)
        assert result.returncode != 0 and "42601" in result.stderr, (sql, result.stderr)
        assert "request_access('write', '1h', 'incident 4711')" in result.stderr  # the usage hint
        assert "does not exist" not in result.stderr  # the server never saw it
    result = served.psql("SELECT pgvouch.request_access('sideways', '1h', 'x')")
    assert "42601" in result.stderr and "'sideways' is not a kind" in result.stderr

    # over the extended protocol (Parse/Bind/Execute/Sync, as libpq's PQexecParams sends it)
    raw = RawClient(served.port)
    try:
        assert raw.startup("alice", PASSWORDS["alice"])[-1][0] == "Z"
        raw.send(parse("", "SELECT pgvouch.request_access($1, $2, $3)")
                 + bind("", "", (b"write", b"1h", b"x")) + execute() + wire.SYNC)
        answer = raw.read_until_ready()
        errors = [error_fields(body) for kind, body in answer if kind == "E"]
        assert errors[0]["C"] == "0A000" and "simple query" in errors[0]["M"]
        assert answer[-1] == ("Z", b"I")
    finally:
        raw.close()

    async def simple() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=served.port, user="alice",
                                     password=PASSWORDS["alice"], database="app", ssl=False)
        try:
            # asyncpg's execute without arguments uses the simple protocol: that is the command
            assert await conn.execute("SELECT pgvouch.request_access('write', '2h', 'via asyncpg')") \
                == "SELECT 1"
            rows = await conn.fetch("SELECT 1 AS still_fine")
            assert rows[0]["still_fine"] == 1
        finally:
            await conn.close()

    asyncio.run(simple())
    status, body = served.api("GET", "/grants?mine=true", "alice")
    assert status == 200
    assert [g["subject"]["reason"] for g in body["grants"]] == ["via asyncpg"]


def test_a_revocation_made_by_another_replica_also_closes_sessions(served: Served, pg,
                                                                    tmp_path: Path) -> None:
    status, grant = served.api("POST", "/grants", "alice", {
        "resource": "app", "account": "app", "kinds": ["write"], "duration": "1h",
        "reason": "replica test", "terminate_sessions": True})
    assert status == 201
    served.approve(grant["id"])
    session = served.interactive()
    assert session.stdin is not None
    session.stdin.write("UPDATE accounts SET balance = 470 WHERE id = 47;\n")
    session.stdin.flush()

    async def revoke_elsewhere() -> None:
        # another process on the same store: this proxy hears of it only by re-reading the store
        store = await open_store(f"sqlite:///{tmp_path}/approvals.db")
        try:
            await ApprovalService(store, {"alice": ("developers",), "bob": ("dba",)}).revoke(
                grant["id"], "bob", "from replica B")
        finally:
            await store.close()

    deadline = time.time() + 10
    while _balance(pg, 47) != "470" and time.time() < deadline:
        time.sleep(0.1)
    asyncio.run(revoke_elsewhere())
    time.sleep(3)  # the periodic re-read (every 2s) notices
    out, err = session.communicate("SELECT 'after revoke';\n", timeout=30)
    assert "after revoke" not in out and "PV006" in err and f"grant {grant['id']} was revoked" in err
