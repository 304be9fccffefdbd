"""``POST /api/v1/slack/interactions``: Approve / Deny clicks from Slack.

Owns: authenticating a click by Slack's signature (not a bearer token; the
route is public), refusing a replayed signature, reading Slack's
form-encoded ``payload=<json>``, mapping the Slack user to a pgvouch user
(``users[].slack_id``), the two-stage deny (the Deny button asks for a note;
"Confirm deny" casts it, "Back" returns), and answering through the click's
``response_url``: the message replaced with the request's new state, or an
ephemeral answer only the clicking user sees (not mapped, a workflow
refusal, an empty note, the store being down).

Must not: decide anything: votes go through ``ApprovalService.vote(...,
via="slack")``, so four-eyes, quorum, steps and expiry apply exactly as in
the API, and every refusal is the workflow's own message. It never POSTs to
a ``response_url`` whose host ``notify.slack.response_url_hosts`` does not
list (https only; plain http only to a loopback host): a forged or
misrouted URL cannot make pgvouch call into the network (SSRF).

Slack wants the HTTP answer within three seconds, and a vote may take
longer (an approval first refreshes a stale impact preview with EXPLAIN
upstream). So the click is checked while Slack waits (signature, timestamp,
replay, the whole payload: a bad one is a 4xx and nothing runs), then
acknowledged with an empty 200 at once; the vote and the ``response_url``
answer run in a background task. Those tasks are kept (never garbage
collected mid-flight), their errors logged, and they are cancelled when the
app shuts down. A store outage in the background forgets the signature (a
retry may come through) and tells the clicking user nothing was recorded.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import aiohttp
from aiohttp import web

from approvals import slack_blocks, workflow
from approvals.api import MAX_NOTE, ApiError
from approvals.model import JSONObject, Request, Status, normalize_request_id
from approvals.service import ApprovalService
from approvals.slack import (
    HEADLINES,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SlackNotifier,
    allowed_response_url,
    check_slack_signature,
    request_link,
)
from approvals.store import NotFound, StoreUnavailable
from approvals.webhooks import ReplayGuard, SignatureError
from approvals.workflow import EventType, WorkflowError
from config.settings import Settings, SlackSettings
from config.yamlnodes import ConfigError

log = logging.getLogger("pgvouch.slack")

VIA = "slack"
RESPONSE_TIMEOUT = 10.0  # seconds for the response_url POST (in the background: Slack is not waiting)
ACTIONS = frozenset({slack_blocks.ACTION_APPROVE, slack_blocks.ACTION_DENY, slack_blocks.ACTION_BACK,
                     slack_blocks.ACTION_DENY_CONFIRM})
STORE_DOWN = "The approvals store is unavailable; nothing was recorded, try again."


@dataclass(frozen=True)
class Click:
    """A validated button press: what to do, to which request, by whom, where to answer."""

    response_url: str
    action_id: str
    request_id: str
    slack_id: str | None
    payload: JSONObject  # for the deny note


class SlackInteractions:
    """The handler of Slack's interactivity requests (one per API app)."""

    def __init__(self, service: ApprovalService, settings: Settings, replays: ReplayGuard) -> None:
        assert settings.slack is not None
        self.service = service
        self.settings = settings
        self.slack: SlackSettings = settings.slack
        self.replays = replays
        self.messages = SlackNotifier(settings)
        self.by_slack_id = {user.slack_id: name for name, user in settings.users.items() if user.slack_id}
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def cleanup(self, _app: web.Application) -> None:
        tasks, self._tasks = self._tasks, set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- the request -------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        seen = self._authenticate(request, body)
        click = self._validate(_parse_payload(body))
        if click is not None:
            self._in_background(self._answer(click, seen))
        return web.Response(status=200)

    def _authenticate(self, request: web.Request, body: bytes) -> str:
        try:
            secret = self.slack.signing_secret()
        except ConfigError as exc:
            log.error("slack interactions: %s", exc)
            raise ApiError("integration_misconfigured", "the Slack signing secret is not set") from None
        now = self.service.clock()
        try:
            signature = check_slack_signature(secret, request.headers.get(SIGNATURE_HEADER),
                                              request.headers.get(TIMESTAMP_HEADER), body, now)
        except SignatureError as exc:
            raise ApiError(exc.code, exc.message) from None
        seen = f"slack:{signature}"
        if not self.replays.first_use(seen, now):
            raise ApiError("replayed_signature", "this Slack request was already handled")
        return seen

    def _validate(self, payload: JSONObject) -> Click | None:
        """The click in ``payload``; None for interactions pgvouch does not handle; else ApiError."""
        if payload.get("type") != "block_actions":
            return None  # nothing else is wired to pgvouch's messages
        response_url = payload.get("response_url")
        if not isinstance(response_url, str) or not allowed_response_url(
                response_url, self.slack.response_url_hosts):
            raise ApiError("bad_request", "response_url is missing or its host is not allowed "
                                          "(notify.slack.response_url_hosts)")
        actions = payload.get("actions")
        user = payload.get("user")
        if not isinstance(actions, list) or not actions or not isinstance(actions[0], dict) \
                or not isinstance(user, dict):
            raise ApiError("bad_request", "a block_actions payload needs user and actions")
        action_id, value = actions[0].get("action_id"), actions[0].get("value")
        if not isinstance(action_id, str) or not isinstance(value, str):
            raise ApiError("bad_request", "the action needs action_id and value")
        if action_id not in ACTIONS:
            raise ApiError("bad_request", f"unknown action {action_id!r}")
        try:
            request_id = normalize_request_id(value)
        except ValueError:
            raise ApiError("bad_request", f"not a request id: {value!r}") from None
        slack_id = user.get("id")
        return Click(response_url, action_id, request_id,
                     slack_id if isinstance(slack_id, str) else None, payload)

    # -- in the background -------------------------------------------------------
    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("a Slack click failed", exc_info=exc)

    async def _answer(self, click: Click, seen: str) -> None:
        name = self.by_slack_id.get(click.slack_id) if click.slack_id is not None else None
        if name is None:
            answer = slack_blocks.ephemeral(
                f"Your Slack user ({click.slack_id}) is not mapped to a pgvouch user: ask an admin to "
                "set slack_id for you in the pgvouch configuration. Nothing was recorded.")
        else:
            try:
                answer = await self._dispatch(click, name)
            except WorkflowError as exc:
                answer = slack_blocks.ephemeral(f"Not recorded: {exc.message}")
            except NotFound:
                answer = slack_blocks.ephemeral(f"There is no request {click.request_id} (any more).")
            except StoreUnavailable as exc:
                log.error("slack click on %s: the store is unavailable: %s", click.request_id, exc)
                self.replays.forget(seen)  # nothing happened: Slack's retry may come through
                answer = slack_blocks.ephemeral(STORE_DOWN)
        await self._respond(click.response_url, answer)

    async def _dispatch(self, click: Click, user: str) -> JSONObject:
        service, request_id = self.service, click.request_id
        if click.action_id == slack_blocks.ACTION_APPROVE:
            updated = await service.vote(request_id, user, "approve", None, via=VIA)
            return self._replace(updated, f"{user} approved via Slack")
        if click.action_id == slack_blocks.ACTION_DENY:
            current = await self._current(request_id)
            workflow.vote(current, user, "deny", "-", service.clock())  # refused now, not after the note
            link = request_link(self.settings, current.id)
            form = slack_blocks.deny_form(current, service.clock(), link=link)
            return {"replace_original": True, **form}
        if click.action_id == slack_blocks.ACTION_BACK:
            return self._replace(await self._current(request_id), None)
        note = _deny_note(click.payload)  # ACTION_DENY_CONFIRM, the last of ACTIONS
        if not note:
            return slack_blocks.ephemeral("Write why you deny (the requester sees it), then "
                                          "press Confirm deny again. Nothing was recorded.")
        updated = await service.vote(request_id, user, "deny", note[:MAX_NOTE], via=VIA)
        return self._replace(updated, f"{user} denied via Slack")

    async def _current(self, request_id: str) -> Request:
        found = await self.service.store.get(request_id)
        if found is None:
            raise NotFound(request_id)
        return found

    def _replace(self, request: Request, outcome: str | None) -> JSONObject:
        pending = request.status is Status.PENDING
        headline = HEADLINES[EventType.CREATED] if pending else f"is {request.status}"
        message = self.messages.message_for(request, self.service.clock(), headline, outcome)
        message.pop("channel", None)
        return {"replace_original": True, **message}

    async def _respond(self, url: str, message: JSONObject) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.post(url, json=message, allow_redirects=False,
                                          timeout=aiohttp.ClientTimeout(total=RESPONSE_TIMEOUT)) as answer:
                if not 200 <= answer.status < 300:
                    log.warning("slack response_url answered HTTP %d", answer.status)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("slack response_url POST failed: %s", type(exc).__name__)


def _parse_payload(body: bytes) -> JSONObject:
    try:
        form = parse_qs(body.decode("utf-8"), strict_parsing=True)
        [raw] = form["payload"]
        payload: Any = json.loads(raw)
    except (UnicodeDecodeError, ValueError, KeyError):
        raise ApiError("bad_request", "expected a form body with payload=<json>") from None
    if not isinstance(payload, dict):
        raise ApiError("bad_request", "payload must be a JSON object")
    return payload


def _deny_note(payload: JSONObject) -> str:
    """The note typed into the deny form (``state.values``), stripped; "" if none."""
    try:
        value = payload["state"]["values"][slack_blocks.NOTE_BLOCK][slack_blocks.NOTE_ACTION]["value"]
    except (KeyError, TypeError):
        return ""
    return value.strip() if isinstance(value, str) else ""
