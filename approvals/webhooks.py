"""Signed webhooks: delivering outbound events, and checking inbound decisions.

Owns: the signature scheme both directions share (``X-Pgvouch-Signature:
t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``: :func:`sign`,
:func:`check_signature`, :func:`verify`), the replay guard for inbound
hooks (:class:`ReplayGuard`), which approvers an integration may speak for
(:func:`speaks_for`), the :class:`WebhookSender`, and the
:class:`DeliveryWorker` that drains the store's durable delivery queue with
retries and backoff, handing each delivery to the sender of its channel
(webhook here; Slack and email plug in through ``approvals.channels``).

Must not: decide anything about requests (inbound decisions go through
``ApprovalService.vote`` like any other vote), build event payloads (the
service queues them with each transition), or run on the proxy's hot path:
the worker is a background task, and a slow or dead receiver only delays its
own deliveries.

Delivery is at least once. Each delivery carries ``X-Pgvouch-Delivery: <id>``
so a receiver can drop duplicates (a worker that dies after the receiver
answered but before the store recorded it will deliver again once its lease
runs out). The signature's timestamp is taken when a delivery is sent, so a
retry an hour later still falls inside the receiver's replay window.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from enum import StrEnum
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from prometheus_client import Counter

from approvals.channels import WEBHOOK, DeliveryFailed, Sender
from approvals.model import canonical_json
from approvals.store import Delivery, Store, StoreUnavailable
from approvals.workflow import GROUP_PREFIX
from config.settings import Integration, Settings
from config.yamlnodes import ConfigError

log = logging.getLogger("pgvouch.webhooks")

SIGNATURE_HEADER = "X-Pgvouch-Signature"
DELIVERY_HEADER = "X-Pgvouch-Delivery"
EVENT_HEADER = "X-Pgvouch-Event"
SIGNATURE_VERSION = "v1"
REPLAY_WINDOW = 300.0  # seconds a signature's timestamp may differ from our clock

WEBHOOK_CHANNEL = WEBHOOK
SEND_TIMEOUT = 5.0
# Seconds to wait after the 1st, 2nd, ... failed attempt; the last entry repeats.
BACKOFF: tuple[float, ...] = (5.0, 30.0, 120.0, 600.0, 3600.0)
MAX_ATTEMPTS = 8  # after this many failed attempts a delivery is dead
LEASE_SECONDS = 60.0  # a claimed delivery is due again if its worker vanished this long
MAX_ERROR_LENGTH = 500


# -- signatures ----------------------------------------------------------------


class SignatureCode(StrEnum):
    MISSING = "missing_signature"
    MALFORMED = "malformed_signature"
    STALE = "stale_signature"
    BAD = "bad_signature"
    REPLAYED = "replayed_signature"


class SignatureError(Exception):
    """A signature that does not authenticate its body; ``code`` is stable."""

    def __init__(self, code: SignatureCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _digest(secret: str, body: bytes, t: int) -> str:
    signed = str(t).encode("ascii") + b"." + body
    return hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, t: int | float) -> str:
    """The ``X-Pgvouch-Signature`` value for ``body`` sent at unix time ``t``."""
    stamp = int(t)
    return f"t={stamp},{SIGNATURE_VERSION}={_digest(secret, body, stamp)}"


def parse_signature(header: str | None) -> tuple[int, list[str]]:
    """The timestamp and the ``v1`` digests of a header value; SignatureError if unusable."""
    if not header:
        raise SignatureError(SignatureCode.MISSING, f"the {SIGNATURE_HEADER} header is missing")
    stamp: int | None = None
    digests: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            try:
                stamp = int(value)
            except ValueError:
                stamp = None
        elif key == SIGNATURE_VERSION and value:
            digests.append(value.lower())
    if stamp is None or not digests:
        raise SignatureError(
            SignatureCode.MALFORMED,
            f"{SIGNATURE_HEADER} must look like t=<unix seconds>,{SIGNATURE_VERSION}=<hex HMAC-SHA256>",
        )
    return stamp, digests


def check_signature(
    secret: str, header: str | None, body: bytes, now: float, window: float = REPLAY_WINDOW
) -> str:
    """The matching digest if ``header`` signs ``body`` within ``window`` of ``now``.

    Otherwise SignatureError: missing, malformed, stale (the timestamp is
    more than ``window`` seconds away from ``now``) or bad. Several ``v1``
    entries are allowed (a sender rotating its secret); each is compared in
    constant time.
    """
    stamp, digests = parse_signature(header)
    if abs(now - stamp) > window:
        raise SignatureError(
            SignatureCode.STALE,
            f"the signature's timestamp is {int(abs(now - stamp))}s away from the server's clock "
            f"(at most {int(window)}s allowed); sign the request when you send it",
        )
    expected = _digest(secret, body, stamp).encode("ascii")
    matched: str | None = None
    for digest in digests:
        if hmac.compare_digest(expected, digest.encode("ascii", "replace")) and matched is None:
            matched = digest
    if matched is None:
        raise SignatureError(
            SignatureCode.BAD,
            "the signature does not match the body (wrong secret, or the body changed after signing)",
        )
    return matched


def verify(secret: str, header: str | None, body: bytes, now: float, window: float = REPLAY_WINDOW) -> bool:
    """Whether ``header`` is a valid, fresh signature of ``body`` (what receivers call)."""
    try:
        check_signature(secret, header, body, now, window)
    except SignatureError:
        return False
    return True


class ReplayGuard:
    """Remembers signatures seen within the replay window, so each is accepted once.

    Bounded: entries older than the window are dropped (their timestamp
    would be refused as stale anyway), and beyond ``capacity`` the oldest
    are forgotten first. This is per process: across replicas a replayed
    vote still fails, as ``already_reviewed``, because the store records
    every vote and one person counts once per request. The guard makes a
    replay fail loudly (``replayed_signature``) rather than look like a
    second decision.
    """

    def __init__(self, window: float = REPLAY_WINDOW, capacity: int = 10_000) -> None:
        self.window = window
        self.capacity = capacity
        self._seen: OrderedDict[str, float] = OrderedDict()

    def first_use(self, signature: str, now: float) -> bool:
        """Record ``signature``; False if it was already used."""
        # A timestamp up to one window ahead stays acceptable for two windows after first use.
        self._forget_older_than(now - 2 * self.window)
        if signature in self._seen:
            return False
        self._seen[signature] = now
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return True

    def forget(self, signature: str) -> None:
        """Accept ``signature`` again (its call had no effect, e.g. the store was down)."""
        self._seen.pop(signature, None)

    def _forget_older_than(self, cutoff: float) -> None:
        while self._seen:
            oldest = next(iter(self._seen.values()))
            if oldest >= cutoff:
                return
            self._seen.popitem(last=False)

    def __len__(self) -> int:
        return len(self._seen)


def speaks_for(integration: Integration, approver: str, groups: Sequence[str]) -> bool:
    """Whether ``integration`` may cast votes as ``approver`` (who is in ``groups``)."""
    for allowed in integration.approvers:
        if allowed.startswith(GROUP_PREFIX):
            if allowed[len(GROUP_PREFIX) :] in groups:
                return True
        elif allowed == approver:
            return True
    return False


# -- outbound delivery ---------------------------------------------------------


def retry_at(attempts: int, now: float) -> float | None:
    """When to try again after ``attempts`` failed attempts; None: give up."""
    if attempts >= MAX_ATTEMPTS:
        return None
    return now + BACKOFF[min(max(attempts, 1), len(BACKOFF)) - 1]


def redact_url(url: str) -> str:
    """``url`` without credentials or query string, for listings and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


