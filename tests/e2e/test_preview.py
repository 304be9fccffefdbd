"""Impact previews end to end: the real `pgvouch serve`, real psql and asyncpg,
real PostgreSQL, the REST API and a signed-webhook receiver on 127.0.0.1.

A held write gets ``EXPLAIN (FORMAT JSON)`` of the exact statement and its
parameters, run on a separate connection as the same account; the estimated
rows must match what EXPLAIN says directly on the server. Previews never run
the statement, fail visibly without blocking review, and are refreshed before
an approval is accepted on a stale one."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from approvals.model import statement_subject
from proxy.preview import (
    _EXECUTE,
    EXPLAIN_PREFIX,
    Job,
    PreviewError,
    _bind,
    _parse,
    _until_ready,
    explain_one,
    make_preview,
)
from proxy.upstream import connect
from proxy.wire import SYNC
from tests.approvals.helpers import make_request
from tests.conftest import PASSWORDS, PgServer, config_yaml, free_port, make_settings
from tests.e2e.helpers import (
    ALLOW_READS,
    add_tokens,
    api_call,
    deny,
    policy,
    psql_popen,
    review,
    serving,
    write_policies,
)
from tests.e2e.test_review_flow import SECRET, TOKENS, Receiver

POLICY = policy(ALLOW_READS, review("write, ddl"), deny(), name="prod-writes")

SETUP = """
CREATE TABLE IF NOT EXISTS preview_secret (id int);
CREATE TABLE IF NOT EXISTS preview_log (id serial, at timestamptz DEFAULT now());
GRANT ALL ON preview_log TO pgv_scram;
GRANT ALL ON SEQUENCE preview_log_id_seq TO pgv_scram;
CREATE OR REPLACE FUNCTION preview_side_effect() RETURNS int LANGUAGE sql VOLATILE
    AS $$ INSERT INTO preview_log DEFAULT VALUES RETURNING 0 $$;
ANALYZE accounts;
"""


@dataclass
class Served:
    port: int
    api_port: int
    receiver: Receiver
    log: Path

    def api(self, method: str, path: str, user: str = "bob", body: dict | None = None
            ) -> tuple[int, Any]:
        return api_call(self.api_port, method, path, token=TOKENS[user], body=body)

    def psql(self, sql: str) -> subprocess.Popen[str]:
        return psql_popen(self.port, sql)

    def pending(self, timeout: float = 15) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            status, body = self.api("GET", "/api/v1/requests?status=pending")
            assert status == 200
            if body["requests"]:
                return body["requests"][0]
            time.sleep(0.1)
        raise AssertionError("no pending request")

    def previewed(self, request_id: str, timeout: float = 15) -> dict:
        """The request once its preview is attached."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            status, body = self.api("GET", f"/api/v1/requests/{request_id}")
            assert status == 200
            if body["preview"] is not None:
                return body
            time.sleep(0.1)
        raise AssertionError(f"no preview attached to {request_id}")

    def webhook(self, event: str, request_id: str, timeout: float = 15) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = [e for e in self.receiver.events
                     if e["event"] == event and e["request"]["id"] == request_id]
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError(f"no {event} webhook for {request_id}")


def _serve(pg: PgServer, tmp_path: Path, preview: str = "") -> Iterator[Served]:
    pg.psql(SETUP)
    policies = write_policies(tmp_path / "policies", POLICY)
    receiver = Receiver()
    port, api_port = free_port(), free_port()
    extra = (
        f"policies: {policies}\n"
        f"store: sqlite:///{tmp_path}/approvals.db\n"
        "hold: {wait_timeout: 60s, heartbeat: 30s}\n"
        "limits: {drain_timeout: 1s}\n"
        f"notify: {{webhooks: [{{url: 'http://127.0.0.1:{receiver.port}/hook', "
        "secret_env: PGV_TEST_WEBHOOK_SECRET}]}\n"
        f"{preview}"
    )
    cfg = tmp_path / "pgvouch.yaml"
    cfg.write_text(add_tokens(config_yaml(pg, port=port, api_port=api_port, extra=extra), TOKENS))
    log = tmp_path / "serve.log"
    env = dict(os.environ, PGV_TEST_WEBHOOK_SECRET=SECRET)
    # the API starts after the proxy listens
    with serving(cfg, (port, api_port), log=log, log_stdout=True, env=env):
        yield Served(port, api_port, receiver, log)


@pytest.fixture
def served(pg: PgServer, tmp_path: Path) -> Iterator[Served]:
    yield from _serve(pg, tmp_path)


