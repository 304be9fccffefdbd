"""Slack: messages out through an incoming webhook, and Slack's request signatures.

Owns: which request events become a Slack message (:class:`SlackNotifier`,
queued on the durable delivery queue like webhooks), posting them to the
incoming-webhook URL (:class:`SlackSender`; the URL is a secret read from
the environment at send time and never logged or stored), Slack's signature
scheme for inbound interactions (``X-Slack-Signature: v0=<hex
HMAC-SHA256(signing secret, "v0:<timestamp>:<body>")>``, five-minute
window: :func:`slack_signature`, :func:`check_slack_signature`), and which
``response_url`` we may POST to (:func:`allowed_response_url`).

Must not: decide anything about requests (button clicks are handled by
``approvals.slack_interactions`` through ``ApprovalService.vote``) or build
Block Kit (``approvals.slack_blocks``).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Sequence
from urllib.parse import urlsplit

import aiohttp

from approvals import slack_blocks
from approvals.channels import SLACK, Announcement, DeliveryFailed
from approvals.model import JSONObject, Request
from approvals.store import Delivery, Outbound
from approvals.webhooks import REPLAY_WINDOW, SEND_TIMEOUT, SignatureCode, SignatureError, response_excerpt
from approvals.workflow import Event, EventType
from config.settings import Settings, SlackSettings
from config.yamlnodes import ConfigError

log = logging.getLogger("pgvouch.slack")

SIGNATURE_HEADER = "X-Slack-Signature"
TIMESTAMP_HEADER = "X-Slack-Request-Timestamp"
VERSION = "v0"

# The events that post a message, with the headline they get.
HEADLINES: dict[EventType, str] = {
    EventType.CREATED: "needs approval",
    EventType.STEP_COMPLETED: "passed a step; the next step needs approval",
    EventType.APPROVED: "was approved",
    EventType.DENIED: "was denied",
    EventType.EXPIRED: "expired without a decision",
    EventType.CANCELLED: "was cancelled by the requester",
    EventType.REVOKED: "was revoked",
    EventType.ENDED: "ended: its time window closed",
    EventType.FAILED: "was approved but failed to run",
}


def request_link(settings: Settings, request_id: str) -> str:
    """The request's page in the Activity Queue."""
    return f"{settings.api.base_url()}/requests/{request_id}"


class SlackNotifier:
    """Queues one message per notable event to the configured Slack incoming webhook."""

    channel = SLACK

    def __init__(self, settings: Settings) -> None:
        assert settings.slack is not None
        self.settings = settings
        self.slack: SlackSettings = settings.slack
        self.target = self.slack.channel or "incoming-webhook"

    def message_for(self, request: Request, now: float, headline: str, outcome: str | None = None
                    ) -> JSONObject:
        user = self.settings.users.get(request.requester)
        message = slack_blocks.request_message(
            request, now, headline=headline, link=request_link(self.settings, request.id),
            requester_mention=user.slack_id if user else None, outcome=outcome)
        if self.slack.channel:
            message["channel"] = self.slack.channel
        return message

    def for_event(self, event: Event, request: Request) -> Sequence[Outbound]:
        headline = HEADLINES.get(event.type)
        if headline is None:
            return []
        if event.type is EventType.STEP_COMPLETED and event.data.get("next_step") is None:
            return []  # the last step: the approved message says it
        payload = {"event": str(event.type), "request": {"id": request.id},
                   "message": self.message_for(request, event.at, headline)}
        return [Outbound(SLACK, self.target, payload)]

    def for_announcement(self, announcement: Announcement) -> Sequence[Outbound]:
        message = slack_blocks.announcement_message(
            announcement.type, announcement.actor, announcement.at, announcement.data)
        if self.slack.channel:
            message["channel"] = self.slack.channel
        return [Outbound(SLACK, self.target, {"event": announcement.type, "message": message})]


class SlackSender:
    """POSTs a queued message to the incoming-webhook URL (read from the environment each time)."""

    channel = SLACK

    def __init__(self, slack: SlackSettings, *, timeout: float = SEND_TIMEOUT) -> None:
        self.slack = slack
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def send(self, delivery: Delivery) -> None:
        try:
            url = self.slack.webhook_url()
        except ConfigError as exc:
            raise DeliveryFailed(str(exc)) from None
        message = delivery.payload.get("message")
        if not isinstance(message, dict):
            raise DeliveryFailed("the queued Slack delivery has no message", permanent=True)
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.post(url, json=message, timeout=self.timeout,
                                          allow_redirects=False) as response:
                if not 200 <= response.status < 300:
                    raise DeliveryFailed(f"HTTP {response.status}{await response_excerpt(response)}")
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            # The URL is a secret (it carries Slack's token): never in last_error or logs.
            text = str(exc).replace(url, "<slack webhook url>").replace(urlsplit(url).path, "/…")
            raise DeliveryFailed(f"{type(exc).__name__}: {text}".rstrip(": ")) from None


# -- inbound signatures --------------------------------------------------------


def slack_signature(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Slack-Signature`` value Slack sends for ``body`` at ``timestamp``."""
    base = f"{VERSION}:{timestamp}:".encode() + body
    return f"{VERSION}=" + hmac.new(secret.encode("utf-8"), base, hashlib.sha256).hexdigest()


def check_slack_signature(
    secret: str, signature: str | None, timestamp: str | None, body: bytes, now: float,
    window: float = REPLAY_WINDOW,
) -> str:
    """The signature if it signs ``body`` and ``timestamp`` is within ``window`` of ``now``.

    Otherwise SignatureError (missing, malformed, stale — too old or too far
    in the future — or bad); the comparison is constant-time.
    """
    if not signature or not timestamp:
        raise SignatureError(SignatureCode.MISSING,
                             f"{SIGNATURE_HEADER} and {TIMESTAMP_HEADER} are required")
    try:
        stamp = int(timestamp)
    except ValueError:
        raise SignatureError(SignatureCode.MALFORMED, f"{TIMESTAMP_HEADER} must be unix seconds") from None
    if not signature.startswith(f"{VERSION}="):
        raise SignatureError(SignatureCode.MALFORMED, f"{SIGNATURE_HEADER} must look like {VERSION}=<hex>")
    if abs(now - stamp) > window:
        raise SignatureError(SignatureCode.STALE,
                             f"the request timestamp is {int(abs(now - stamp))}s away from the server's "
                             f"clock (at most {int(window)}s allowed)")
    expected = slack_signature(secret, timestamp, body).encode("ascii")
    if not hmac.compare_digest(expected, signature.lower().encode("ascii", "replace")):
        raise SignatureError(SignatureCode.BAD, "the Slack signature does not match the body")
    return signature.lower()


def allowed_response_url(url: str, hosts: Sequence[str]) -> bool:
    """Whether we may POST to ``url``: one of ``hosts``, over https (http only to loopback)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return False
    if host is None or parts.username is not None or parts.password is not None:
        return False
    if host.lower() not in {h.lower() for h in hosts}:
        return False
    if parts.scheme == "https":
        return True
    return parts.scheme == "http" and _is_loopback(host)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"
