"""The approvals service: the workflow applied to the store, for every caller.

Owns: every state change of a request as one step (load, apply a pure
workflow transition, write it with its audit events and notification
deliveries atomically via compare-and-swap, wake whoever waits on it);
announcements that belong to no request (:meth:`ApprovalService.announce`);
waiting for a request to be decided; the sweep (pending requests past
their expiry, grants past their window); the ``before_approve``
hook (the impact preview's refresh) before an approval on a missing or
stale preview is applied. The proxy (holds), the REST API,
webhooks and the admin console all go through this one class, so a rule
lives in exactly one place (``approvals.workflow``).

Must not: speak HTTP or the PostgreSQL protocol, or format user-facing
protocol errors.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from approvals import preview, workflow
from approvals.audit import request_record
from approvals.channels import WEBHOOK, Announcement, Notifier
from approvals.model import Request, Status, SubjectKind, request_fields
from approvals.store import Conflict, Effects, NotFound, Outbound, Store
from approvals.workflow import Event, Outcome, WorkflowError

log = logging.getLogger("pgvouch.approvals")

FINAL = frozenset({Status.DENIED, Status.CANCELLED, Status.EXPIRED, Status.EXECUTED,
                   Status.FAILED, Status.REVOKED})

Transition = Callable[[Request, float], Outcome]
# Refreshes a statement's missing or stale impact preview before ``user``'s approval is applied.
BeforeApprove = Callable[[Request, str], Awaitable[None]]


class ApprovalService:
    def __init__(
        self,
        store: Store,
        directory: Mapping[str, Sequence[str]],
        *,
        webhooks: Sequence[tuple[str, Sequence[str]]] = (),
        notifiers: Sequence[Notifier] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.directory = {user: tuple(groups) for user, groups in directory.items()}
        self.webhooks = [(url, frozenset(events)) for url, events in webhooks]
        self.notifiers = list(notifiers)  # other channels (Slack, email): see approvals.channels
        self.clock = clock
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self.listeners: list[Callable[[Request, Sequence[Event]], Awaitable[None] | None]] = []
        self.before_approve: BeforeApprove | None = None

    # -- effects ---------------------------------------------------------------
    def effects_for(self, request: Request, events: Sequence[Event]) -> Effects:
        audit = [request_record(event, request) for event in events]
        deliveries = []
        for event in events:
            payload = webhook_payload(event, request, self.directory)
            for url, wanted in self.webhooks:
                if not wanted or str(event.type) in wanted:
                    deliveries.append(Outbound(WEBHOOK, url, payload))
            for notifier in self.notifiers:
                deliveries.extend(notifier.for_event(event, request))
        return Effects(audit=audit, deliveries=deliveries)

    def announcement_deliveries(self, announcement: Announcement) -> list[Outbound]:
        """Every channel's deliveries of ``announcement`` (every webhook, whatever its ``events``)."""
        payload = announcement_payload(announcement)
        deliveries = [Outbound(WEBHOOK, url, payload) for url, _ in self.webhooks]
        for notifier in self.notifiers:
            deliveries.extend(notifier.for_announcement(announcement))
        return deliveries

    async def announce(self, event_type: str, actor: str, data: Mapping[str, Any]) -> None:
        """Audit ``event_type`` (e.g. ``approval_mode.off``) and queue it to every channel.

        ``data`` is the event's JSON detail (``type``, ``actor``, ``at`` and
        ``request_id`` are reserved). The audit record is written first: if
        the store is down this raises StoreUnavailable and nothing was
        announced. The deliveries are queued right after it (not in the same
        transaction), through the same durable queue as request events.
        """
        reserved = {"type", "actor", "at", "request_id"} & set(data)
        if reserved:
            raise ValueError(f"announcement data must not use the keys {sorted(reserved)}")
        announcement = Announcement(event_type, actor, self.clock(), dict(data))
        await self.store.append_audit(
            {"type": event_type, "actor": actor, "at": announcement.at, **announcement.data})
        for outbound in self.announcement_deliveries(announcement):
            await self.store.enqueue_delivery(outbound.channel, outbound.target, outbound.payload)
        log.info("announced %s by %s", event_type, actor)

    async def _changed(self, request: Request, events: Sequence[Event]) -> None:
        for waiter in self._waiters.pop(request.id, []):
            if not waiter.done():
                waiter.set_result(None)
        for listener in self.listeners:
            try:
                result = listener(request, events)
                if result is not None:
                    await result
            except Exception:  # a listener (metrics, SSE) must not break the workflow
                log.exception("request listener failed")

    def wake(self, request_id: str) -> None:
        """Another replica changed a request: let local waiters re-read it."""
        for waiter in self._waiters.pop(request_id, []):
            if not waiter.done():
                waiter.set_result(None)

    def wake_all(self) -> None:
        """Every local waiter re-reads (changes may have gone unannounced, e.g. during a reconnect)."""
        for request_id in list(self._waiters):
            self.wake(request_id)

    # -- creating ----------------------------------------------------------------
    async def create(self, request: Request) -> Request:
        events = workflow.submitted_events(request)
        stored = await self.store.create(request, effects=lambda r: self.effects_for(
            r, [Event(e.type, r.id, e.actor, e.at, e.data) for e in events]))
        await self._changed(stored, events)
        log.info("request %s created by %s on %s/%s", stored.id, stored.requester,
                 stored.resource, stored.account)
        return stored

    # -- transitions -------------------------------------------------------------------
    async def apply(self, request_id: str, transition: Transition, *, attempts: int = 5) -> Request:
        """Apply a workflow transition with compare-and-swap; retried on a race."""
        for _ in range(attempts):
            current = await self.store.get(request_id)
            if current is None:
                raise NotFound(request_id)
            outcome = transition(current, self.clock())
            try:
                stored = await self.store.update(
                    outcome.request, current.version,
                    effects=self.effects_for(outcome.request, outcome.events),
                )
            except Conflict:
                continue  # someone else moved it first: re-read and re-check the rules
            await self._changed(stored, outcome.events)
            return stored
        raise WorkflowError(workflow.Code.NOT_PENDING, f"{request_id} is changing too fast; retry")

    async def vote(
        self, request_id: str, user: str, decision: str, note: str | None, *, via: str | None = None
    ) -> Request:
        """``user`` votes; ``via`` names who cast it for them (an integration), kept in the events."""
        if self.before_approve is not None and decision == "approve":
            await self._refresh_preview(request_id, user, note)

        def transition(request: Request, now: float) -> Outcome:
            outcome = workflow.vote(request, user, decision, note, now)
            return outcome if via is None else _cast_via(outcome, via)

        return await self.apply(request_id, transition)

    async def _refresh_preview(self, request_id: str, user: str, note: str | None) -> None:
        """Run ``before_approve`` if this approval would be accepted on a missing or stale preview.

        A failing refresh is logged (the hook records failed previews itself)
        and never blocks the vote.
        """
        hook = self.before_approve
        if hook is None:
            return
        current = await self.store.get(request_id)
        if current is None or current.subject_kind is not SubjectKind.STATEMENT:
            return
        now = self.clock()
        if current.status is not Status.PENDING or not preview.needs_refresh(current.preview, now):
            return
        try:
            workflow.vote(current, user, "approve", note, now)
        except WorkflowError:
            return  # the vote itself will be refused, with this very error
        try:
            await hook(current, user)
        except Exception:
            log.exception("refreshing the impact preview of %s failed; the vote goes on", request_id)

    async def cancel(self, request_id: str, user: str, note: str | None = None) -> Request:
        return await self.apply(request_id, lambda r, now: workflow.cancel(r, user, now, note))

    async def revoke(self, request_id: str, user: str, note: str | None = None) -> Request:
        return await self.apply(request_id, lambda r, now: workflow.revoke(r, user, now, note))

    async def consume(self, request_id: str) -> Request:
        return await self.apply(request_id, workflow.consume)

    async def finished(self, request_id: str, ok: bool, error: str | None) -> Request:
        if ok:
            return await self.apply(request_id, workflow.mark_executed)
        return await self.apply(
            request_id, lambda r, now: workflow.mark_failed(r, error or "failed", now))

    async def expire_due(self) -> int:
        """Expire every pending request past its time (exactly once, across replicas)."""
        count = 0
        for request in await self.store.pending_due(self.clock()):
            try:
                await self.apply(request.id, workflow.expire, attempts=1)
                count += 1
            except (WorkflowError, Conflict, NotFound):
                continue  # decided or expired by someone else meanwhile
        return count

    async def end_due_grants(self) -> int:
        """End every approved grant whose window has passed (exactly once, across replicas)."""
        count = 0
        for grant in await self.store.grants_due(self.clock()):
            try:
                await self.apply(grant.id, workflow.end_grant, attempts=1)
                count += 1
            except (WorkflowError, Conflict, NotFound):
                continue  # revoked or ended by someone else meanwhile
        return count

    # -- waiting ---------------------------------------------------------------------
    async def wait_change(self, request_id: str, within: float) -> None:
        """Return when the request changes here, or after ``within`` seconds (poll fallback)."""
        future = self.watch(request_id)
        try:
            await asyncio.wait_for(future, within)
        except TimeoutError:
            pass
        finally:
            self.unwatch(request_id, future)

    def watch(self, request_id: str) -> asyncio.Future[None]:
        """A future done at the request's next change, here or (``wake``) on another replica.

        Take it *before* re-reading the request, so a change that commits while
        the read is in flight is not missed; ``unwatch`` it when done.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(request_id, []).append(future)
        return future

    def unwatch(self, request_id: str, future: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(request_id)
        if waiters and future in waiters:
            waiters.remove(future)
            if not waiters:
                del self._waiters[request_id]

    async def run_sweeper(self, interval: float = 5.0) -> None:
        while True:
            try:
                expired = await self.expire_due()
                if expired:
                    log.info("expired %d request(s)", expired)
                ended = await self.end_due_grants()
                if ended:
                    log.info("ended %d grant(s) whose window passed", ended)
            except Exception:
                log.exception("expiry sweep failed; will retry")
            await asyncio.sleep(interval)


def webhook_payload(event: Event, request: Request, directory: Mapping[str, Sequence[str]]
                    ) -> dict[str, Any]:
    """The JSON body of an outbound event (never the requester among the approvers)."""
    now = event.at
    progress = workflow.progress(request, now)
    payload: dict[str, Any] = {
        "event": str(event.type),
        "at": event.at,
        "actor": event.actor,
        "request": {
            **request_fields(request),
            "progress": progress.summary(),
            "preview": preview.render(request.preview, now),
        },
        "eligible_approvers": sorted(p for p in progress.may_vote if p != request.requester),
    }
    if event.data:
        payload["data"] = event.data
    return payload


def announcement_payload(announcement: Announcement) -> dict[str, Any]:
    """The JSON body of an announcement's webhook (``event`` is its type; no ``request``)."""
    return {
        "event": announcement.type,
        "at": announcement.at,
        "actor": announcement.actor,
        "data": announcement.data,
    }


def _cast_via(outcome: Outcome, via: str) -> Outcome:
    """The vote's events marked with who cast it on the voter's behalf (audit and webhooks show it)."""
    return Outcome(outcome.request, [replace(e, data={**e.data, "via": via}) for e in outcome.events])


def is_final(request: Request) -> bool:
    return request.status in FINAL


def is_statement(request: Request) -> bool:
    return request.subject_kind is SubjectKind.STATEMENT
