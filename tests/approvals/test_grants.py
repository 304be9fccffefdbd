"""JIT grant requests: the checks against the policies (``approvals.grants``), the REST
routes over real HTTP on 127.0.0.1 with a real SQLite store (every answer checked against
the published OpenAPI document), coverage of a statement by a grant, and the psql
command's recognition. The end-to-end flow through the proxy is ``tests/e2e/test_jit_grants.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from approvals.api import API_PREFIX, add_approval_routes
from approvals.grants import (
    GrantAsk,
    GrantDesk,
    GrantError,
    grant_classification,
    parse_grant_duration,
    parse_kinds,
    parse_tables,
)
from approvals.model import Status
from approvals.service import ApprovalService
from approvals.store import open_store
from config.settings import Account, Resource
from policies.classify import classify
from policies.loader import load_policies
from proxy.grant_command import AccessCall, Refusal, literal, read_command
from proxy.grant_coverage import covers
from tests.approvals.api_harness import ApiEnv, Clock, make_settings
from tests.approvals.helpers import DIRECTORY, HOUR, statement

POLICY = """
policies:
  - name: prod
    match: {resources: ["prod-db"]}
    rules:
      - when: {kinds: [read, session]}
        action: allow
      - name: payments are off limits
        when: {kinds: [write], tables: ["public.payments*"]}
        action: deny
      - name: writes
        when: {kinds: [write]}
        action: review
        approval: {steps: [{name: DBA review, approvers: ["group:dba"], required: 1}], expires_after: 2h}
        jit: {max_duration: 4h}
      - name: ddl
        when: {kinds: [ddl]}
        action: review
        approval: {steps: [{name: DBA review, approvers: ["group:dba"], required: 1}]}
  - name: security
    match: {resources: ["prod-db"]}
    rules:
      - when: {kinds: [write], tables: ["public.users"]}
        action: review
        approval: {steps: [{name: security, approvers: ["group:security"], required: 1}]}
        jit: {max_duration: 1h}
