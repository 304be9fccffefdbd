"""The approvers' REST API over real HTTP on 127.0.0.1 and a real SQLite store.

Every answer is checked against the OpenAPI document the server publishes
(``api_harness``), so these tests also keep that document honest.
"""

from __future__ import annotations

import asyncio
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from approvals import workflow
from approvals.api import CODE_STATUS, OPENAPI, approvals_app, parse_timestamp
from approvals.auth import TokenAuthenticator, bearer_token, new_token, token_hash
from approvals.model import Status
from approvals.service import ApprovalService
from approvals.sqlite_store import SqliteStore
from config.settings import User, Webhook
from tests.approvals import openapi_check
from tests.approvals.api_harness import WEBHOOK_SECRET_ENV, ApiEnv, make_settings, running_api, token_of
from tests.approvals.helpers import DBA, HOUR, StepDef, statement

QUORUM = StepDef("two DBAs", ("group:dba",), required=2)
SECURITY = StepDef("security", ("group:security",))


@pytest.fixture
async def env(tmp_path: Path):
    async with running_api(tmp_path) as running:
        yield running


# -- the document ----------------------------------------------------------------


def test_every_workflow_code_has_an_http_status() -> None:
    assert set(workflow.Code) <= set(CODE_STATUS)
    assert CODE_STATUS["cannot_self_approve"] == CODE_STATUS["not_eligible"] == 403
    assert CODE_STATUS["already_reviewed"] == CODE_STATUS["not_pending"] == CODE_STATUS["expired"] == 409


def test_the_document_is_self_consistent() -> None:
    assert OPENAPI["openapi"].startswith("3.1")
    for ref in openapi_check.all_refs(OPENAPI):
        openapi_check.resolve(OPENAPI, ref)  # every $ref points somewhere
    codes = OPENAPI["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
    assert set(codes) == {str(code) for code in CODE_STATUS}


def test_the_document_lists_exactly_the_routes_served(tmp_path: Path) -> None:
    service = ApprovalService(SqliteStore(tmp_path / "unused.db"), {})
    app = approvals_app(service, make_settings())
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {(method, path) for path, item in OPENAPI["paths"].items() for method in item}
    assert served == documented


def test_the_checker_catches_answers_the_document_does_not_allow() -> None:
    error = {"error": {"code": "not_found", "message": "no request R-1"}}
    openapi_check.check_response(OPENAPI, "GET", "/requests/R-1", 404, error)
    for status, body in [
        (404, {"error": {"code": "no_such_code", "message": "x"}}),
        (404, {"error": {"code": "not_found"}}),
        (404, {"error": {"code": "not_found", "message": "x", "extra": 1}}),
        (418, error),
        (200, {"id": "R-1"}),
    ]:
        with pytest.raises(openapi_check.SchemaViolation):
            openapi_check.check_response(OPENAPI, "GET", "/requests/R-1", status, body)
    with pytest.raises(openapi_check.SchemaViolation):
        openapi_check.check_response(OPENAPI, "DELETE", "/requests/R-1", 200, {})
    openapi_check.check_request_body(OPENAPI, "POST", "/hooks/x",
                                     {"request_id": "R-1", "approver": "bob", "decision": "approve"})
    with pytest.raises(openapi_check.SchemaViolation):
        openapi_check.check_request_body(OPENAPI, "POST", "/hooks/x", {"request_id": "R-1"})


async def test_the_document_is_served_without_a_token(env: ApiEnv) -> None:
    reply = await env.call("GET", "/openapi.json")
    assert reply.status == 200
    assert reply.body == json.loads(json.dumps(OPENAPI))


# -- authentication ----------------------------------------------------------------


async def test_me(env: ApiEnv) -> None:
    reply = await env.call("GET", "/me", user="carol")
    assert (reply.status, reply.body) == (200, {"name": "carol", "groups": ["dba", "security"], "roles": []})
    frank = await env.call("GET", "/me", user="frank")
    assert frank.body["roles"] == ["owner"]


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Bearer wrong-token", "Basic Ym9iOmJvYg==", "bearer  x y",
     f"Token {token_of('bob')}", "Bearer " + "x" * 5000],
)
async def test_calls_without_a_valid_token_are_refused(env: ApiEnv, authorization: str | None) -> None:
    request = await env.submit()
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in [("GET", "/me"), ("GET", "/requests"), ("GET", f"/requests/{request.id}"),
                         ("POST", f"/requests/{request.id}/approve"), ("GET", "/audit"),
                         ("GET", "/audit/verify"), ("GET", "/deliveries")]:
        reply = await env.call(method, path, headers=headers)
        assert (reply.status, reply.code) == (401, "unauthorized"), (method, path)
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await env.service.store.get(request.id)).votes == ()  # type: ignore[union-attr]


