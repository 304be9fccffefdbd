"""Statements that run under an approved just-in-time grant.

Owns: whether a running grant covers a unit that a policy put up for review
(:func:`covers`), and letting such a unit run without per-statement review,
recorded durably first with the grant's id (:class:`GrantCheck`). The
statement hold (``proxy.approval_hold``) asks this before it looks for a
statement's own approval.

Must not: decide policies (a deny never reaches here: the policy decider
refuses it before any hold exists), apply workflow transitions, or speak the
protocol.

A grant covers a unit when every statement under review (the policies
allowed the others on their own, e.g. the BEGIN and COMMIT around an UPDATE
in one Query) has one of the grant's kinds and, if the grant names tables,
names tables that each certainly match one of the grant's globs (the strict reading of
``policies.globs``: an unqualified name never matches a dotted glob, "may
touch any table" matches nothing). The policy must still allow a grant
here: ``Decision.jit_max_duration`` is None when a deciding review rule has
no ``jit``, and then no grant is even looked up.

A grant stands in only for the review it went through (:func:`approved_for`):
every step the unit's own decision asks for (policy, rule, step, approvers,
quorum) must be one of the grant's steps, and the grant covers the unit
only until its approval plus the unit's JIT cap. A grant is decided for its globs (or "any table") when
it is requested, so a table a stricter rule names (``public.accounts``
under a grant for ``public.*``, or any table when a laxer rule came first)
would otherwise run on the laxer rule's approval.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence

from approvals.model import Request
from approvals.service import ApprovalService
from approvals.store import StoreError
from policies.classify import Classification
from policies.evaluate import Decision as PolicyDecision
from policies.evaluate import statements_under_review
from policies.globs import tables_match
from proxy import sqlstate
from proxy.decide import ALLOW, Decision, deny
from proxy.statement_audit import ReviewedUnit, StatementAuditor, review_store_unavailable

log = logging.getLogger("pgvouch.grants")

GrantUsed = Callable[[Request], None]


def covers(grant: Request, classification: Classification,
           reviewed: Collection[int] | None = None) -> bool:
    """Whether ``grant`` covers every statement under review (``reviewed``: their indexes;
    None: all). Statements the policies allowed on their own (a BEGIN or a SELECT sent in
    one Query with the UPDATE) need no cover."""
    kinds = set(grant.subject.get("kinds") or ())
    globs: Sequence[str] = tuple(grant.subject.get("tables") or ())
    covered = 0
    for index, statement in enumerate(classification.statements):
        if reviewed is not None and index not in reviewed:
            continue
        if str(statement.kind) not in kinds:
            return False
        if globs and not tables_match(statement.tables, globs, certain=True):
            return False
        covered += 1
    return covered > 0


def approved_for(grant: Request, decision: PolicyDecision, now: float) -> bool:
    """Whether ``grant`` went through every step ``decision`` asks for, within its JIT cap.

    The cap counts from the approval: a grant longer than the unit's cap (a
    stricter rule, or a policy tightened since) covers it only that long.
    """
    cap = decision.jit_max_duration
    if cap is None or grant.decided_at is None or now >= grant.decided_at + cap:
        return False
    approved = {(step.policy, step.rule, step.name, tuple(step.approvers), step.required)
                for step in grant.steps}
    return all((step.policy, step.rule, step.name, tuple(step.approvers), step.required) in approved
               for step in decision.steps)


class GrantCheck:
    """For one held unit: run it under a grant that covers it, if there is one."""

    def __init__(self, service: ApprovalService, auditor: StatementAuditor,
                 reviewed: ReviewedUnit, on_use: GrantUsed | None = None) -> None:
        self.service = service
        self.auditor = auditor
        self.reviewed = reviewed
        self.on_use = on_use

    async def run(self) -> Decision | None:
        """ALLOW once audited under a covering grant; a refusal if that cannot be done; None: no grant."""
        unit = self.reviewed
        decision, classification = unit.decision, unit.classification
        if decision.jit_max_duration is None:
            return None  # a deciding rule has no jit: only per-statement review will do
        s, now = unit.session, self.service.clock()
        try:
            grants = await self.service.store.active_grants(s.user, s.resource, s.account, now)
        except StoreError as exc:
            log.error("approvals store unavailable while looking for grants: %s", exc)
            return review_store_unavailable()
        reviewed = statements_under_review(decision, len(classification.statements))
        grant = next((g for g in grants if covers(g, classification, reviewed)
                      and approved_for(g, decision, now)), None)
        if grant is None:
            return None
        event = unit.event("statement.allowed", f"covered by grant {grant.id}")
        event["grant"] = grant.id
        event["request_id"] = grant.id
        try:
            await self.auditor.durable(event)
        except StoreError as exc:
            log.error("audit store unavailable, statement under grant %s refused: %s", grant.id, exc)
            return deny("pgvouch: the audit log cannot be written, so this statement was not run",
                        code=sqlstate.STORE_UNAVAILABLE)
        if self.on_use is not None:
            self.on_use(grant)
        log.info("%s: statement runs under grant %s", s.session_id, grant.id)
        return ALLOW
