"""The per-channel delivery seam: dispatch by channel, unknown channels, announcements.

A real SQLite store, a real signed-webhook receiver on 127.0.0.1 and the
real :class:`DeliveryWorker`; a second channel is plugged in through the
:class:`~approvals.channels.Sender` protocol the way Slack and email are.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from approvals.channels import Announcement, DeliveryFailed
from approvals.model import Request
from approvals.service import ApprovalService
from approvals.store import Delivery, DeliveryStatus, Outbound, Store, open_store
from approvals.webhooks import DeliveryWorker
from approvals.workflow import Event
from config.settings import Settings, Webhook
from tests.approvals.api_harness import WEBHOOK_SECRET, WEBHOOK_SECRET_ENV, Clock, make_settings
from tests.approvals.helpers import DIRECTORY, make_request
from tests.approvals.test_webhooks import running_receiver


class Recorder:
    """A channel that records what it was handed (and fails on demand)."""

    channel = "pager"

    def __init__(self) -> None:
        self.sent: list[Delivery] = []
        self.fail: str | None = None
        self.closed = False

    def for_event(self, event: Event, request: Request) -> Sequence[Outbound]:
        return [Outbound("pager", "oncall", {"event": str(event.type), "request": {"id": request.id}})]

    def for_announcement(self, announcement: Announcement) -> Sequence[Outbound]:
        return [Outbound("pager", "oncall", {"event": announcement.type, "data": announcement.data})]

    async def send(self, delivery: Delivery) -> None:
        if self.fail is not None:
            raise DeliveryFailed(self.fail)
        self.sent.append(delivery)

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WEBHOOK_SECRET_ENV, WEBHOOK_SECRET)


@dataclass
class _Channels:
    clock: Clock
    store: Store
    pager: Recorder
    receiver: Any
    settings: Settings
    service: ApprovalService


@asynccontextmanager
async def _channels(tmp_path: Path, hook_events: tuple[str, ...]) -> AsyncIterator[_Channels]:
    """A store, a webhook receiver hearing ``hook_events``, a pager channel and the service."""
    clock = Clock()
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = await open_store(url)
    pager = Recorder()
    try:
        async with running_receiver(clock) as receiver:
            settings = make_settings(webhooks=[Webhook(receiver.url, WEBHOOK_SECRET_ENV)], store=url)
            service = ApprovalService(store, DIRECTORY, webhooks=[(receiver.url, hook_events)],
                                      notifiers=[pager], clock=clock)
            yield _Channels(clock, store, pager, receiver, settings, service)
    finally:
        await store.close()


async def test_deliveries_go_to_their_channels_sender(tmp_path: Path, secrets_env: None) -> None:
    async with _channels(tmp_path, ("request.created",)) as c:
        clock, store, pager, receiver, settings, service = (
            c.clock, c.store, c.pager, c.receiver, c.settings, c.service)
        request = await service.create(make_request(now=clock()))
        await store.enqueue_delivery("carrier-pigeon", "loft", {"event": "request.created"})
        worker = DeliveryWorker(store, settings, senders=[pager], clock=clock)
        assert await worker.run_once() == 3
        await worker.close()
        assert pager.closed
        assert receiver.events == ["request.created"] and receiver.received[0].verified
        [paged] = pager.sent
        assert (paged.channel, paged.target, paged.payload["request"]["id"]) == (
            "pager", "oncall", request.id)
        status = {d.channel: (d.status, d.last_error) for d in await store.list_deliveries()}
        assert status["webhook"][0] is DeliveryStatus.DELIVERED
        assert status["pager"][0] is DeliveryStatus.DELIVERED
        # no sender for it: dead at once (retrying cannot help), and the batch went on
        assert status["carrier-pigeon"] == (
            DeliveryStatus.DEAD, "this pgvouch has no sender for channel 'carrier-pigeon'")


async def test_a_failing_channel_is_retried_like_webhooks(tmp_path: Path) -> None:
    clock = Clock()
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = await open_store(url)
    pager = Recorder()
    try:
        service = ApprovalService(store, DIRECTORY, notifiers=[pager], clock=clock)
        await service.create(make_request(now=clock()))
        pager.fail = "pager network down"
        worker = DeliveryWorker(store, make_settings(store=url), senders=[pager], clock=clock)
        assert await worker.run_once() == 1
        [queued] = await store.list_deliveries()
        assert (queued.status, queued.last_error) == (DeliveryStatus.PENDING, "pager network down")
        pager.fail = None
        clock.advance(5)
        assert await worker.run_once() == 1
        [delivered] = await store.list_deliveries()
        assert (delivered.status, delivered.attempts) == (DeliveryStatus.DELIVERED, 2)
    finally:
        await store.close()


async def test_announce_audits_and_reaches_every_channel(tmp_path: Path, secrets_env: None) -> None:
    # a webhook filtered to one request event still hears announcements
    async with _channels(tmp_path, ("request.denied",)) as c:
        clock, store, pager, receiver, settings, service = (
            c.clock, c.store, c.pager, c.receiver, c.settings, c.service)
        await service.announce("approval_mode.off", "frank",
                               {"resources": "prod-*", "reason": "incident 4711"})
        [event] = await store.audit()
        assert (event.type, event.actor, event.request_id) == ("approval_mode.off", "frank", None)
        assert event.data == {"resources": "prod-*", "reason": "incident 4711"}
        worker = DeliveryWorker(store, settings, senders=[pager], clock=clock)
        assert await worker.run_once() == 2
        await worker.close()
        [hook] = receiver.received
        assert hook.verified
        assert hook.body == {"event": "approval_mode.off", "at": clock(), "actor": "frank",
                             "data": {"resources": "prod-*", "reason": "incident 4711"}}
        assert hook.headers["X-Pgvouch-Event"] == "approval_mode.off"
        assert [d.payload["data"]["reason"] for d in pager.sent] == ["incident 4711"]
        with pytest.raises(ValueError, match="must not use the keys"):
            await service.announce("approval_mode.on", "frank", {"type": "x"})
