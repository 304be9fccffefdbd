"""Break-glass in the proxy: while approvals are off, a statement that would be held runs directly.

Owns: the check a :class:`~proxy.approval_hold.StatementHold` makes before
anything else. It asks the approval mode (``approvals.approval_mode``)
whether approvals are off for the session's resource; if they are, it writes
the statement's ``statement.break_glass`` audit event durably (with who
switched approvals off, when and why) and hands back the NOTICE the client
gets before the statement runs. Fail closed: a store that cannot answer, or
an audit event that cannot be written, refuses the statement.

Must not: evaluate policies (deny rules are decided before any hold, so they
still apply while approvals are off), change requests, or speak the protocol.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from approvals.approval_mode import ApprovalModes
from approvals.store import StoreError
from proxy import sqlstate
from proxy.decide import Decision, deny
from proxy.statement_audit import ReviewedUnit, StatementAuditor, review_store_unavailable

log = logging.getLogger("pgvouch.hold")

BREAK_GLASS_EVENT = "statement.break_glass"


class BreakGlassCheck:
    """For one unit a policy put up for review: does it run directly because approvals are off?"""

    def __init__(self, modes: ApprovalModes, auditor: StatementAuditor,
                 reviewed: ReviewedUnit) -> None:
        self.modes = modes
        self.auditor = auditor
        self.reviewed = reviewed
        self.event: dict[str, Any] | None = None  # the audit event of a unit that ran unreviewed

    async def run(self) -> Decision | str | None:
        """None: approvals are on (hold as usual). A NOTICE: audited, run it now. Else a refusal."""
        s = self.reviewed.session
        try:
            mode = await self.modes.off_for(s.resource)
        except StoreError as exc:
            log.error("approvals store unavailable, cannot read the approval mode: %s", exc)
            return review_store_unavailable()
        if mode is None:
            return None
        event = self.reviewed.event(BREAK_GLASS_EVENT, f"approvals are off for {mode.glob}")
        event["break_glass"] = {"resources": mode.glob, "switched_off_by": mode.actor,
                                "switched_off_at": mode.changed_at, "reason": mode.reason}
        try:
            await self.auditor.durable(event)
        except StoreError as exc:
            log.error("audit store unavailable, break-glass statement refused: %s", exc)
            return deny("pgvouch: approvals are off for this resource, but the audit log cannot be "
                        "written, so this statement was not run", code=sqlstate.STORE_UNAVAILABLE)
        self.event = event
        log.warning("%s: %s runs a statement on %s without review (approvals off for %s by %s)",
                    s.session_id, s.user, s.resource, mode.glob, mode.actor)
        return (f"pgvouch: approvals are OFF for {mode.glob} (switched off by {mode.actor}: "
                f"{mode.reason}); this statement runs without review and was audited.")

    def finished(self, ok: bool, error: str | None) -> None:
        """A unit that ran unreviewed failed upstream: record that too (queued, like denials)."""
        if not ok and self.event is not None:
            self.auditor.enqueue({**self.event, "type": "statement.failed", "at": time.time(),
                                  "error": error})