async def test_the_scheme_is_case_insensitive(env: ApiEnv) -> None:
    reply = await env.call("GET", "/me", headers={"Authorization": f"bearer {token_of('bob')}"})
    assert reply.body["name"] == "bob"


def test_tokens_are_kept_only_as_hashes() -> None:
    token = new_token()
    assert token.startswith("pgv_") and len(token) > 40
    assert new_token() != token
    users = {"bob": User("bob", api_token_sha256=token_hash(token)), "dave": User("dave")}
    auth = TokenAuthenticator(users)
    assert auth.authenticate(f"Bearer {token}") is users["bob"]
    assert auth.authenticate(f"Bearer {token_hash(token)}") is None  # the hash is not the token
    assert auth.authenticate("Bearer ") is None
    assert bearer_token("Bearer a b") is None


# -- reading requests ---------------------------------------------------------------


async def test_a_request_shows_votes_progress_time_left_and_who_may_vote(env: ApiEnv) -> None:
    request = await env.submit(steps=[QUORUM, SECURITY])
    env.clock.advance(60)
    await env.call("POST", f"/requests/{request.id}/approve", user="bob", body={"note": "looks fine"})
    reply = await env.call("GET", f"/requests/{request.id.lower()}", user="carol")
    assert reply.status == 200
    shown = reply.body
    assert (shown["id"], shown["status"], shown["requester"]) == (request.id, "pending", "alice")
    assert shown["subject"]["sql"] == statement()["sql"]
    assert shown["subject"]["params"] == [{"type_oid": 23, "format": "text", "value": "7"}]
    assert shown["current_step"] == 0
    assert [s["progress"] for s in shown["steps"]] == ["1/2", "0/1"]
    assert shown["steps"][0]["approved_by"] == ["bob"]
    assert shown["may_vote"] == shown["steps"][0]["may_vote"] == ["carol", "frank"]
    assert shown["steps"][1]["eligible"] == ["carol", "erin"]
    assert shown["votes"] == [
        {"user": "bob", "decision": "approve", "note": "looks fine", "step": 0, "at": env.clock.now}
    ]
    assert shown["time_left"] == pytest.approx(8 * HOUR - 60)
    assert shown["time_left_text"] == "7h59m"
    assert "step 1/2 'two DBAs' has 1/2 approvals" in shown["summary"]
    assert shown["viewer"] == {"name": "carol", "is_requester": False, "may_vote": True, "voted": None}
    as_bob = await env.call("GET", f"/requests/{request.id}", user="bob")
    assert as_bob.body["viewer"] == {"name": "bob", "is_requester": False, "may_vote": False,
                                     "voted": "approve"}
    as_alice = await env.call("GET", f"/requests/{request.id}", user="alice")
    assert as_alice.body["viewer"]["is_requester"] is True
    assert as_alice.body["viewer"]["may_vote"] is False


async def test_unknown_and_malformed_request_ids(env: ApiEnv) -> None:
    reply = await env.call("GET", "/requests/R-ZZZZZ", user="bob")
    assert (reply.status, reply.code) == (404, "not_found")
    reply = await env.call("GET", "/requests/not-an-id!", user="bob")
    assert (reply.status, reply.code) == (400, "bad_request")
    reply = await env.call("POST", "/requests/R-ZZZZZ/approve", user="bob")
    assert (reply.status, reply.code) == (404, "not_found")


