"""The seam between the approvals service and its notification channels.

Owns: what a channel plugs in on each side of the durable delivery queue.
On the queueing side a :class:`Notifier` turns a workflow event (or an
:class:`Announcement` that belongs to no request, such as break-glass) into
:class:`~approvals.store.Outbound` deliveries with a finished payload; the
service writes them in the same transaction as the request change. On the
sending side a :class:`Sender` delivers one queued payload and raises
:class:`DeliveryFailed` when it could not, which the
:class:`~approvals.webhooks.DeliveryWorker` turns into a retry (or a dead
delivery when ``permanent``).

Must not: know any channel (webhooks, Slack and email live in their own
modules and implement these protocols), touch the store or decide anything
about requests.

Notifiers run inside the store's transaction callback: they must be pure,
fast and never raise for a well-formed request (they see only the request,
the event and the settings they were built with).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from approvals.model import JSONObject, Request
from approvals.store import Delivery, Outbound
from approvals.workflow import Event

WEBHOOK = "webhook"
SLACK = "slack"
EMAIL = "email"


@dataclass(frozen=True)
class Announcement:
    """Something every channel should hear that is not a request's event (``approval_mode.off``)."""

    type: str
    actor: str
    at: float
    data: JSONObject


class DeliveryFailed(Exception):
    """One attempt did not go through; the message is kept as the delivery's ``last_error``.

    ``permanent``: trying again cannot help (no sender for the channel), so the
    delivery is dead at once instead of retried with backoff.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class Notifier(Protocol):
    """Builds one channel's deliveries at queue time (pure; see the module docstring)."""

    channel: str

    def for_event(self, event: Event, request: Request) -> Sequence[Outbound]: ...

    def for_announcement(self, announcement: Announcement) -> Sequence[Outbound]: ...


class Sender(Protocol):
    """Delivers one channel's queued payloads; raises :class:`DeliveryFailed`."""

    channel: str

    async def send(self, delivery: Delivery) -> None: ...

    async def close(self) -> None: ...
