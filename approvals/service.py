"""The approvals service: the workflow applied to the store, for every caller.

Owns: every state change of a request as one step (load, apply a pure
workflow transition, write it with its audit events and webhook deliveries
atomically via compare-and-swap, wake whoever waits on it); waiting for a
request to be decided; the expiry sweep. The proxy (holds), the REST API,
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

from approvals import workflow
from approvals.audit import request_record
from approvals.model import Request, Status, SubjectKind
from approvals.store import Conflict, Effects, NotFound, Outbound, Store
from approvals.workflow import Event, Outcome, WorkflowError

log = logging.getLogger("pgvouch.approvals")

FINAL = frozenset({Status.DENIED, Status.CANCELLED, Status.EXPIRED, Status.EXECUTED,
                   Status.FAILED, Status.REVOKED})

Transition = Callable[[Request, float], Outcome]


class ApprovalService:
    def __init__(
        self,
        store: Store,
        directory: Mapping[str, Sequence[str]],
        *,
        webhooks: Sequence[tuple[str, Sequence[str]]] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.directory = {user: tuple(groups) for user, groups in directory.items()}
        self.webhooks = [(url, frozenset(events)) for url, events in webhooks]
        self.clock = clock
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self.listeners: list[Callable[[Request, Sequence[Event]], Awaitable[None] | None]] = []

    # -- effects ---------------------------------------------------------------
    def effects_for(self, request: Request, events: Sequence[Event]) -> Effects:
        audit = [request_record(event, request) for event in events]
        deliveries = []
        for event in events:
            payload = webhook_payload(event, request, self.directory)
            for url, wanted in self.webhooks:
                if not wanted or str(event.type) in wanted:
                    deliveries.append(Outbound("webhook", url, payload))
        return Effects(audit=audit, deliveries=deliveries)

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
        def transition(request: Request, now: float) -> Outcome:
            outcome = workflow.vote(request, user, decision, note, now)
            return outcome if via is None else _cast_via(outcome, via)

        return await self.apply(request_id, transition)

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

    # -- waiting ---------------------------------------------------------------------
    async def wait_change(self, request_id: str, within: float) -> None:
        """Return when the request changes here, or after ``within`` seconds (poll fallback)."""
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(request_id, []).append(future)
        try:
            await asyncio.wait_for(future, within)
        except TimeoutError:
            pass
        finally:
            waiters = self._waiters.get(request_id)
            if waiters and future in waiters:
                waiters.remove(future)

    async def run_sweeper(self, interval: float = 5.0) -> None:
        while True:
            try:
                expired = await self.expire_due()
                if expired:
                    log.info("expired %d request(s)", expired)
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
            "id": request.id,
            "kind": str(request.subject_kind),
            "status": str(request.status),
            "requester": request.requester,
            "resource": request.resource,
            "account": request.account,
            "policies": list(request.policies),
            "subject": request.subject,
            "created_at": request.created_at,
            "expires_at": request.expires_at,
            "note": request.note,
            "progress": progress.summary(),
        },
        "eligible_approvers": sorted(p for p in progress.may_vote if p != request.requester),
    }
    if event.data:
        payload["data"] = event.data
    return payload


def _cast_via(outcome: Outcome, via: str) -> Outcome:
    """The vote's events marked with who cast it on the voter's behalf (audit and webhooks show it)."""
    return Outcome(outcome.request, [replace(e, data={**e.data, "via": via}) for e in outcome.events])


def is_final(request: Request) -> bool:
    return request.status in FINAL


def is_statement(request: Request) -> bool:
    return request.subject_kind is SubjectKind.STATEMENT