async def test_listing_filters_by_status_and_resource_glob(env: ApiEnv) -> None:
    prod = await env.submit(resource="prod-db")
    await env.submit(resource="prod-reports")
    staging = await env.submit(resource="staging-db")
    await env.call("POST", f"/requests/{staging.id}/deny", user="bob", body={"note": "no"})

    async def ids(query: str) -> set[str]:
        reply = await env.call("GET", f"/requests{query}", user="bob")
        assert reply.status == 200
        return {r["id"] for r in reply.body["requests"]}

    assert len(await ids("")) == 3
    assert len(await ids("?status=&resource=")) == 3
    assert await ids("?status=denied") == {staging.id}
    assert len(await ids("?status=pending&resource=prod-*")) == 2
    assert await ids("?resource=prod-d?") == {prod.id}
    assert await ids("?status=approved") == set()
    assert len(await ids("?limit=1")) == 1
    for bad in ["?status=bogus", "?limit=0", "?limit=x", "?limit=100000"]:
        reply = await env.call("GET", f"/requests{bad}", user="bob")
        assert (reply.status, reply.code) == (400, "bad_request"), bad


# -- voting: the workflow's rules through HTTP --------------------------------------


async def test_four_eyes_the_requester_cannot_approve(env: ApiEnv) -> None:
    request = await env.submit(requester="frank", steps=[StepDef("dba", ("group:dba", "frank"))])
    reply = await env.call("POST", f"/requests/{request.id}/approve", user="frank")
    assert (reply.status, reply.code) == (403, "cannot_self_approve")
    assert "four-eyes" in reply.body["error"]["message"]
    reply = await env.call("POST", f"/requests/{request.id}/approve", user="bob")
    assert (reply.status, reply.body["status"]) == (200, "approved")


async def test_quorum_two_of_n_and_one_vote_per_person(env: ApiEnv) -> None:
    request = await env.submit(steps=[QUORUM])
    first = await env.call("POST", f"/requests/{request.id}/approve", user="bob")
    assert (first.status, first.body["status"], first.body["steps"][0]["progress"]) == (200, "pending", "1/2")
    again = await env.call("POST", f"/requests/{request.id}/approve", user="bob")
    assert (again.status, again.code) == (409, "already_reviewed")
    deny_after = await env.call("POST", f"/requests/{request.id}/deny", user="bob")
    assert (deny_after.status, deny_after.code) == (409, "already_reviewed")
    second = await env.call("POST", f"/requests/{request.id}/approve", user="carol", body={})
    assert (second.status, second.body["status"]) == (200, "approved")
    assert second.body["approved_until"] == pytest.approx(env.clock.now + HOUR)
    late = await env.call("POST", f"/requests/{request.id}/approve", user="frank")
    assert (late.status, late.code) == (409, "not_pending")


async def test_racing_votes_count_once(env: ApiEnv) -> None:
    request = await env.submit()
    replies = await asyncio.gather(*(
        env.call("POST", f"/requests/{request.id}/approve", user=user) for user in ["bob", "carol", "frank"]
    ))
    assert sorted(r.status for r in replies) == [200, 409, 409]
    assert {r.code for r in replies if r.status == 409} == {"not_pending"}
    stored = await env.service.store.get(request.id)
    assert stored is not None and len(stored.votes) == 1 and stored.status is Status.APPROVED


