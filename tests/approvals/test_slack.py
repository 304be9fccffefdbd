"""Slack end to end at the API level: messages to a fake Slack, signed clicks back.

Everything real but Slack itself: the approvals API on 127.0.0.1 over a
SQLite store, the delivery worker posting to a fake Slack server on
127.0.0.1 (``tests/approvals/fake_slack.py``), clicks signed with the
signing secret the way Slack signs them, answers captured at the fake's
response URLs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from approvals import preview as impact
from approvals.api import API_PREFIX, add_approval_routes
from approvals.model import Request, Status
from approvals.service import ApprovalService
from approvals.slack import SlackNotifier, SlackSender, allowed_response_url, check_slack_signature
from approvals.slack_blocks import ACTION_APPROVE, ACTION_BACK, ACTION_DENY, ACTION_DENY_CONFIRM
from approvals.store import DeliveryStatus, Store, open_store
from approvals.webhooks import DeliveryWorker, SignatureCode, SignatureError
from config.settings import SlackSettings
from tests.approvals.api_harness import Clock, make_settings
from tests.approvals.fake_slack import (
    SIGNING_SECRET,
    WEBHOOK_TOKEN,
    FakeSlack,
    click,
    running_fake_slack,
    signed_headers,
)
from tests.approvals.helpers import DBA, DIRECTORY, StepDef, make_grant, make_request, statement

URL_ENV, SECRET_ENV = "PGV_TEST_SLACK_URL", "PGV_TEST_SLACK_SECRET"
SLACK_IDS = {"alice": "U0ALICE", "bob": "U0BOB", "carol": "U0CAROL", "frank": "U0FRANK", "erin": "U0ERIN"}
TWO_DBAS = StepDef("two DBAs", ("group:dba",), required=2)


@dataclass
class SlackEnv:
    client: TestClient[web.Request, web.Application]
    service: ApprovalService
    store: Store
    clock: Clock
    slack: FakeSlack
    worker: DeliveryWorker

    async def submit(self, steps: Sequence[StepDef] = (DBA,), **kwargs: Any) -> Request:
        return await self.service.create(make_request(steps=steps, now=self.clock(), **kwargs))

    async def posted(self) -> list[dict[str, Any]]:
        """Run the delivery worker; the messages Slack got so far."""
        await self.worker.run_once()
        return self.slack.messages

    async def press(self, action: str, request_id: str, user: str, *, note: str | None = None,
                    response_url: str | None = None, at: float | None = None,
                    secret: str = SIGNING_SECRET) -> tuple[int, Any, str]:
        """Press a button as ``user`` (a Slack id); the HTTP status, its body and the response url."""
        url = response_url or self.slack.response_url()
        body = click(action, request_id, user, url, note)
        headers = signed_headers(body, self.clock() if at is None else at, secret)
        return (*await self.post(body, headers), url)

    async def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
        response = await self.client.post(f"{API_PREFIX}/slack/interactions", data=body, headers=headers)
        text = await response.text()
        return response.status, json.loads(text) if text else None

    async def answer(self, url: str) -> dict[str, Any]:
        """The one answer to a click (it arrives after the HTTP 200)."""
        [only] = await self.slack.wait_answers(url)
        return only


@pytest.fixture
def slack_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SIGNING_SECRET)


@asynccontextmanager
async def running_slack_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SlackEnv]:
    async with running_fake_slack() as slack:
        monkeypatch.setenv(URL_ENV, slack.webhook_url)
        monkeypatch.setenv(SECRET_ENV, SIGNING_SECRET)
        url = f"sqlite:///{tmp_path / 'store.db'}"
        store = await open_store(url)
        clock = Clock()
        base = make_settings(store=url)
        users = {name: dataclasses.replace(user, slack_id=SLACK_IDS.get(name))
                 for name, user in base.users.items()}
        settings = dataclasses.replace(
            base, users=users,
            slack=SlackSettings(URL_ENV, SECRET_ENV, "#dba", response_url_hosts=("127.0.0.1",)))
        service = ApprovalService(store, DIRECTORY, notifiers=[SlackNotifier(settings)], clock=clock)
        app = web.Application()
        add_approval_routes(app, service, settings)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        worker = DeliveryWorker(store, settings, senders=[SlackSender(settings.slack)], clock=clock)
        try:
            yield SlackEnv(client, service, store, clock, slack, worker)
        finally:
            await worker.close()
            await client.close()
            await store.close()


def _text(message: dict[str, Any]) -> str:
    """Every text of a message, joined (to look for what a person would read)."""
    return json.dumps(message["blocks"], ensure_ascii=False)


def _buttons(message: dict[str, Any]) -> list[tuple[str, str]]:
    return [(element["action_id"], element["value"])
            for block in message["blocks"] if block["type"] == "actions"
            for element in block["elements"]]


# -- messages ------------------------------------------------------------------------


async def test_a_new_request_posts_a_block_kit_message_with_buttons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_slack_api(tmp_path, monkeypatch) as env:
        request = await env.submit(subject=statement("UPDATE accounts SET note = $1 WHERE id = 7",
                                                     value="<!channel> & more"))
        [message] = await env.posted()
        text = _text(message)
        assert message["channel"] == "#dba"
        assert f"{request.id}: write statement on prod-db/app" in message["text"]
        assert "```UPDATE accounts SET note = $1 WHERE id = 7```" in text
        assert "$1 = '&lt;!channel&gt; &amp; more'" in text  # no mention smuggled in
        assert "alice (<@U0ALICE>)" in text and "prod-db/app" in text and "prod-writes" in text
        assert "Step 1/1 *DBA review*: 0/1 approvals; may approve: bob, carol, frank" in text
        assert "Expires in 8h" in text
        assert _buttons(message) == [(ACTION_APPROVE, request.id), (ACTION_DENY, request.id)]
        assert f"/requests/{request.id}|Open {request.id} in the Activity Queue" in text
        [delivery] = await env.store.list_deliveries()
        assert (delivery.channel, delivery.target, delivery.status) == ("slack", "#dba",
                                                                         DeliveryStatus.DELIVERED)


async def test_a_grant_and_a_preview_are_shown_and_long_sql_is_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_slack_api(tmp_path, monkeypatch) as env:
        grant = make_grant(now=env.clock())
        await env.service.create(grant)
        long_sql = "UPDATE t SET a = 1 WHERE " + "x = 1 AND " * 800
        held = make_request(now=env.clock(), subject=statement(long_sql))
        explained = impact.make_preview(
            [impact.explained("UPDATE t", {"Node Type": "ModifyTable", "Plans": [{"Plan Rows": 42}]})],
            at=env.clock() - 3600, stale_after=1800)
        await env.service.create(dataclasses.replace(held, preview=explained))
        grant_message, statement_message = await env.posted()
        assert "*Grant:* write on all tables for 1h" in _text(grant_message)
        assert "*Reason:* incident 4711" in _text(grant_message)
        text = _text(statement_message)
        assert "estimated rows: ~42 (stale: 1h old, refreshed on approve)" in text
        assert "…```" in text and len(text) < 12_000  # cut, within Slack's limits


async def test_a_slack_outage_leaves_the_message_queued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_slack_api(tmp_path, monkeypatch) as env:
        env.slack.fail_next = 1
        await env.submit()
        assert await env.posted() == []
        [delivery] = await env.store.list_deliveries()
        assert (delivery.status, delivery.last_error) == (DeliveryStatus.PENDING, "HTTP 500: slack_is_down")
        env.clock.advance(5)
        assert len(await env.posted()) == 1


async def test_the_webhook_url_is_never_in_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_slack_api(tmp_path, monkeypatch) as env:
        monkeypatch.setenv(URL_ENV, f"http://127.0.0.1:9/services/T000/B000/{WEBHOOK_TOKEN}")
        await env.submit()
        await env.posted()
        monkeypatch.delenv(URL_ENV)
        env.clock.advance(5)
        await env.posted()
        [delivery] = await env.store.list_deliveries()
        assert delivery.attempts == 2 and URL_ENV in (delivery.last_error or "")
        assert WEBHOOK_TOKEN not in repr(await env.store.list_deliveries())


# -- clicks --------------------------------------------------------------------------


async def test_approve_from_slack_releases_the_request_and_updates_the_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_slack_api(tmp_path, monkeypatch) as env:
        request = await env.submit()
        status, _, url = await env.press(ACTION_APPROVE, request.id, "U0BOB")
        assert status == 200
        answer = await env.answer(url)
        stored = await env.store.get(request.id)
        assert stored is not None and stored.status is Status.APPROVED
        assert [(v.user, str(v.decision)) for v in stored.votes] == [("bob", "approve")]
        voted = [e for e in await env.store.audit() if e.type == "request.voted"]
        assert voted[0].actor == "bob" and voted[0].data["event"]["via"] == "slack"
        assert answer["replace_original"] is True
        assert "bob approved via Slack" in _text(answer)
        assert "0/1" not in _text(answer) and "1/1 approvals (by bob)" in _text(answer)
        assert _buttons(answer) == []  # final: no buttons


async def test_quorum_progress_is_shown_until_the_last_vote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_slack_api(tmp_path, monkeypatch) as env:
        request = await env.submit(steps=(TWO_DBAS,))
        _, _, first = await env.press(ACTION_APPROVE, request.id, "U0BOB")
        progress = await env.answer(first)
        assert "1/2 approvals (by bob); may approve: carol, frank" in _text(progress)
        assert _buttons(progress) == [(ACTION_APPROVE, request.id), (ACTION_DENY, request.id)]
        _, _, again = await env.press(ACTION_APPROVE, request.id, "U0BOB")
        refused = await env.answer(again)
        assert "bob already reviewed" in refused["text"]  # one person counts once
        assert refused["response_type"] == "ephemeral"
        _, _, last = await env.press(ACTION_APPROVE, request.id, "U0CAROL")
        final = await env.answer(last)
        assert "2/2 approvals (by bob, carol)" in _text(final)
        assert _buttons(final) == []
        stored = await env.store.get(request.id)
        assert stored is not None and stored.status is Status.APPROVED


async def test_deny_asks_for_a_note_then_denies_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_slack_api(tmp_path, monkeypatch) as env:
        request = await env.submit()
        _, _, url = await env.press(ACTION_DENY, request.id, "U0CAROL")
        form = await env.answer(url)
        assert form["replace_original"] is True
        assert any(b["type"] == "input" and b["block_id"] == "pgvouch_deny_note" for b in form["blocks"])
        assert _buttons(form) == [(ACTION_DENY_CONFIRM, request.id), (ACTION_BACK, request.id)]
        _, _, back = await env.press(ACTION_BACK, request.id, "U0CAROL")
        assert _buttons(await env.answer(back)) == [(ACTION_APPROVE, request.id), (ACTION_DENY, request.id)]
        _, _, empty = await env.press(ACTION_DENY_CONFIRM, request.id, "U0CAROL", note="   ")
        assert "Write why you deny" in (await env.answer(empty))["text"]
        still = await env.store.get(request.id)
        assert still is not None and still.status is Status.PENDING and still.votes == ()
        _, _, confirmed = await env.press(ACTION_DENY_CONFIRM, request.id, "U0CAROL",
                                          note="not during the audit")
        denied = await env.answer(confirmed)
        assert "carol denied via Slack" in _text(denied) and "not during the audit" in _text(denied)
        assert _buttons(denied) == []
        stored = await env.store.get(request.id)
        assert stored is not None and (stored.status, stored.note) == (Status.DENIED, "not during the audit")


async def test_the_requester_cannot_approve_from_slack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_slack_api(tmp_path, monkeypatch) as env:
        request = await env.submit()
        for action in (ACTION_APPROVE, ACTION_DENY):
            status, _, url = await env.press(action, request.id, "U0ALICE")
            assert status == 200
            answer = await env.answer(url)
            assert answer["response_type"] == "ephemeral" and answer["replace_original"] is False
            assert "cannot review it (four-eyes)" in answer["text"]
        _, _, url = await env.press(ACTION_APPROVE, request.id, "U0ERIN")  # not a DBA
        assert "erin is not an approver of step" in (await env.answer(url))["text"]
        stored = await env.store.get(request.id)
        assert stored is not None and stored.status is Status.PENDING and stored.votes == ()


async def test_an_unmapped_slack_user_gets_an_ephemeral_answer_and_no_vote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_slack_api(tmp_path, monkeypatch) as env:
        request = await env.submit()
        status, _, url = await env.press(ACTION_APPROVE, request.id, "U0STRANGER")
        assert status == 200
        answer = await env.answer(url)
        assert answer["response_type"] == "ephemeral" and "not mapped to a pgvouch user" in answer["text"]
        stored = await env.store.get(request.id)
        assert stored is not None and stored.votes == ()


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ("forged", "bad_signature"),
        ("stale", "stale_signature"),
        ("future", "stale_signature"),
        ("missing", "missing_signature"),
        ("tampered", "bad_signature"),
    ],
)
async def test_unauthentic_clicks_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str, code: str
) -> None:
    async with running_slack_api(tmp_path, monkeypatch) as env:
        request = await env.submit()
        url = env.slack.response_url()
        body = click(ACTION_APPROVE, request.id, "U0BOB", url)
        at = {"stale": env.clock() - 301, "future": env.clock() + 301}.get(change, env.clock())
        headers = signed_headers(body, at, "guessed-secret" if change == "forged" else SIGNING_SECRET)
        if change == "missing":
            del headers["X-Slack-Signature"]
        if change == "tampered":
            body = click(ACTION_APPROVE, request.id, "U0CAROL", url)
        status, answer = await env.post(body, headers)
        assert (status, answer["error"]["code"]) == (401, code)
        stored = await env.store.get(request.id)
        assert stored is not None and stored.votes == () and env.slack.answers(url) == []


async def test_a_replayed_click_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_slack_api(tmp_path, monkeypatch) as env:
        request = await env.submit(steps=(TWO_DBAS,))
        url = env.slack.response_url()
        body = click(ACTION_APPROVE, request.id, "U0BOB", url)
        headers = signed_headers(body, env.clock())
        assert (await env.post(body, headers))[0] == 200
        status, answer = await env.post(body, headers)
        assert (status, answer["error"]["code"]) == (401, "replayed_signature")
        assert len(await env.slack.wait_answers(url)) == 1


@pytest.mark.parametrize(
    ("action", "value", "user"),
    [("pgvouch_launch", None, "U0BOB"), (ACTION_APPROVE, "not-a-request", "U0BOB"),
     (ACTION_APPROVE, "not-a-request", "U0STRANGER")],
)
async def test_a_malformed_click_is_refused_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: str, value: str | None, user: str
) -> None:
    async with running_slack_api(tmp_path, monkeypatch) as env:
        request = await env.submit()
        status, answer, url = await env.press(action, value or request.id, user)
        assert (status, answer["error"]["code"]) == (400, "bad_request")
        stored = await env.store.get(request.id)
        assert stored is not None and stored.votes == () and env.slack.answers(url) == []


async def test_the_click_is_acknowledged_before_a_slow_vote_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_slack_api(tmp_path, monkeypatch) as env:
        request = await env.submit()
        refreshing, release = asyncio.Event(), asyncio.Event()

        async def slow_preview(held: Request, user: str) -> None:  # EXPLAIN upstream, taking its time
            refreshing.set()
            await release.wait()

        env.service.before_approve = slow_preview
        status, _, url = await asyncio.wait_for(env.press(ACTION_APPROVE, request.id, "U0BOB"), 5)
        assert status == 200
        await asyncio.wait_for(refreshing.wait(), 5)  # the vote is under way, still blocked
        stored = await env.store.get(request.id)
        assert stored is not None and stored.votes == () and env.slack.answers(url) == []
        release.set()
        answer = await env.answer(url)
        assert "bob approved via Slack" in _text(answer)
        stored = await env.store.get(request.id)
        assert stored is not None and stored.status is Status.APPROVED


async def test_shutting_down_cancels_a_click_in_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_slack_api(tmp_path, monkeypatch) as env:
        request = await env.submit()
        refreshing, cancelled = asyncio.Event(), asyncio.Event()

        async def stuck_preview(held: Request, user: str) -> None:
            refreshing.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        env.service.before_approve = stuck_preview
        status, _, url = await env.press(ACTION_APPROVE, request.id, "U0BOB")
        assert status == 200
        await asyncio.wait_for(refreshing.wait(), 5)
        await asyncio.wait_for(env.client.close(), 5)  # the app's cleanup
        assert cancelled.is_set()
        stored = await env.store.get(request.id)
        assert stored is not None and stored.votes == () and env.slack.answers(url) == []


async def test_a_store_outage_is_answered_and_the_click_may_be_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_slack_api(tmp_path, monkeypatch) as env:
        request = await env.submit()
        url = env.slack.response_url()
        body = click(ACTION_APPROVE, request.id, "U0BOB", url)
        headers = signed_headers(body, env.clock())
        await env.store.close()
        assert (await env.post(body, headers))[0] == 200
        [down] = await env.slack.wait_answers(url)
        assert down["response_type"] == "ephemeral" and down["replace_original"] is False
        assert down["text"] == "The approvals store is unavailable; nothing was recorded, try again."
        reopened = await open_store(f"sqlite:///{tmp_path / 'store.db'}")
        env.service.store = reopened
        try:
            assert (await env.post(body, headers))[0] == 200  # the same signature is accepted again
            _, approved = await env.slack.wait_answers(url, count=2)
            assert "bob approved via Slack" in _text(approved)
            stored = await reopened.get(request.id)
            assert stored is not None and stored.status is Status.APPROVED
        finally:
            await reopened.close()


async def test_a_response_url_elsewhere_is_never_called(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_slack_api(tmp_path, monkeypatch) as env:
        request = await env.submit()
        elsewhere = env.slack.response_url().replace("127.0.0.1", "localhost")
        status, answer, _ = await env.press(ACTION_APPROVE, request.id, "U0BOB", response_url=elsewhere)
        assert (status, answer["error"]["code"]) == (400, "bad_request")
        stored = await env.store.get(request.id)
        assert stored is not None and stored.votes == ()  # refused before anything happened
        assert env.slack.responses == {}


async def test_without_notify_slack_the_route_only_says_so(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path / 'plain.db'}")
    app = web.Application()
    add_approval_routes(app, ApprovalService(store, DIRECTORY), make_settings())
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        body = click(ACTION_APPROVE, "R-AAAAA", "U0BOB", "http://127.0.0.1:9/actions/1")
        response = await client.post(f"{API_PREFIX}/slack/interactions", data=body,
                                     headers=signed_headers(body, time.time()))
        answer = await response.json()
        assert response.status == 404 and answer["error"]["code"] == "not_found"
        assert "notify.slack" in answer["error"]["message"]
    await store.close()


# -- the pieces ----------------------------------------------------------------------


def test_slack_signature_rules() -> None:
    body, now = b"payload=%7B%7D", 1_700_000_000.0
    good = signed_headers(body, now)
    sig, stamp = good["X-Slack-Signature"], good["X-Slack-Request-Timestamp"]
    assert check_slack_signature(SIGNING_SECRET, sig, stamp, body, now + 300) == sig
    cases = [(sig, stamp, now + 301, SignatureCode.STALE), (sig, stamp, now - 301, SignatureCode.STALE),
             (sig, "soon", now, SignatureCode.MALFORMED),
             ("v1=" + sig[3:], stamp, now, SignatureCode.MALFORMED),
             (None, stamp, now, SignatureCode.MISSING), ("v0=" + "0" * 64, stamp, now, SignatureCode.BAD)]
    for signature, timestamp, at, code in cases:
        with pytest.raises(SignatureError) as caught:
            check_slack_signature(SIGNING_SECRET, signature, timestamp, body, at)
        assert caught.value.code is code


def test_response_urls_are_checked_against_the_allowed_hosts() -> None:
    slack = ("hooks.slack.com",)
    assert allowed_response_url("https://hooks.slack.com/actions/T0/1/abc", slack)
    assert not allowed_response_url("http://hooks.slack.com/actions/T0/1/abc", slack)  # https only
    assert not allowed_response_url("https://hooks.slack.com.evil.example/actions", slack)
    assert not allowed_response_url("https://user@hooks.slack.com/actions", slack)
    assert not allowed_response_url("https://169.254.169.254/latest/meta-data", slack)
    assert not allowed_response_url("https://hooks.slack.com:bad/x", slack)
    assert allowed_response_url("http://127.0.0.1:8080/actions/1", ("127.0.0.1",))  # loopback may be http
    assert not allowed_response_url("http://10.0.0.1/actions/1", ("10.0.0.1",))