@pytest.fixture
def served_stale(pg: PgServer, tmp_path: Path) -> Iterator[Served]:
    yield from _serve(pg, tmp_path, preview="preview: {stale_after: 2s}\n")


def direct_estimate(pg: PgServer, sql: str) -> int:
    """Rows PostgreSQL estimates for a write, from plain text EXPLAIN run directly.

    The top line is the ModifyTable node (rows=0 without RETURNING); the
    node under it produces the rows that change.
    """
    lines = pg.psql(f"EXPLAIN {sql}").splitlines()
    scan = next(line for line in lines if line.lstrip().startswith("->"))
    match = re.search(r"rows=(\d+)", scan)
    assert match, lines
    return int(match.group(1))


def _count(pg: PgServer, sql: str) -> str:
    return pg.psql(sql).strip()


# -- the tests ---------------------------------------------------------------------------


def test_a_held_psql_update_gets_the_planner_estimate_in_api_and_webhook(served: Served, pg) -> None:
    sql = "UPDATE accounts SET balance = balance WHERE id <= 40"  # other tests rely on the values
    versions = "SELECT string_agg(xmin::text, ',' ORDER BY id) FROM accounts WHERE id <= 40"
    before = _count(pg, versions)
    psql = served.psql(sql)
    rid = served.pending()["id"]
    body = served.previewed(rid)
    preview = body["preview"]
    expected = direct_estimate(pg, sql)
    assert expected > 1
    assert preview["status"] == "ok" and preview["stale"] is False
    assert preview["estimated_rows"] == expected
    [entry] = preview["statements"]
    assert entry["sql"] == sql and entry["estimated_rows"] == expected and entry["error"] is None
    assert entry["plan"]["Node Type"] == "ModifyTable" and entry["plan"]["Operation"] == "Update"
    assert entry["plan"]["Relation Name"] == "accounts"
    # nothing ran: the preview is a plan, not an execution
    assert _count(pg, versions) == before
    # the webhook of the preview carries it too (signed, like every delivery)
    [hook] = served.webhook("request.previewed", rid)
    assert hook["request"]["preview"]["estimated_rows"] == expected
    assert hook["request"]["preview"]["statements"][0]["plan"]["Relation Name"] == "accounts"
    assert hook["data"]["trigger"] == "created" and hook["actor"] == "system"
    assert served.receiver.bad_signatures == 0
    # the audit log has it
    status, audit = served.api("GET", "/api/v1/audit")
    assert status == 200
    previewed = [e for e in audit["events"] if e["type"] == "request.previewed"
                 and e["request_id"] == rid]
    assert len(previewed) == 1 and previewed[0]["data"]["event"]["estimated_rows"] == expected
    # the fresh preview is kept as is on approval; the statement then runs
    status, approved = served.api("POST", f"/api/v1/requests/{rid}/approve", "bob", {})
    assert status == 200 and approved["status"] == "approved"
    assert approved["preview"]["at"] == preview["at"]
    out, err = psql.communicate(timeout=30)
    assert "UPDATE 40" in out, (out, err)
    assert _count(pg, versions) != before
    # the account's password never shows in the proxy's log
    assert os.environ["PGV_SCRAM_PASSWORD"] not in served.log.read_text()


def test_asyncpg_bound_parameters_are_explained_as_sent(served: Served, pg) -> None:
    result: dict[str, Any] = {}

    async def client() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=served.port, user="alice",
                                     password=PASSWORDS["alice"], database="app", ssl=False)
        try:
            # binary int4 and text parameters, exactly as asyncpg binds them
            result["status"] = await conn.execute(
                "UPDATE accounts SET owner = $1 WHERE id < $2 AND owner <> $1", "previewed", 30)
        except Exception as exc:  # denied below
            result["error"] = exc
        finally:
            await conn.close()

    thread = threading.Thread(target=lambda: asyncio.run(client()), daemon=True)
    thread.start()
    rid = served.pending()["id"]
    body = served.previewed(rid)
    params = body["subject"]["params"]
    assert [p["format"] for p in params] == ["binary", "binary"]
    expected = direct_estimate(pg, "UPDATE accounts SET owner = 'previewed' WHERE id < 30 "
                                   "AND owner <> 'previewed'")
    assert body["preview"]["status"] == "ok"
    assert body["preview"]["estimated_rows"] == expected
    # a different bound value gives a different estimate: the values really are bound
    assert expected != direct_estimate(pg, "UPDATE accounts SET owner = 'previewed' WHERE id < 90 "
                                           "AND owner <> 'previewed'")
    status, _ = served.api("POST", f"/api/v1/requests/{rid}/deny", "bob", {"note": "no"})
    assert status == 200
    thread.join(30)
    assert "denied by bob" in str(result.get("error"))
    assert _count(pg, "SELECT count(*) FROM accounts WHERE owner = 'previewed'") == "0"