async def test_steps_run_in_order_and_only_eligible_people_vote(env: ApiEnv) -> None:
    request = await env.submit(steps=[DBA, SECURITY])
    erin_early = await env.call("POST", f"/requests/{request.id}/approve", user="erin")
    assert (erin_early.status, erin_early.code) == (403, "not_eligible")
    dave = await env.call("POST", f"/requests/{request.id}/approve", user="dave")
    assert (dave.status, dave.code) == (403, "not_eligible")
    assert "may vote: bob, carol, frank" in dave.body["error"]["message"]
    bob = await env.call("POST", f"/requests/{request.id}/approve", user="bob")
    assert (bob.body["status"], bob.body["current_step"], bob.body["may_vote"]) == ("pending", 1,
                                                                                    ["carol", "erin"])
    erin = await env.call("POST", f"/requests/{request.id}/approve", user="erin")
    assert erin.body["status"] == "approved"
    assert [s["done"] for s in erin.body["steps"]] == [True, True]


async def test_a_denial_rejects_at_once_with_its_note(env: ApiEnv) -> None:
    request = await env.submit(steps=[QUORUM, SECURITY])
    await env.call("POST", f"/requests/{request.id}/approve", user="bob")
    reply = await env.call("POST", f"/requests/{request.id}/deny", user="carol",
                           body={"note": "  use a migration instead "})
    why = "use a migration instead"
    assert (reply.status, reply.body["status"], reply.body["note"]) == (200, "denied", why)
    assert reply.body["votes"][-1] == {"user": "carol", "decision": "deny", "note": why, "step": 0,
                                       "at": env.clock.now}
    as_alice = await env.call("GET", f"/requests/{request.id}", user="alice")
    assert as_alice.body["note"] == "use a migration instead"
    after = await env.call("POST", f"/requests/{request.id}/approve", user="frank")
    assert (after.status, after.code) == (409, "not_pending")


async def test_only_the_requester_cancels(env: ApiEnv) -> None:
    request = await env.submit()
    bob = await env.call("POST", f"/requests/{request.id}/cancel", user="bob")
    assert (bob.status, bob.code) == (403, "not_requester")
    alice = await env.call("POST", f"/requests/{request.id}/cancel", user="alice",
                           body={"note": "wrong table"})
    assert (alice.status, alice.body["status"], alice.body["note"]) == (200, "cancelled", "wrong table")
    again = await env.call("POST", f"/requests/{request.id}/cancel", user="alice")
    assert (again.status, again.code) == (409, "not_pending")
    vote = await env.call("POST", f"/requests/{request.id}/approve", user="bob")
    assert (vote.status, vote.code) == (409, "not_pending")


async def test_an_expired_request_cannot_be_approved(env: ApiEnv) -> None:
    request = await env.submit(expires_after=HOUR)
    env.clock.advance(HOUR)
    reply = await env.call("POST", f"/requests/{request.id}/approve", user="bob")
    assert (reply.status, reply.code) == (409, "expired")
    cancel = await env.call("POST", f"/requests/{request.id}/cancel", user="alice")
    assert (cancel.status, cancel.code) == (409, "expired")
    assert await env.service.expire_due() == 1
    shown = await env.call("GET", f"/requests/{request.id}", user="bob")
    assert (shown.body["status"], shown.body["time_left"], shown.body["may_vote"]) == ("expired", None, [])
    reply = await env.call("POST", f"/requests/{request.id}/approve", user="bob")
    assert (reply.status, reply.code) == (409, "expired")


async def test_an_approved_statement_shows_its_remaining_window(env: ApiEnv) -> None:
    request = await env.submit(approved_ttl=HOUR)
    await env.call("POST", f"/requests/{request.id}/approve", user="bob")
    env.clock.advance(600)
    shown = await env.call("GET", f"/requests/{request.id}", user="alice")
    assert (shown.body["status"], shown.body["time_left"], shown.body["time_left_text"]) == (
        "approved", pytest.approx(HOUR - 600), "50m")


