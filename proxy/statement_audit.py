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
from typing import Any

from approvals.store import Store, StoreError
from policies.classify import Classification
from proxy import sqlstate
from proxy.decide import ALLOW, Decision, SessionInfo, Unit, deny

log = logging.getLogger("pgvouch.audit")

QUEUE_LIMIT = 10_000


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
    """Writes statement events: durably on demand, or queued in the background."""

    def __init__(self, store: Store, *, reads: bool = False) -> None:
        self.store = store
        self.reads = reads
        self._queue: list[dict[str, Any]] = []
        self._wakeup = asyncio.Event()
        self.dropped = 0

    def enqueue(self, event: dict[str, Any]) -> None:
        if len(self._queue) >= QUEUE_LIMIT:
            self.dropped += 1
            return
        self._queue.append(event)
        self._wakeup.set()

    async def run(self, interval: float = 0.5) -> None:
        """Flush the queue in batches until cancelled (then flush what is left)."""
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                await self.flush()
                await asyncio.sleep(interval)
        finally:
            await self.flush()

    async def flush(self) -> None:
        batch, self._queue = self._queue, []
        if not batch:
            return
        try:
            await self.store.append_audit_many(batch)
        except StoreError as exc:
            log.error("could not write %d queued audit event(s): %s; will retry", len(batch), exc)
            self._queue[:0] = batch[: QUEUE_LIMIT - len(self._queue)]
            self._wakeup.set()


class AuditedAllow:
    """A one-write hold: record the statement durably, then let it run."""

    heartbeat_interval = 60.0

    def __init__(self, auditor: StatementAuditor, event: dict[str, Any]) -> None:
        self.auditor = auditor
        self.event = event

    async def start(self) -> Decision | str:
        try:
            await self.auditor.store.append_audit(self.event)
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