def test_a_failing_explain_is_shown_and_the_request_stays_approvable(served: Served, pg) -> None:
    psql = served.psql("UPDATE preview_secret SET id = 2 WHERE id = 1")
    rid = served.pending()["id"]
    preview = served.previewed(rid)["preview"]
    assert preview["status"] == "failed" and preview["estimated_rows"] is None
    [entry] = preview["statements"]
    assert entry["status"] == "failed" and entry["plan"] is None
    assert "permission denied for table preview_secret" in entry["error"]
    assert "42501" in entry["error"]
    [hook] = served.webhook("request.previewed", rid)
    assert hook["request"]["preview"]["status"] == "failed"
    # a failed preview is not stale: the approval is accepted without another EXPLAIN
    status, approved = served.api("POST", f"/api/v1/requests/{rid}/approve", "carol", {})
    assert status == 200 and approved["status"] == "approved"
    assert approved["preview"]["at"] == preview["at"]
    _, err = psql.communicate(timeout=30)
    assert "permission denied for table preview_secret" in err  # the statement's own fate


def test_the_preview_never_executes_the_statement_or_its_functions(served: Served, pg) -> None:
    log_before = _count(pg, "SELECT count(*) FROM preview_log")
    balance = _count(pg, "SELECT balance FROM accounts WHERE id = 3")
    psql = served.psql("UPDATE accounts SET balance = balance + 7 + preview_side_effect() WHERE id = 3; "
                       "CREATE TABLE preview_never_created (x int)")
    rid = served.pending()["id"]
    preview = served.previewed(rid)["preview"]
    first, second = preview["statements"]
    assert first["status"] == "ok" and first["estimated_rows"] == 1
    assert second["status"] == "not_applicable" and "CreateStmt" in second["error"]
    assert preview["status"] == "ok" and preview["estimated_rows"] == 1
    assert _count(pg, "SELECT count(*) FROM preview_log") == log_before
    assert _count(pg, "SELECT balance FROM accounts WHERE id = 3") == balance
    assert _count(pg, "SELECT to_regclass('preview_never_created') IS NULL") == "t"
    status, _ = served.api("POST", f"/api/v1/requests/{rid}/deny", "bob", {"note": "no"})
    assert status == 200
    psql.communicate(timeout=30)
    assert _count(pg, "SELECT count(*) FROM preview_log") == log_before


def test_a_stale_preview_is_refreshed_before_the_approval_is_accepted(served_stale: Served, pg) -> None:
    served = served_stale
    psql = served.psql("UPDATE accounts SET balance = balance WHERE id BETWEEN 10 AND 19")
    rid = served.pending()["id"]
    first = served.previewed(rid)["preview"]
    time.sleep(2.2)
    status, body = served.api("GET", f"/api/v1/requests/{rid}")
    assert status == 200 and body["preview"]["stale"] is True and body["preview"]["at"] == first["at"]
    # alice may not approve her own request: refused at once, and no EXPLAIN is made for it
    status, refused = served.api("POST", f"/api/v1/requests/{rid}/approve", "alice", {})
    assert status == 403 and refused["error"]["code"] == "cannot_self_approve"
    status, body = served.api("GET", f"/api/v1/requests/{rid}")
    assert body["preview"]["at"] == first["at"]
    status, approved = served.api("POST", f"/api/v1/requests/{rid}/approve", "bob", {})
    assert status == 200 and approved["status"] == "approved"
    refreshed = approved["preview"]
    assert refreshed["at"] > first["at"] and refreshed["status"] == "ok"
    assert refreshed["estimated_rows"] == first["estimated_rows"]
    status, audit = served.api("GET", "/api/v1/audit")
    events = [e for e in audit["events"] if e["request_id"] == rid]
    kinds = [e["type"] for e in events]
    # the refresh is recorded before the vote that it was made for
    assert kinds.index("request.voted") > max(i for i, k in enumerate(kinds) if k == "request.previewed")
    refresh = [e for e in events if e["type"] == "request.previewed"][-1]["data"]["event"]
    assert refresh["trigger"] == "approve" and refresh["requested_by"] == "bob"
    assert refresh["previous_at"] == first["at"] and refresh["preview_at"] == refreshed["at"]
    hooks = served.webhook("request.previewed", rid)
    deadline = time.time() + 10
    while len(hooks) < 2 and time.time() < deadline:
        time.sleep(0.1)
        hooks = served.webhook("request.previewed", rid)
    assert [h["data"]["trigger"] for h in hooks] == ["created", "approve"]
    out, err = psql.communicate(timeout=30)
    assert "UPDATE 10" in out, (out, err)