SessionFactory = Callable[[], aiohttp.ClientSession]


class DeliveryWorker:
    """Sends queued deliveries from the store through their channel's sender, retrying with backoff.

    Run ``run(interval)`` as a background task (cancel it to stop). Several
    workers (replicas) may share one store: ``claim_due_deliveries`` hands
    each delivery to exactly one of them, as a lease. The webhook sender is
    always there; ``senders`` adds others (Slack, email) or replaces it. A
    delivery for a channel without a sender is dead at once: it is recorded
    and never crashes the worker. ``counter``, if given, is a prometheus
    Counter with one label, ``result``: delivered, retry or dead.
    """

    def __init__(
        self,
        store: Store,
        settings: Settings,
        session_factory: SessionFactory = aiohttp.ClientSession,
        *,
        senders: Iterable[Sender] = (),
        counter: Counter | None = None,
        clock: Callable[[], float] = time.time,
        batch: int = 10,
        timeout: float = SEND_TIMEOUT,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        self.store = store
        self.settings = settings
        self.counter = counter
        self.clock = clock
        self.batch = batch
        self.lease_seconds = lease_seconds
        self.webhooks = WebhookSender(settings, session_factory, clock=clock, timeout=timeout)
        self.senders: dict[str, Sender] = {WEBHOOK_CHANNEL: self.webhooks}
        for sender in senders:
            self.senders[sender.channel] = sender

    async def run(self, interval: float = 1.0) -> None:
        """Deliver due deliveries every ``interval`` seconds until cancelled."""
        try:
            while True:
                try:
                    sent = await self.run_once()
                except StoreUnavailable as exc:
                    log.warning("webhook deliveries paused: %s", exc)
                    sent = 0
                except Exception:
                    log.exception("webhook delivery round failed; will retry")
                    sent = 0
                if sent < self.batch:
                    await asyncio.sleep(interval)
        finally:
            await self.close()

    async def run_once(self) -> int:
        """Claim the due deliveries (one batch), send them concurrently, record results."""
        due = await self.store.claim_due_deliveries(self.clock(), self.batch, self.lease_seconds)
        results = await asyncio.gather(*(self._deliver(delivery) for delivery in due), return_exceptions=True)
        for delivery, result in zip(due, results, strict=True):
            if isinstance(result, BaseException):
                # Most likely the store went away before the result was recorded: the
                # lease runs out and the delivery is sent again (at least once).
                log.warning("delivery %d: could not record the result: %s", delivery.id, result)
        return len(due)

    async def close(self) -> None:
        for sender in self.senders.values():
            await sender.close()

    async def _deliver(self, delivery: Delivery) -> None:
        try:
            await self._send(delivery)
        except DeliveryFailed as exc:
            error = str(exc)[:MAX_ERROR_LENGTH]
            next_at = None if exc.permanent else retry_at(delivery.attempts, self.clock())
            await self._finish(delivery, ok=False, error=error, next_attempt_at=next_at)
            result = "retry" if next_at is not None else "dead"
            log.warning(
                "%s delivery %d to %s failed (attempt %d, %s): %s",
                delivery.channel, delivery.id, redact_url(delivery.target), delivery.attempts,
                "will retry" if next_at is not None else "giving up", error,
            )
        else:
            await self._finish(delivery, ok=True)
            result = "delivered"
        if self.counter is not None:
            self.counter.labels(result).inc()

    async def _finish(
        self, delivery: Delivery, *, ok: bool, error: str | None = None, next_attempt_at: float | None = None
    ) -> None:
        recorded = await self.store.finish_delivery(
            delivery.id, ok, error, next_attempt_at, now=self.clock(), attempt=delivery.attempts
        )
        if not recorded:
            log.info("delivery %d was re-claimed after its lease ran out; result not recorded", delivery.id)

    async def _send(self, delivery: Delivery) -> None:
        sender = self.senders.get(delivery.channel)
        if sender is None:
            raise DeliveryFailed(
                f"this pgvouch has no sender for channel {delivery.channel!r}", permanent=True)
        await sender.send(delivery)


class WebhookSender:
    """POSTs a webhook delivery's JSON, signed with the secret of the webhook that has its url."""

    channel = WEBHOOK_CHANNEL

    def __init__(
        self,
        settings: Settings,
        session_factory: SessionFactory = aiohttp.ClientSession,
        *,
        clock: Callable[[], float] = time.time,
        timeout: float = SEND_TIMEOUT,
    ) -> None:
        self.clock = clock
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session_factory = session_factory
        self._session: aiohttp.ClientSession | None = None
        self._secrets: dict[str, Callable[[], str]] = {}
        for hook in settings.webhooks:  # the first webhook with a url signs for it
            self._secrets.setdefault(hook.url, hook.secret)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def send(self, delivery: Delivery) -> None:
        secret_of = self._secrets.get(delivery.target)
        if secret_of is None:
            raise DeliveryFailed("no webhook with this url is configured any more")
        try:
            secret = secret_of()
        except ConfigError as exc:
            raise DeliveryFailed(str(exc)) from None
        body = canonical_json(delivery.payload).encode("utf-8")
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "pgvouch-webhooks",
            SIGNATURE_HEADER: sign(secret, body, self.clock()),
            DELIVERY_HEADER: str(delivery.id),
            EVENT_HEADER: str(delivery.payload.get("event", "")),
        }
        if self._session is None:
            self._session = self._session_factory()
        try:
            async with self._session.post(
                delivery.target, data=body, headers=headers, timeout=self.timeout, allow_redirects=False
            ) as response:
                if not 200 <= response.status < 300:
                    raise DeliveryFailed(f"HTTP {response.status}{await response_excerpt(response)}")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise DeliveryFailed(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None


async def response_excerpt(response: aiohttp.ClientResponse, limit: int = 200) -> str:
    """``": <start of the body>"`` of a refused delivery, to help whoever reads ``last_error``."""
    try:
        text = (await response.content.read(limit)).decode("utf-8", "replace").strip()
    except (aiohttp.ClientError, TimeoutError):
        return ""
    return f": {text}" if text else ""