defaults: {action: deny}
"""


@asynccontextmanager
async def grant_api(tmp_path: Path, *, with_desk: bool = True) -> AsyncIterator[tuple[ApiEnv, GrantDesk]]:
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / "prod.yaml").write_text(POLICY)
    policy_set = load_policies(tmp_path / "policies", users=DIRECTORY)
    url = f"sqlite:///{tmp_path / 'grants.db'}"
    store = await open_store(url)
    clock = Clock()
    accounts = {"app": Account("app", "app"), "admin": Account("admin", "admin", allow=("group:dba",))}
    settings = replace(make_settings(store=url), resources={
        "prod-db": Resource("prod-db", "127.0.0.1", 5432, "prod", "app", accounts)})
    service = ApprovalService(store, DIRECTORY, clock=clock)
    desk = GrantDesk(service, settings, lambda: policy_set)
    app = web.Application()
    add_approval_routes(app, service, settings, desk if with_desk else None)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        env = ApiEnv(client, service, store, clock, settings)
        env.doc = await (await client.get(API_PREFIX + "/openapi.json")).json()
        yield env, desk
    finally:
        await client.close()
        await store.close()


def _ask(**changes: object) -> dict[str, object]:
    body: dict[str, object] = {"resource": "prod-db", "account": "app", "kinds": ["write"],
                               "tables": ["public.orders"], "duration": "1h", "reason": "incident 4711"}
    body.update(changes)
    return body


# -- parsing -------------------------------------------------------------------------


def test_parsing_kinds_tables_and_durations() -> None:
    assert parse_kinds("Write, ddl,write") == ("write", "ddl")
    assert parse_tables("public.Orders*, refunds,") == ("public.orders*", "refunds")
    assert parse_tables(None) == ()
    assert parse_grant_duration("1h30m") == 5400 and parse_grant_duration("2s") == 2
    for bad in (lambda: parse_kinds("writes"), lambda: parse_kinds(""), lambda: parse_tables(["*"]),
                lambda: parse_tables(["a b"]), lambda: parse_grant_duration("0s"),
                lambda: parse_grant_duration("an hour")):
        with pytest.raises(GrantError) as info:
            bad()
        assert info.value.code == "invalid_grant"


def test_a_grant_without_tables_stands_for_any_table() -> None:
    statements = grant_classification(["write", "ddl"], ()).statements
    assert [(str(s.kind), s.tables) for s in statements] == [("write", ("*",)), ("ddl", ("*",))]


# -- requesting through the API -----------------------------------------------------------


async def test_request_approve_list_and_revoke(tmp_path: Path) -> None:
    async with grant_api(tmp_path) as (env, _):
        reply = await env.call("POST", "/grants", user="alice",
                               body=_ask(tables=["public.orders*"], terminate_sessions=True))
        assert reply.status == 201, reply.body
        grant = reply.body
        assert grant["kind"] == "grant" and grant["status"] == "pending" and grant["requester"] == "alice"
        assert grant["subject"] == {"kinds": ["write"], "tables": ["public.orders*"], "duration": 3600.0,
                                    "reason": "incident 4711", "terminate_sessions": True}
        assert [s["name"] for s in grant["steps"]] == ["DBA review"]
        assert grant["expires_at"] == pytest.approx(env.clock() + 2 * HOUR)  # the rule's expires_after
        env.clock.advance(600)  # the window starts at approval, not at the request
        approved = await env.call("POST", f"/requests/{grant['id']}/approve", user="bob", body={})
        assert approved.body["approved_until"] == pytest.approx(env.clock() + HOUR)
        active = await env.call("GET", "/grants?active=true&mine=true", user="alice")
        assert [g["id"] for g in active.body["grants"]] == [grant["id"]]
        assert (await env.call("GET", "/grants?mine=1", user="bob")).body["grants"] == []
        assert (await env.call("GET", "/grants?active=maybe", user="bob")).code == "bad_request"
        refused = await env.call("POST", f"/grants/{grant['id']}/revoke", user="dave")
        assert (refused.status, refused.code) == (403, "not_eligible")
        revoked = await env.call("POST", f"/grants/{grant['id']}/revoke", user="alice", body={"note": "done"})
        assert revoked.body["status"] == "revoked" and revoked.body["note"] == "done"
        assert (await env.call("GET", "/grants?active=true", user="bob")).body["grants"] == []
        env.clock.advance(2 * HOUR)
        assert (await env.call("GET", "/grants", user="bob")).body["grants"][0]["status"] == "revoked"


async def test_refusals_say_why(tmp_path: Path) -> None:
    async with grant_api(tmp_path) as (env, _):
        cases = [
            (_ask(duration="5h"), 400, "duration_too_long", "at most 4h"),
            (_ask(tables=["public.users"], duration="2h"), 400, "duration_too_long", "at most 1h"),
            (_ask(kinds=["ddl"]), 403, "grant_not_allowed", 'policy "prod" rule ddl has no jit'),
            (_ask(tables=[]), 403, "grant_denied", '"prod" rule payments are off limits'),  # any table
            (_ask(kinds=["read", "session"]), 409, "no_approval_needed", "no approval needed"),
            (_ask(resource="nope"), 400, "unknown_resource", '"nope"'),
            (_ask(account="ghost"), 400, "unknown_resource", '"ghost"'),
            (_ask(account="admin"), 403, "account_not_allowed", "alice"),
            (_ask(kinds=["sideways"]), 400, "invalid_grant", "not a kind"),
            (_ask(duration="soon"), 400, "invalid_grant", "duration"),
            (_ask(kinds="write"), 201, None, None),  # a comma-separated string is fine too
            (_ask(terminate_sessions="yes"), 400, "bad_request", "terminate_sessions"),
            ({"resource": "prod-db"}, 400, "bad_request", "missing"),
        ]
        for body, status, code, text in cases:
            reply = await env.call("POST", "/grants", user="alice", body=body)
            assert (reply.status, reply.code) == (status, code), (body, reply.body)
            if text:
                assert text in reply.body["error"]["message"], reply.body
        # bob (a DBA) may use the admin account; his grant needs the other DBA
        bob = await env.call("POST", "/grants", user="bob",
                             body=_ask(account="admin"))
        assert bob.status == 201 and bob.body["may_vote"] == ["carol", "frank"]
        # both policies' steps apply to a grant on users, and the smaller cap
        both = await env.call("POST", "/grants", user="alice", body=_ask(tables=["public.users"]))
        assert [s["name"] for s in both.body["steps"]] == ["DBA review", "security"]


async def test_convert_a_pending_statement(tmp_path: Path) -> None:
    async with grant_api(tmp_path) as (env, _):
        pending = await env.submit(resource="prod-db", subject=statement())
        body = {"duration": "1h", "reason": "more to fix"}
        other = await env.call("POST", f"/requests/{pending.id}/convert-to-grant", user="bob", body=body)
        assert (other.status, other.code) == (403, "not_requester")
        reply = await env.call("POST", f"/requests/{pending.id}/convert-to-grant", user="alice", body=body)
        assert reply.status == 201, reply.body
        grant, cancelled = reply.body["grant"], reply.body["cancelled"]
        assert cancelled["id"] == pending.id and cancelled["status"] == "cancelled"
        assert cancelled["note"] == f"converted to grant {grant['id']}"
        assert grant["subject"]["kinds"] == ["write"] and grant["subject"]["tables"] == ["public.accounts"]
        again = await env.call("POST", f"/requests/{pending.id}/convert-to-grant", user="alice", body=body)
        assert (again.status, again.code) == (409, "not_pending")
        granted = await env.call("POST", f"/requests/{grant['id']}/convert-to-grant", user="alice", body=body)
        assert granted.code == "wrong_subject"
        missing = await env.call("POST", "/requests/R-00000/convert-to-grant", user="alice", body=body)
        assert missing.status == 404


async def test_without_policies_grant_requests_are_unavailable(tmp_path: Path) -> None:
    async with grant_api(tmp_path, with_desk=False) as (env, _):
        reply = await env.call("POST", "/grants", user="alice", body=_ask())
        assert (reply.status, reply.code) == (503, "grants_unavailable")
        assert (await env.call("GET", "/grants", user="alice")).status == 200


async def test_the_desk_directly(tmp_path: Path) -> None:
    async with grant_api(tmp_path) as (env, desk):
        ask = GrantAsk(user="alice", resource="prod-db", account="app", kinds=("write",),
                       tables=("public.orders",), duration=HOUR, reason="x")
        grant = await desk.request(ask)
        stored = await env.store.get(grant.id)
        assert stored is not None and stored.status is Status.PENDING and stored.approved_ttl == HOUR


# -- coverage and the psql command ---------------------------------------------------------


def _grant_with(kinds: list[str], tables: list[str]) -> object:
    from approvals.model import grant_subject
    from tests.approvals.helpers import make_request

    base = make_request()
    return replace(base, subject=grant_subject(kinds=kinds, tables=tables, duration=HOUR, reason="x"))


def test_coverage_by_kind_and_table() -> None:
    write_any = _grant_with(["write"], [])
    orders = _grant_with(["write"], ["public.orders*"])
    update = classify("UPDATE public.orders_2024 SET x = 1 WHERE id = 1")
    assert covers(write_any, update) and covers(orders, update)  # type: ignore[arg-type]
    assert not covers(orders, classify("UPDATE orders SET x = 1 WHERE id = 1"))  # type: ignore[arg-type]
    assert not covers(orders, classify("UPDATE public.refunds SET x = 1 WHERE id = 1"))  # type: ignore[arg-type]
    assert not covers(write_any, classify("CREATE TABLE t (x int)"))  # type: ignore[arg-type]
    mixed = classify("UPDATE public.orders SET x = 1 WHERE id = 1; CREATE TABLE t (x int)")
    assert not covers(write_any, mixed)  # type: ignore[arg-type]
    assert covers(_grant_with(["write", "ddl"], []), mixed)  # type: ignore[arg-type]
    # statements the policies allowed on their own need no cover; those under review do
    wrapped = classify("BEGIN; UPDATE public.orders SET x = 1 WHERE id = 1; COMMIT")
    assert not covers(write_any, wrapped)  # type: ignore[arg-type]
    assert covers(write_any, wrapped, reviewed={1})  # type: ignore[arg-type]
    assert not covers(write_any, mixed, reviewed={1})  # type: ignore[arg-type]  # the DDL is reviewed
    assert not covers(write_any, wrapped, reviewed=set())  # type: ignore[arg-type]  # nothing to cover


def test_the_psql_command_is_recognised_exactly() -> None:
    assert read_command("SELECT pgvouch.request_access('write', '1h', 'incident 4711')") == \
        AccessCall("write", "1h", "incident 4711", None)
    assert read_command("select PGVOUCH.REQUEST_ACCESS('write,ddl', '30m', 'x', 'public.a*')") == \
        AccessCall("write,ddl", "30m", "x", "public.a*")
    for sql in ["SELECT 1", "SELECT 'pgvouch.request_access(1)'", "SELECT * FROM pgvouch.requests",
                "INSERT INTO log VALUES ('call pgvouch')"]:
        assert read_command(sql) is None, sql
    for sql in ["SELECT pgvouch.request_access('write', '1h', 'x'), 1",
                "SELECT pgvouch.request_access('write', '1h', 'x') AS a FROM t",
                "SELECT pgvouch.request_access('write', '1h')",
                "SELECT pgvouch.request_access('write', '1h', 'x', 't', 'u')",
                "SELECT pgvouch.request_access('write', '1h', 'x'::text)",
                "SELECT pgvouch.request_access('write', '1h', NULL)",
                "SELECT pgvouch.request_access('write', '1h', 'x'); SELECT 1",
                "SELECT * FROM pgvouch.request_access('write', '1h', 'x')",
                "CALL pgvouch.request_access('write', '1h', 'x')",
                "UPDATE t SET a = pgvouch.other(1)",
                'SELECT U&"\\0070gvouch".request_access(\'write\', \'1h\', \'x\', \'y\', \'z\')',
                "SELECT pgvouch.request_access('write', '1h', 'x' "]:
        assert isinstance(read_command(sql), Refusal), sql


def test_literals_are_quoted_and_kept_to_safe_text() -> None:
    assert literal("it's R-7KQ2X") == "'it''s R-7KQ2X'"
    assert literal("a\\b\nc\x00") == "'a?b?c?'"
    assert len(literal("x" * 2000)) == 502