# -- the EXPLAIN exchange itself, against the real server ---------------------------------------


def _request(pg: PgServer, tmp_path: Path, sql: str, params: list[dict],
             indexes: list[int] | None = None) -> tuple[Any, Any]:
    subject = statement_subject(sql=sql, params=params, kinds=["write"], tables=[],
                                session={"search_path": None, "role": None, "database": "app"})
    subject["statements"] = [{"sql": sql, "param_indexes": list(range(len(params)))
                              if indexes is None else indexes}]
    request = make_request(subject=subject, resource="app", account="app")
    return make_settings(pg, tmp_path), request


async def test_explain_followed_by_another_command_is_refused_and_runs_nothing(
        pg: PgServer, tmp_path: Path) -> None:
    pg.psql("CREATE TABLE IF NOT EXISTS preview_victim (x int)")
    sql = "UPDATE accounts SET balance = balance WHERE id = $1; DROP TABLE preview_victim"
    settings, request = _request(pg, tmp_path, sql, [{"type_oid": 23, "format": "text", "value": "1"}])
    doc = await make_preview(settings, request, time.time)
    assert doc["status"] == "failed"
    assert "cannot tell the statements of this text apart" in doc["statements"][0]["error"]
    resource = settings.resources["app"]
    upstream = await connect(resource, resource.accounts["app"], {})
    try:
        # our own check refuses it before anything is sent ...
        with pytest.raises(PreviewError, match="not a single statement"):
            await explain_one(upstream, Job(sql))
        # ... and PostgreSQL's Parse refuses several commands in one prepared statement anyway
        upstream.protocol.write(_parse(EXPLAIN_PREFIX + sql, [23]) + _bind([0], [b"1"]) + _EXECUTE
                                + SYNC)
        _, error = await _until_ready(upstream)
        assert error is not None and "cannot insert multiple commands into a prepared statement" in error
    finally:
        upstream.protocol.close()
    assert _count(pg, "SELECT to_regclass('preview_victim') IS NOT NULL") == "t"


async def test_a_parameter_that_does_not_fit_its_type_is_a_failed_preview(
        pg: PgServer, tmp_path: Path) -> None:
    sql = "UPDATE accounts SET balance = balance WHERE id = $1"
    # int4 in binary is 4 bytes; two are sent
    settings, request = _request(pg, tmp_path, sql, [{"type_oid": 23, "format": "binary",
                                                      "value": "0001"}])
    doc = await make_preview(settings, request, time.time)
    assert doc["status"] == "failed"
    assert "insufficient data left in message" in doc["statements"][0]["error"]
    settings, request = _request(pg, tmp_path, sql, [{"type_oid": 23, "format": "text",
                                                      "value": "seven"}])
    doc = await make_preview(settings, request, time.time)
    assert doc["status"] == "failed"
    assert 'invalid input syntax for type integer: "seven" (SQLSTATE 22P02)' in \
        doc["statements"][0]["error"]
    # the same statement with a well-formed value is explained
    settings, request = _request(pg, tmp_path, sql, [{"type_oid": 23, "format": "binary",
                                                      "value": "00000001"}])
    doc = await make_preview(settings, request, time.time)
    assert doc["status"] == "ok" and doc["estimated_rows"] == 1


async def test_an_unreachable_upstream_is_a_failed_preview(pg: PgServer, tmp_path: Path) -> None:
    _, request = _request(pg, tmp_path, "UPDATE accounts SET balance = 1 WHERE id = 1", [])
    settings = make_settings(pg, tmp_path, upstream_port=free_port())
    doc = await make_preview(settings, request, time.time)
    assert doc["status"] == "failed"
    assert "cannot connect to resource 'app'" in doc["statements"][0]["error"]


async def test_a_long_script_is_previewed_up_to_the_limit(pg: PgServer, tmp_path: Path) -> None:
    from approvals import preview

    sql = "; ".join(f"UPDATE accounts SET balance = balance WHERE id = {i}" for i in range(1, 26))
    settings, request = _request(pg, tmp_path, sql, [])
    doc = await make_preview(settings, request, time.time)
    assert len(doc["statements"]) == preview.MAX_STATEMENTS == 20
    assert doc["statements_omitted"] == 5
    assert doc["status"] == "ok" and doc["estimated_rows"] == 20
    assert doc["statements"][19]["sql"] == "UPDATE accounts SET balance = balance WHERE id = 20"
    assert all(len(json.dumps(s["plan"])) <= preview.plan_budget(20) for s in doc["statements"])