# -- bad input never crashes the server ------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ("{not json", "invalid_json"),
        ('{"note": "x"', "invalid_json"),
        (b"\xff\xfe\x00garbage", "invalid_json"),
        ('{"note": NaN}', "invalid_json"),
        ("[" * 100_00 + "]" * 100_00, "invalid_json"),
        ('["note"]', "bad_request"),
        ('"just a string"', "bad_request"),
        ("42", "bad_request"),
        ('{"note": 5}', "bad_request"),
        ('{"note": ["a"]}', "bad_request"),
        ('{"note": {"a": 1}}', "bad_request"),
        ('{"note": "x", "decision": "approve"}', "bad_request"),
        (json.dumps({"note": "x" * 5000}), "bad_request"),
    ],
    ids=["broken", "truncated", "binary", "nan", "deep", "array", "string", "number", "note-int",
         "note-list", "note-object", "unknown-field", "long-note"],
)
async def test_malformed_bodies_are_400(env: ApiEnv, data: str | bytes, code: str) -> None:
    request = await env.submit()
    reply = await env.call("POST", f"/requests/{request.id}/approve", user="bob", data=data,
                           headers={"Content-Type": "application/json"})
    assert (reply.status, reply.code) == (400, code)
    assert (await env.service.store.get(request.id)).votes == ()  # type: ignore[union-attr]
    assert (await env.call("GET", "/me", user="bob")).status == 200


async def test_huge_bodies_are_refused(env: ApiEnv) -> None:
    request = await env.submit()
    huge = io.BytesIO(json.dumps({"note": "x" * (2 * 1024 * 1024)}).encode())
    response = await env.client.post(f"/api/v1/requests/{request.id}/approve", data=huge,
                                     headers={"Authorization": f"Bearer {token_of('bob')}"})
    assert response.status == 413
    assert (await response.json())["error"]["code"] == "payload_too_large"

    async def chunks():  # no Content-Length: the cap holds while streaming too
        for _ in range(200):
            yield b"x" * 1024

    response = await env.client.post(f"/api/v1/requests/{request.id}/approve", data=chunks(),
                                     headers={"Authorization": f"Bearer {token_of('bob')}"})
    assert response.status == 413
    assert (await response.json())["error"]["code"] == "payload_too_large"
    assert (await env.call("GET", "/me", user="bob")).status == 200


async def test_an_empty_body_is_an_empty_note(env: ApiEnv) -> None:
    request = await env.submit()
    reply = await env.call("POST", f"/requests/{request.id}/approve", user="bob", data=b"")
    assert (reply.status, reply.body["votes"][0]["note"]) == (200, None)


async def test_a_note_with_control_characters_is_a_400(env: ApiEnv) -> None:
    request = await env.submit()
    for note in ("ok\x00", "\x1b[2Jwiped"):
        reply = await env.call("POST", f"/requests/{request.id}/deny", user="bob", body={"note": note})
        assert (reply.status, reply.body["error"]["code"]) == (400, "bad_request")
    reply = await env.call("POST", f"/requests/{request.id}/approve", user="bob",
                           body={"note": "fine\nby me\t(bob)"})
    assert reply.status == 200


async def test_unknown_paths_and_methods_answer_json(env: ApiEnv) -> None:
    response = await env.client.get("/api/v1/nothing-here",
                                    headers={"Authorization": f"Bearer {token_of('bob')}"})
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"
    response = await env.client.delete("/api/v1/me", headers={"Authorization": f"Bearer {token_of('bob')}"})
    assert response.status == 405
    assert (await response.json())["error"]["code"] == "method_not_allowed"
    assert "GET" in response.headers["Allow"]


async def test_a_store_outage_is_503(tmp_path: Path) -> None:
    async with running_api(tmp_path) as env:
        request = await env.submit()
        await env.store.close()
        for method, path in [("GET", "/requests"), ("GET", f"/requests/{request.id}"),
                             ("POST", f"/requests/{request.id}/approve"), ("GET", "/audit"),
                             ("GET", "/deliveries")]:
            reply = await env.call(method, path, user="bob")
            assert (reply.status, reply.code) == (503, "store_unavailable"), path


# -- audit and deliveries ------------------------------------------------------------


