"""Auditing the statements the proxy decides on.

Owns: the audit events ``statement.allowed`` / ``statement.denied`` /
``statement.held`` (held ones are recorded by the approvals workflow as
``request.*`` events). An allowed statement that is not a plain read is
recorded *durably before it is forwarded*: the session holds it for the one
store write (:class:`AuditedAllow`), and if the store cannot be written the
statement is refused (fail closed). Reads are not audited unless
``audit.reads: true``; then, like denials, they are queued and written in
batches in the background, so they never wait for a database round trip.

Must not: classify or decide (the policy decider does).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from approvals.store import Store, StoreError
from policies.classify import Classification
from policies.evaluate import Decision as PolicyDecision
from proxy import sqlstate
from proxy.decide import ALLOW, Decision, SessionInfo, Unit, deny

log = logging.getLogger("pgvouch.audit")

QUEUE_LIMIT = 10_000


@dataclass(frozen=True)
class ReviewedUnit:
    """A unit a policy put up for review, with what the decision was based on."""

    session: SessionInfo
    unit: Unit
    classification: Classification
    decision: PolicyDecision

    def event(self, kind: str, reason: str) -> dict[str, Any]:
        """Its audit event of type ``kind`` (see :func:`statement_event`)."""
        return statement_event(kind, self.session, self.unit, self.classification,
                               self.decision.policy, reason)


def review_store_unavailable() -> Decision:
    """The refusal of a statement that needs approval while the approvals store is down."""
    return deny("pgvouch: the approvals store is unavailable, so this statement, which "
                "needs approval, was not run", code=sqlstate.STORE_UNAVAILABLE)


def statement_event(kind: str, session: SessionInfo, unit: Unit, classification: Classification,
                    policy: str | None, reason: str) -> dict[str, Any]:
    return {
        "type": kind,
        "actor": session.user,
        "at": time.time(),
        "session": session.session_id,
        "resource": session.resource,
        "account": session.account,
        "client": session.client_addr,
        "application_name": session.application_name,
        "statements": [s.sql for s in unit.statements],
        "kinds": sorted({s.kind.value for s in classification.statements}),
        "tables": sorted({t for s in classification.statements for t in s.tables}),
        "policy": policy,
        "reason": reason,
    }


class StatementAuditor:
    """Writes statement events: durably on demand (group commit), or queued.

    Durable events from concurrent sessions are written together in one
    store transaction (one fsync for the group); each waiting statement goes
    on only once its event is committed. Queued events (denials, reads) ride
    along with the next group, or are flushed every ``interval`` seconds.
    """

    def __init__(self, store: Store, *, reads: bool = False) -> None:
        self.store = store
        self.reads = reads
        self._queue: list[dict[str, Any]] = []
        self._durable: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._running = False
        self.dropped = 0

    def enqueue(self, event: dict[str, Any]) -> None:
        if len(self._queue) >= QUEUE_LIMIT:
            self.dropped += 1
            return
        self._queue.append(event)

    async def durable(self, event: dict[str, Any]) -> None:
        """Return once ``event`` is committed; StoreError if it cannot be."""
        if not self._running:  # no writer loop (tools, tests): write it alone
            await self.store.append_audit(event)
            return
        future = asyncio.get_running_loop().create_future()
        self._durable.append((event, future))
        self._wakeup.set()
        await future

    async def run(self, interval: float = 0.5) -> None:
        """Write groups until cancelled (then flush what is left)."""
        self._running = True
        try:
            while True:
                try:
                    await asyncio.wait_for(self._wakeup.wait(), interval)
                except TimeoutError:
                    pass
                self._wakeup.clear()
                await self.flush()
        finally:
            self._running = False
            await self.flush()

    async def flush(self) -> None:
        waiting, self._durable = self._durable, []
        queued, self._queue = self._queue, []
        if not waiting and not queued:
            return
        try:
            await self.store.append_audit_many([event for event, _ in waiting] + queued)
        except Exception as exc:  # every waiter must hear back, whatever went wrong
            log.error("could not write %d audit event(s): %s", len(waiting) + len(queued), exc)
            error = exc if isinstance(exc, StoreError) else StoreError(str(exc))
            for _, future in waiting:
                if not future.done():
                    future.set_exception(error)
            self._queue[:0] = queued[: QUEUE_LIMIT - len(self._queue)]
            return
        for _, future in waiting:
            if not future.done():
                future.set_result(None)


class AuditedAllow:
    """A one-write hold: record the statement durably, then let it run."""

    heartbeat_interval = 60.0

    def __init__(self, auditor: StatementAuditor, event: dict[str, Any]) -> None:
        self.auditor = auditor
        self.event = event

    async def start(self) -> Decision | str:
        try:
            await self.auditor.durable(self.event)
        except StoreError as exc:
            log.error("audit store unavailable, statement refused: %s", exc)
            return deny("pgvouch: the audit log cannot be written, so this statement was not run",
                        code=sqlstate.STORE_UNAVAILABLE)
        return ALLOW

    def outcome(self) -> Awaitable[Decision]:
        raise AssertionError("an audited allow is decided in start()")

    def heartbeat(self) -> str | None:
        return None

    def cancel(self, reason: str) -> None:
        return None

    def finished(self, ok: bool, error: str | None) -> None:
        if not ok:
            self.auditor.enqueue({**self.event, "type": "statement.failed", "at": time.time(),
                                  "error": error})
