"""Signed webhooks: signatures, the delivery worker against a real receiver, inbound decisions.

The receiver is an aiohttp server on 127.0.0.1 that checks every signature
with ``approvals.webhooks.verify`` the way a real receiver would; the store
is a real SQLite file; time is a clock the test moves, so backoff is tested
without waiting for it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter

from approvals.service import ApprovalService
from approvals.store import DeliveryStatus, Store, open_store
from approvals.webhooks import (
    BACKOFF,
    DELIVERY_HEADER,
    EVENT_HEADER,
    MAX_ATTEMPTS,
    SIGNATURE_HEADER,
    DeliveryWorker,
    ReplayGuard,
    SignatureCode,
    SignatureError,
    check_signature,
    redact_url,
    retry_at,
    sign,
    speaks_for,
    verify,
)
from config.settings import Integration, Webhook
from tests.approvals import openapi_check
from tests.approvals.api_harness import (
    HOOK_SECRET,
    HOOK_SECRET_ENV,
    WEBHOOK_SECRET,
    WEBHOOK_SECRET_ENV,
    ApiEnv,
    Clock,
    Reply,
    make_settings,
    running_api,
)
from tests.approvals.helpers import DBA, DIRECTORY, T0, StepDef, make_request
from tests.conftest import free_port

SECURITY = StepDef("security", ("group:security",))

# -- signatures ------------------------------------------------------------------------


def test_sign_and_verify_round_trip() -> None:
    body = b'{"event":"request.created"}'
    header = sign("s3cret", body, T0)
    assert header.startswith(f"t={int(T0)},v1=")
    assert verify("s3cret", header, body, T0)
    assert verify("s3cret", header, body, T0 + 300)
    assert verify("s3cret", header, body, T0 - 300)  # a sender's clock a little ahead
    assert not verify("s3cret", header, body, T0 + 301)
    assert not verify("other", header, body, T0)
    assert not verify("s3cret", header, body + b" ", T0)
    assert not verify("s3cret", header.replace(f"t={int(T0)}", f"t={int(T0) + 1}"), body, T0)


def test_the_digest_is_hmac_sha256_over_timestamp_dot_body() -> None:
    import hashlib
    import hmac

    body = b"{}"
    expected = hmac.new(b"k", f"{int(T0)}.".encode() + body, hashlib.sha256).hexdigest()
    assert sign("k", body, T0) == f"t={int(T0)},v1={expected}"


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, SignatureCode.MISSING),
        ("", SignatureCode.MISSING),
        ("v1=abc", SignatureCode.MALFORMED),
        (f"t={int(T0)}", SignatureCode.MALFORMED),
        (f"t=soon,v1={'0' * 64}", SignatureCode.MALFORMED),
        (f"t={int(T0) - 3600},v1={'0' * 64}", SignatureCode.STALE),
        (f"t={int(T0)},v1={'0' * 64}", SignatureCode.BAD),
        (f"t={int(T0)},v1=zz\u00e9", SignatureCode.BAD),
    ],
)
def test_check_signature_says_what_is_wrong(header: str | None, code: SignatureCode) -> None:
    with pytest.raises(SignatureError) as caught:
        check_signature("k", header, b"{}", T0)
    assert caught.value.code is code


def test_several_v1_entries_allow_secret_rotation() -> None:
    body = b"{}"
    old = sign("old", body, T0).split(",")[1]
    new = sign("new", body, T0)
    assert verify("new", f"{new},{old}", body, T0)
    assert verify("old", f"{new},{old}", body, T0)


@given(header=st.text(max_size=200), body=st.binary(max_size=100))
def test_verify_never_raises_on_garbage(header: str, body: bytes) -> None:
    assert verify("k", header, body, T0) in (True, False)


def test_the_replay_guard_accepts_each_signature_once_and_stays_bounded() -> None:
    guard = ReplayGuard(window=300, capacity=3)
    assert guard.first_use("a", T0)
    assert not guard.first_use("a", T0 + 1)
    for name in "bcd":
        assert guard.first_use(name, T0 + 2)
    assert len(guard) == 3  # "a" was forgotten first
    assert not guard.first_use("d", T0 + 3)
    assert guard.first_use("e", T0 + 10_000)
    assert len(guard) == 1  # entries far outside the window are dropped


def test_retry_schedule_backs_off_then_gives_up() -> None:
    delays = [retry_at(attempt, 0.0) for attempt in range(1, MAX_ATTEMPTS + 1)]
    assert delays[: len(BACKOFF)] == list(BACKOFF) == [5.0, 30.0, 120.0, 600.0, 3600.0]
    assert delays[len(BACKOFF) : -1] == [3600.0] * (MAX_ATTEMPTS - len(BACKOFF) - 1)
    assert delays[-1] is None


def test_redact_url() -> None:
    assert redact_url("https://u:p@h.example:8443/a/b?token=x#f") == "https://h.example:8443/a/b"
    assert redact_url("http://127.0.0.1/hook") == "http://127.0.0.1/hook"
    assert redact_url("http://[::1]:8080/hook?k=v") == "http://[::1]:8080/hook"


def test_speaks_for_users_and_groups() -> None:
    integration = Integration("chatops", HOOK_SECRET_ENV, ("bob", "group:security"))
    assert speaks_for(integration, "bob", ["dba"])
    assert speaks_for(integration, "erin", ["security"])
    assert not speaks_for(integration, "frank", ["dba", "developers"])
    assert not speaks_for(integration, "security", [])


# -- a receiver ------------------------------------------------------------------------


@dataclass
class Received:
    body: Any
    headers: dict[str, str]
    verified: bool


@dataclass
class Receiver:
    clock: Clock
    secret: str = WEBHOOK_SECRET
    fail_next: int = 0
    always_fail: bool = False
    hang: asyncio.Event | None = None
    received: list[Received] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        verified = verify(self.secret, request.headers.get(SIGNATURE_HEADER), raw, self.clock())
        self.received.append(Received(json.loads(raw), dict(request.headers), verified))
        if self.hang is not None:
            await self.hang.wait()
        if self.always_fail or self.fail_next:
            self.fail_next = max(0, self.fail_next - 1)
            return web.Response(status=500, text="receiver broke")
        if not verified:
            return web.Response(status=401, text="bad signature")
        return web.json_response({"ok": True})

    @property
    def events(self) -> list[str]:
        return [r.body["event"] for r in self.received]


@asynccontextmanager
async def running_receiver(clock: Clock) -> AsyncIterator[Receiver]:
    receiver = Receiver(clock)
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    receiver.url = str(server.make_url("/hook"))
    try:
        yield receiver
    finally:
        if receiver.hang is not None:
            receiver.hang.set()
        await server.close()


def deliveries_counter() -> tuple[Counter, CollectorRegistry]:
    registry = CollectorRegistry()
    counter = Counter("pgvouch_webhook_deliveries", "Webhook deliveries by result", ["result"],
                      registry=registry)
    return counter, registry


def counted(registry: CollectorRegistry, result: str) -> float:
    return registry.get_sample_value("pgvouch_webhook_deliveries_total", {"result": result}) or 0.0


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WEBHOOK_SECRET_ENV, WEBHOOK_SECRET)
    monkeypatch.setenv(HOOK_SECRET_ENV, HOOK_SECRET)


@asynccontextmanager
async def api_with_receiver(
    tmp_path: Path, events: tuple[str, ...] = ()
) -> AsyncIterator[tuple[ApiEnv, Receiver]]:
    clock = Clock()
    async with running_receiver(clock) as receiver:
        hook = Webhook(receiver.url, WEBHOOK_SECRET_ENV, events)
        async with running_api(tmp_path, webhooks=[hook], clock=clock) as env:
            yield env, receiver


def worker_for(env: ApiEnv, store: Store | None = None, **kwargs: Any) -> DeliveryWorker:
    return DeliveryWorker(store or env.store, env.settings, clock=env.clock, **kwargs)


# -- outbound delivery -------------------------------------------------------------------


async def test_a_vote_is_delivered_signed(tmp_path: Path, secrets_env: None) -> None:
    async with api_with_receiver(tmp_path) as (env, receiver):
        counter, registry = deliveries_counter()
        worker = worker_for(env, counter=counter)
        request = await env.submit()
        await env.call("POST", f"/requests/{request.id}/approve", user="bob", body={"note": "ok"})
        assert receiver.received == []  # queued, not sent by the vote itself
        assert await worker.run_once() == 4
        await worker.close()
        assert sorted(receiver.events) == sorted(
            ["request.created", "request.voted", "request.step_completed", "request.approved"])
        assert all(r.verified for r in receiver.received)
        created = next(r for r in receiver.received if r.body["event"] == "request.created")
        assert created.headers["Content-Type"] == "application/json"
        assert created.headers[EVENT_HEADER] == "request.created"
        assert created.body["request"]["id"] == request.id
        assert created.body["eligible_approvers"] == ["bob", "carol", "frank"]  # never the requester
        voted = next(r for r in receiver.received if r.body["event"] == "request.voted")
        assert voted.body["actor"] == "bob" and voted.body["data"]["note"] == "ok"
        listed = await env.call("GET", "/deliveries", user="carol")
        assert {d["status"] for d in listed.body["deliveries"]} == {"delivered"}
        assert {d["id"] for d in listed.body["deliveries"]} == {
            int(r.headers[DELIVERY_HEADER]) for r in receiver.received}
        assert counted(registry, "delivered") == 4


async def test_only_subscribed_events_are_queued(tmp_path: Path, secrets_env: None) -> None:
    async with api_with_receiver(tmp_path, ("request.denied",)) as (env, receiver):
        request = await env.submit()
        await env.call("POST", f"/requests/{request.id}/deny", user="bob", body={"note": "not today"})
        worker = worker_for(env)
        assert await worker.run_once() == 1
        await worker.close()
        [denied] = receiver.received
        assert (denied.body["event"], denied.body["request"]["note"]) == ("request.denied", "not today")


async def test_a_failed_delivery_is_retried_with_backoff(tmp_path: Path, secrets_env: None) -> None:
    async with api_with_receiver(tmp_path, ("request.created",)) as (env, receiver):
        counter, registry = deliveries_counter()
        worker = worker_for(env, counter=counter)
        receiver.fail_next = 1
        await env.submit()
        assert await worker.run_once() == 1
        [failed] = (await env.call("GET", "/deliveries", user="bob")).body["deliveries"]
        assert (failed["status"], failed["attempts"], failed["last_error"]) == (
            "pending", 1, "HTTP 500: receiver broke")
        assert failed["next_attempt_at"] == pytest.approx(env.clock.now + 5)
        assert await worker.run_once() == 0  # not due yet
        env.clock.advance(5)
        assert await worker.run_once() == 1
        await worker.close()
        [delivered] = (await env.call("GET", "/deliveries", user="bob")).body["deliveries"]
        assert (delivered["status"], delivered["attempts"]) == ("delivered", 2)
        assert receiver.events == ["request.created", "request.created"]
        assert receiver.received[0].body == receiver.received[1].body  # the same event, sent again
        assert (counted(registry, "retry"), counted(registry, "delivered")) == (1, 1)


async def test_a_delivery_gives_up_after_the_last_attempt(tmp_path: Path, secrets_env: None) -> None:
    async with api_with_receiver(tmp_path, ("request.created",)) as (env, receiver):
        counter, registry = deliveries_counter()
        worker = worker_for(env, counter=counter)
        receiver.always_fail = True
        await env.submit()
        for _ in range(MAX_ATTEMPTS):
            assert await worker.run_once() == 1
            env.clock.advance(2 * 3600)
        assert await worker.run_once() == 0
        await worker.close()
        [dead] = (await env.call("GET", "/deliveries?status=dead", user="bob")).body["deliveries"]
        assert dead["attempts"] == MAX_ATTEMPTS
        assert len(receiver.received) == MAX_ATTEMPTS
        assert (counted(registry, "retry"), counted(registry, "dead")) == (MAX_ATTEMPTS - 1, 1)


async def test_deliveries_survive_a_worker_restart(tmp_path: Path, secrets_env: None) -> None:
    clock = Clock()
    url_db = f"sqlite:///{tmp_path / 'store.db'}"
    async with running_receiver(clock) as receiver:
        settings = make_settings(webhooks=[Webhook(receiver.url, WEBHOOK_SECRET_ENV)], store=url_db)
        store = await open_store(url_db)
        service = ApprovalService(store, DIRECTORY, webhooks=[(receiver.url, ())], clock=clock)
        await service.create(make_request(now=clock()))
        receiver.fail_next = 1
        first = DeliveryWorker(store, settings, clock=clock)
        assert await first.run_once() == 1
        await first.close()
        await store.close()  # the process is gone; the queue is in the file

        clock.advance(60)
        reopened = await open_store(url_db)
        try:
            second = DeliveryWorker(reopened, settings, clock=clock)
            assert await second.run_once() == 1
            await second.close()
            [delivery] = await reopened.list_deliveries()
            assert (delivery.status, delivery.attempts) == (DeliveryStatus.DELIVERED, 2)
            assert receiver.events == ["request.created", "request.created"]
        finally:
            await reopened.close()


async def test_a_delivery_claimed_by_a_dead_worker_is_sent_after_its_lease(
    tmp_path: Path, secrets_env: None
) -> None:
    async with api_with_receiver(tmp_path, ("request.created",)) as (env, receiver):
        await env.submit()
        [claimed] = await env.store.claim_due_deliveries(env.clock(), lease_seconds=60)  # then it died
        worker = worker_for(env, lease_seconds=60)
        assert await worker.run_once() == 0
        env.clock.advance(60)
        assert await worker.run_once() == 1
        await worker.close()
        assert receiver.events == ["request.created"]
        [delivery] = await env.store.list_deliveries()
        assert (delivery.id, delivery.status, delivery.attempts) == (claimed.id, DeliveryStatus.DELIVERED, 2)
        # the dead worker's late result does not overwrite the real one
        assert not await env.store.finish_delivery(claimed.id, False, "late", None, attempt=claimed.attempts)


async def test_unreachable_receivers_and_unknown_targets_are_retried_unknown_channels_dead(
    tmp_path: Path, secrets_env: None
) -> None:
    clock = Clock()
    dead_url = f"http://127.0.0.1:{free_port()}/hook"
    async with running_api(tmp_path, webhooks=[Webhook(dead_url, WEBHOOK_SECRET_ENV)], clock=clock) as env:
        await env.store.enqueue_delivery("webhook", dead_url, {"event": "request.created"}, now=clock())
        await env.store.enqueue_delivery("webhook", "http://127.0.0.1:9/gone", {"event": "x"}, now=clock())
        await env.store.enqueue_delivery("email", "bob@example.com", {"event": "x"}, now=clock())
        worker = worker_for(env)
        assert await worker.run_once() == 3
        await worker.close()
        errors = {d.target: d.last_error or "" for d in await env.store.list_deliveries()}
        status = {d.target: d.status for d in await env.store.list_deliveries()}
        assert status == {dead_url: DeliveryStatus.PENDING, "http://127.0.0.1:9/gone": DeliveryStatus.PENDING,
                          "bob@example.com": DeliveryStatus.DEAD}  # no sender: retrying cannot help
        assert "Connect" in errors[dead_url]
        assert "no webhook with this url is configured" in errors["http://127.0.0.1:9/gone"]
        assert "no sender for channel 'email'" in errors["bob@example.com"]


async def test_a_missing_secret_is_a_visible_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WEBHOOK_SECRET_ENV, raising=False)
    async with api_with_receiver(tmp_path, ("request.created",)) as (env, receiver):
        await env.submit()
        worker = worker_for(env)
        await worker.run_once()
        await worker.close()
        assert receiver.received == []
        [delivery] = (await env.call("GET", "/deliveries", user="bob")).body["deliveries"]
        assert WEBHOOK_SECRET_ENV in delivery["last_error"]


async def test_a_slow_receiver_blocks_nothing(tmp_path: Path, secrets_env: None) -> None:
    async with api_with_receiver(tmp_path, ("request.created",)) as (env, receiver):
        receiver.hang = asyncio.Event()
        await env.submit()
        worker = worker_for(env)
        sending = asyncio.create_task(worker.run_once())
        while not receiver.received:
            await asyncio.sleep(0.01)
        second = await env.submit()
        reply = await env.call("POST", f"/requests/{second.id}/approve", user="bob")
        assert reply.status == 200
        assert not sending.done()  # the vote went through while the delivery was in flight
        receiver.hang.set()
        assert await sending == 1
        assert await worker.run_once() == 1  # the second request's created event
        await worker.close()
        assert {d.status for d in await env.store.list_deliveries()} == {DeliveryStatus.DELIVERED}


async def test_a_receiver_that_does_not_answer_times_out(tmp_path: Path, secrets_env: None) -> None:
    async with api_with_receiver(tmp_path, ("request.created",)) as (env, receiver):
        receiver.hang = asyncio.Event()
        await env.submit()
        worker = worker_for(env, timeout=0.2)
        started = time.monotonic()
        assert await worker.run_once() == 1
        assert time.monotonic() - started < 3
        await worker.close()
        [delivery] = await env.store.list_deliveries()
        assert (delivery.status, delivery.attempts) == (DeliveryStatus.PENDING, 1)
        assert "Timeout" in (delivery.last_error or "")


async def test_the_worker_loop_delivers_until_cancelled(tmp_path: Path, secrets_env: None) -> None:
    async with api_with_receiver(tmp_path, ("request.created",)) as (env, receiver):
        worker = worker_for(env)
        task = asyncio.create_task(worker.run(interval=0.02))
        await env.submit()
        await env.submit()
        for _ in range(200):
            if len(receiver.received) == 2:
                break
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert receiver.events == ["request.created"] * 2
        assert worker.webhooks._session is None  # closed on the way out


async def test_the_worker_loop_survives_a_store_outage(tmp_path: Path, secrets_env: None) -> None:
    async with api_with_receiver(tmp_path) as (env, _):
        broken = await open_store(f"sqlite:///{tmp_path / 'other.db'}")
        await broken.close()
        task = asyncio.create_task(worker_for(env, store=broken).run(interval=0.01))
        await asyncio.sleep(0.1)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# -- inbound decisions -----------------------------------------------------------------

CHATOPS = Integration("chatops", HOOK_SECRET_ENV, ("bob", "alice", "group:security"))


@asynccontextmanager
async def api_with_integration(tmp_path: Path, store: Store | None = None,
                               clock: Clock | None = None) -> AsyncIterator[ApiEnv]:
    async with running_api(tmp_path, integrations=[CHATOPS], store=store, clock=clock) as env:
        yield env


async def post_hook(
    env: ApiEnv,
    fields: dict[str, Any] | None = None,
    *,
    data: bytes | None = None,
    secret: str = HOOK_SECRET,
    at: float | None = None,
    header: str | None = None,
    integration: str = "chatops",
) -> Reply:
    body = data if data is not None else json.dumps(fields).encode()
    if fields is not None:
        openapi_check.check_request_body(env.doc, "POST", f"/hooks/{integration}", fields)
    signature = header if header is not None else sign(secret, body, env.clock() if at is None else at)
    return await env.call("POST", f"/hooks/{integration}", data=body,
                          headers={SIGNATURE_HEADER: signature, "Content-Type": "application/json"})


def decision(
    request_id: str, approver: str, choice: str = "approve", note: str | None = None
) -> dict[str, Any]:
    fields: dict[str, Any] = {"request_id": request_id, "approver": approver, "decision": choice}
    if note is not None:
        fields["note"] = note
    return fields


async def test_a_signed_decision_votes_for_the_named_approver(tmp_path: Path, secrets_env: None) -> None:
    async with api_with_integration(tmp_path) as env:
        request = await env.submit()
        reply = await post_hook(env, decision(request.id.lower(), "bob", note="via chat"))
        assert (reply.status, reply.body["status"]) == (200, "approved")
        assert reply.body["votes"] == [
            {"user": "bob", "decision": "approve", "note": "via chat", "step": 0, "at": env.clock.now}]
        audit = (await env.call("GET", "/audit", user="dave")).body["events"]
        voted = next(e for e in audit if e["type"] == "request.voted")
        assert (voted["actor"], voted["data"]["event"]["via"]) == ("bob", "integration:chatops")


async def test_a_signed_denial_through_a_group(tmp_path: Path, secrets_env: None) -> None:
    async with api_with_integration(tmp_path) as env:
        request = await env.submit(steps=[SECURITY])
        reply = await post_hook(env, decision(request.id, "erin", "deny", "ticket rejected"))
        assert (reply.status, reply.body["status"], reply.body["note"]) == (200, "denied", "ticket rejected")


@pytest.mark.parametrize(
    ("tamper", "code"),
    [
        ({"at": -400.0}, "stale_signature"),
        ({"at": +400.0}, "stale_signature"),
        ({"secret": "not-the-secret"}, "bad_signature"),
        ({"header": ""}, "missing_signature"),
        ({"header": "sha256=abc"}, "malformed_signature"),
    ],
    ids=["stale", "future", "wrong-secret", "missing", "malformed"],
)
async def test_unauthentic_decisions_are_rejected(
    tmp_path: Path, secrets_env: None, tamper: dict[str, Any], code: str
) -> None:
    async with api_with_integration(tmp_path) as env:
        request = await env.submit()
        options = dict(tamper)
        if "at" in options:
            options["at"] = env.clock.now + options["at"]
        reply = await post_hook(env, decision(request.id, "bob"), **options)
        assert (reply.status, reply.code) == (401, code)
        assert (await env.store.get(request.id)).votes == ()  # type: ignore[union-attr]


async def test_a_changed_body_breaks_the_signature(tmp_path: Path, secrets_env: None) -> None:
    async with api_with_integration(tmp_path) as env:
        request = await env.submit()
        signed = json.dumps(decision(request.id, "bob", "deny")).encode()
        header = sign(HOOK_SECRET, signed, env.clock())
        forged = json.dumps(decision(request.id, "bob", "approve")).encode()
        reply = await post_hook(env, data=forged, header=header)
        assert (reply.status, reply.code) == (401, "bad_signature")


async def test_a_replayed_signature_is_rejected(tmp_path: Path, secrets_env: None) -> None:
    async with api_with_integration(tmp_path) as env:
        request = await env.submit(steps=[StepDef("two", ("group:dba",), required=2)])
        body = json.dumps(decision(request.id, "bob")).encode()
        header = sign(HOOK_SECRET, body, env.clock())
        first = await post_hook(env, data=body, header=header)
        assert first.status == 200
        env.clock.advance(30)
        replay = await post_hook(env, data=body, header=header)
        assert (replay.status, replay.code) == (401, "replayed_signature")
        # another replica has its own memory, but the store knows bob voted already
        async with api_with_integration(tmp_path, store=env.store, clock=env.clock) as replica:
            elsewhere = await post_hook(replica, data=body, header=header)
            assert (elsewhere.status, elsewhere.code) == (409, "already_reviewed")
        assert len((await env.store.get(request.id)).votes) == 1  # type: ignore[union-attr]


async def test_a_call_that_met_a_store_outage_may_be_retried(tmp_path: Path, secrets_env: None) -> None:
    store = await open_store(f"sqlite:///{tmp_path / 'store.db'}")
    async with api_with_integration(tmp_path, store=store) as env:
        request = await env.submit()
        body = json.dumps(decision(request.id, "bob")).encode()
        header = sign(HOOK_SECRET, body, env.clock())
        await store.close()
        down = await post_hook(env, data=body, header=header)
        assert (down.status, down.code) == (503, "store_unavailable")
        env.service.store = await open_store(f"sqlite:///{tmp_path / 'store.db'}")
        try:
            again = await post_hook(env, data=body, header=header)
            assert (again.status, again.body["status"]) == (200, "approved")
            replay = await post_hook(env, data=body, header=header)
            assert (replay.status, replay.code) == (401, "replayed_signature")
        finally:
            await env.service.store.close()


async def test_an_integration_speaks_only_for_its_approvers(tmp_path: Path, secrets_env: None) -> None:
    async with api_with_integration(tmp_path) as env:
        request = await env.submit()
        for approver in ["frank", "dave", "nobody-at-all"]:  # frank could approve, but not through chatops
            reply = await post_hook(env, decision(request.id, approver))
            assert (reply.status, reply.code) == (403, "not_delegated"), approver
        assert (await env.store.get(request.id)).votes == ()  # type: ignore[union-attr]


async def test_the_workflow_rules_apply_to_the_named_approver(tmp_path: Path, secrets_env: None) -> None:
    async with api_with_integration(tmp_path) as env:
        request = await env.submit(steps=[DBA])
        self_approval = await post_hook(env, decision(request.id, "alice"))
        assert (self_approval.status, self_approval.code) == (403, "cannot_self_approve")
        not_eligible = await post_hook(env, decision(request.id, "erin"))
        assert (not_eligible.status, not_eligible.code) == (403, "not_eligible")
        bogus = await post_hook(env, data=json.dumps(decision(request.id, "bob", "maybe")).encode())
        assert (bogus.status, bogus.code) == (400, "invalid_decision")
        missing = await post_hook(env, data=json.dumps(decision("R-ZZZZZ", "bob")).encode())
        assert (missing.status, missing.code) == (404, "not_found")
        env.clock.advance(9 * 3600)
        expired = await post_hook(env, decision(request.id, "bob"))
        assert (expired.status, expired.code) == (409, "expired")


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"{broken", "invalid_json"),
        (b"[]", "bad_request"),
        (b'{"request_id": "R-1", "approver": "bob"}', "bad_request"),
        (b'{"request_id": 5, "approver": "bob", "decision": "approve"}', "bad_request"),
        (b'{"request_id": "R-1", "approver": "", "decision": "approve"}', "bad_request"),
        (b'{"request_id": "R-1", "approver": "bob", "decision": "approve", "x": 1}', "bad_request"),
        (b'{"request_id": "!!", "approver": "bob", "decision": "approve"}', "bad_request"),
    ],
)
async def test_malformed_signed_decisions_are_400(
    tmp_path: Path, secrets_env: None, data: bytes, code: str
) -> None:
    async with api_with_integration(tmp_path) as env:
        reply = await post_hook(env, data=data)
        assert (reply.status, reply.code) == (400, code)


async def test_unknown_integrations_and_missing_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(HOOK_SECRET_ENV, raising=False)
    async with api_with_integration(tmp_path) as env:
        request = await env.submit()
        unknown = await post_hook(env, decision(request.id, "bob"), integration="jira")
        assert (unknown.status, unknown.code) == (404, "not_found")
        no_secret = await post_hook(env, decision(request.id, "bob"))
        assert (no_secret.status, no_secret.code) == (500, "integration_misconfigured")
        assert HOOK_SECRET not in json.dumps(no_secret.body)


async def test_hooks_need_no_bearer_token_and_ignore_one(tmp_path: Path, secrets_env: None) -> None:
    async with api_with_integration(tmp_path) as env:
        request = await env.submit()
        body = json.dumps(decision(request.id, "bob")).encode()
        reply = await env.call(
            "POST", "/hooks/chatops", data=body,
            headers={SIGNATURE_HEADER: sign(HOOK_SECRET, body, env.clock()), "Authorization": "Bearer junk"},
        )
        assert reply.status == 200