async def test_audit_events_paging_since_and_verification(env: ApiEnv) -> None:
    first = await env.submit()
    env.clock.advance(100)
    await env.call("POST", f"/requests/{first.id}/approve", user="bob", body={"note": "ok"})
    env.clock.advance(100)
    second = await env.submit()
    await env.call("POST", f"/requests/{second.id}/deny", user="carol", body={"note": "no"})

    reply = await env.call("GET", "/audit", user="dave")
    events = reply.body["events"]
    assert [e["type"] for e in events] == [
        "request.created", "request.voted", "request.step_completed", "request.approved",
        "request.created", "request.voted", "request.denied",
    ]
    assert [e["id"] for e in events] == list(range(1, 8))
    assert events[1]["actor"] == "bob" and events[1]["data"]["event"]["note"] == "ok"
    assert reply.body["next_after_id"] is None

    page = await env.call("GET", "/audit?limit=3", user="dave")
    assert ([e["id"] for e in page.body["events"]], page.body["next_after_id"]) == ([1, 2, 3], 3)
    rest = await env.call("GET", "/audit?limit=3&after_id=3", user="dave")
    assert [e["id"] for e in rest.body["events"]] == [4, 5, 6]

    cutoff = env.clock.now - 50
    since_unix = await env.call("GET", f"/audit?since={cutoff}", user="dave")
    assert [e["id"] for e in since_unix.body["events"]] == [5, 6, 7]
    iso = datetime.fromtimestamp(cutoff, UTC).isoformat().replace("+00:00", "Z")
    since_iso = await env.call("GET", f"/audit?since={iso}", user="dave")
    assert since_iso.body == since_unix.body
    for bad in ["since=yesterday", "since=nan", "limit=0", "after_id=-1"]:
        reply = await env.call("GET", f"/audit?{bad}", user="dave")
        assert (reply.status, reply.code) == (400, "bad_request"), bad

    verified = await env.call("GET", "/audit/verify", user="dave")
    assert verified.body["ok"] is True and verified.body["first_bad_id"] is None
    assert "7 events verified" in verified.body["message"]


async def test_deliveries_are_listed_with_redacted_targets(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(WEBHOOK_SECRET_ENV, "s")
    url = "https://user:pw@hooks.example.com:8443/pgvouch?token=secret"
    hook = Webhook(url, WEBHOOK_SECRET_ENV, ("request.created",))
    async with running_api(tmp_path, webhooks=[hook]) as env:
        request = await env.submit()
        reply = await env.call("GET", "/deliveries", user="bob")
        [delivery] = reply.body["deliveries"]
        assert delivery["target"] == "https://hooks.example.com:8443/pgvouch"
        assert (delivery["event"], delivery["request_id"], delivery["status"], delivery["attempts"]) == (
            "request.created", request.id, "pending", 0)
        assert "secret" not in json.dumps(reply.body) and "pw" not in delivery["target"]
        assert (await env.call("GET", "/deliveries?status=delivered", user="bob")).body["deliveries"] == []
        bad = await env.call("GET", "/deliveries?status=nope", user="bob")
        assert (bad.status, bad.code) == (400, "bad_request")


def test_parse_timestamp() -> None:
    assert parse_timestamp("1700000000") == 1_700_000_000
    assert parse_timestamp(" 1700000000.5 ") == 1_700_000_000.5
    assert parse_timestamp("2023-11-14T22:13:20Z") == 1_700_000_000
    assert parse_timestamp("2023-11-14T22:13:20") == 1_700_000_000  # UTC unless it says otherwise
    assert parse_timestamp("2023-11-14T23:13:20+01:00") == 1_700_000_000
    assert parse_timestamp("2023-11-14") == datetime(2023, 11, 14, tzinfo=UTC).timestamp()
    for bad in ["", "yesterday", "inf", "nan", "2023-13-45"]:
        with pytest.raises(ValueError):
            parse_timestamp(bad)


def test_status_values_in_the_document_match_the_model() -> None:
    schema = OPENAPI["components"]["schemas"]["Request"]["properties"]["status"]["enum"]
    assert schema == [str(s) for s in Status]
