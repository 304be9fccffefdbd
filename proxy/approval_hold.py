"""Holding a statement for approval: the proxy's side of the approvals workflow.

Owns: turning a policy's ``review`` decision into a :class:`StatementHold`
for the session: run it under a covering JIT grant if the user holds one
(``proxy.grant_coverage``); else find an approved request for the identical statement (same
text, parameters, user, resource, account and session context) and claim it
for its one run; else reuse the pending one or submit a new request; then
wait for people to decide (``wait`` mode) or refuse at once with the request
id (``retry`` mode), with NOTICEs the user can act on. Every outcome maps to
a documented SQLSTATE.

Must not: decide workflow rules (``approvals.workflow`` via the service
does) or speak the protocol (the session does).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any

from approvals import workflow
from approvals.approval_mode import ApprovalModes
from approvals.model import Request, Status, SubjectKind, bound_param, statement_subject, subject_fingerprint
from approvals.service import ApprovalService
from approvals.store import StoreError
from approvals.workflow import WorkflowError
from config.settings import HoldSettings, Settings
from policies.classify import Classification
from policies.evaluate import Decision as PolicyDecision
from proxy import sqlstate
from proxy.break_glass import BreakGlassCheck
from proxy.decide import ALLOW, Decision, SessionInfo, Unit, deny
from proxy.grant_coverage import GrantCheck, GrantUsed
from proxy.statement_audit import ReviewedUnit, StatementAuditor

log = logging.getLogger("pgvouch.hold")


def _subject(session: SessionInfo, unit: Unit, classification: Classification,
             database: str) -> dict[str, Any]:
    texts = [s.sql or "<unreadable statement>" for s in unit.statements]
    params: list[dict[str, Any]] = []
    statements = []  # each unit statement with its parameters, for the impact preview
    for statement in unit.statements:
        statements.append({"sql": statement.sql,
                           "param_indexes": list(range(len(params), len(params) + len(statement.params)))})
        for index, value in enumerate(statement.params):
            formats = statement.param_formats
            binary = bool(formats[index] if len(formats) > 1 else (formats[0] if formats else 0))
            types = statement.param_types
            oid = types[index] if index < len(types) else 0
            params.append(bound_param(oid, value, binary=binary))
    context = {
        "search_path": session.server_params.get("search_path"),
        "role": session.server_params.get("session_authorization"),
        "database": database,
    }
    subject = statement_subject(
        sql=";\n".join(texts),
        params=params,
        kinds=[s.kind.value for s in classification.statements],
        tables=[t for s in classification.statements for t in s.tables],
        session=context,
    )
    subject["statements"] = statements  # not part of the fingerprint (sql and params are)
    return subject


class StatementHold:
    """One held unit; the session drives it (start, outcome, heartbeats, finished)."""

    def __init__(self, service: ApprovalService, hold: HoldSettings, session: SessionInfo,
                 subject: dict[str, Any], decision: PolicyDecision,
                 grant_check: GrantCheck | None = None, *,
                 break_glass: BreakGlassCheck | None = None) -> None:
        self.service = service
        self.break_glass = break_glass  # approvals switched off for the resource: run it, audited
        self.unreviewed = False
        self.grant_check = grant_check  # a running JIT grant may cover the unit
        self.session = session
        self.subject = subject
        self.decision = decision
        self.mode = session.options.get("pgvouch.hold") or decision.hold.mode or hold.mode
        self.wait_timeout = decision.hold.wait_timeout or hold.wait_timeout
        self.approved_ttl = decision.hold.approved_ttl or hold.approved_ttl
        self.expires_after = decision.expires_after or hold.expires_after
        self.heartbeat_interval = hold.heartbeat
        self.poll_interval = hold.poll_interval  # re-read at least this often (missed NOTIFY, outage)
        self.request: Request | None = None
        self.claimed = False
        self._cancelled: str | None = None
        self._cancel_event = asyncio.Event()
        self._started = time.monotonic()

    # -- the Hold protocol --------------------------------------------------------
    async def start(self) -> Decision | str:
        approvals_off = await self._approvals_off()
        if approvals_off is not None:
            return approvals_off
        s = self.session
        fingerprint = subject_fingerprint(SubjectKind.STATEMENT, self.subject, s.user, s.resource,
                                          s.account)
        store = self.service.store
        if self.grant_check is not None:
            under_grant = await self.grant_check.run()
            if under_grant is not None:
                return under_grant
        try:
            now = self.service.clock()
            approved = await store.find_approved(fingerprint, now)
            if approved is not None:
                self.request = await self.service.consume(approved.id)
                self.claimed = True
                log.info("%s: re-sent statement runs under approval %s", s.session_id, approved.id)
                return ALLOW
            pending = await store.find_pending(fingerprint, now)
            if pending is not None:
                self.request = pending
            else:
                request = workflow.submit(
                    subject_kind=SubjectKind.STATEMENT, requester=s.user, resource=s.resource,
                    account=s.account, subject=self.subject,
                    policies=[p for p in {step.policy for step in self.decision.steps}],
                    steps=self.decision.steps, directory=self.service.directory, now=now,
                    expires_after=self.expires_after, approved_ttl=self.approved_ttl,
                )
                self.request = await self.service.create(request)
        except WorkflowError as exc:
            return deny(f"pgvouch: this statement needs approval, but {exc.message}",
                        code=sqlstate.APPROVAL_REQUIRED, policy=self.decision.policy)
        except StoreError as exc:
            log.error("approvals store unavailable: %s", exc)
            return deny("pgvouch: the approvals store is unavailable, so this statement, which "
                        "needs approval, was not run", code=sqlstate.STORE_UNAVAILABLE)
        request = self.request
        assert request is not None
        if self.mode == "retry":
            return deny(
                f"pgvouch: approval required: request {request.id} ({self._progress()})",
                code=sqlstate.APPROVAL_REQUIRED,
                detail=self._what(),
                hint=f"Re-send the identical statement once {request.id} is approved.",
                policy=self.decision.policy,
            )
        return (
            f"pgvouch: statement held for approval as request {request.id}. "
            f"{self._what()} {self._progress()}. "
            f"Waiting up to {workflow.format_duration(self.wait_timeout)}; "
            "press Ctrl-C to cancel the request."
        )

    def outcome(self) -> Awaitable[Decision]:
        if self.unreviewed:
            return _allowed()
        return self._wait()

    def heartbeat(self) -> str | None:
        if self.request is None:
            return None
        left = max(0.0, self.wait_timeout - (time.monotonic() - self._started))
        return (f"pgvouch: still waiting for approval of {self.request.id}: {self._progress()}; "
                f"this wait ends in {workflow.format_duration(left)}")

    def cancel(self, reason: str) -> None:
        if self._cancelled is None:
            self._cancelled = reason
            self._cancel_event.set()

    def finished(self, ok: bool, error: str | None) -> None:
        if self.unreviewed and self.break_glass is not None:
            self.break_glass.finished(ok, error)
        if self.request is None or not self.claimed:
            return
        request_id = self.request.id

        async def record() -> None:
            try:
                await self.service.finished(request_id, ok, error)
            except (StoreError, WorkflowError) as exc:
                log.error("could not record the result of %s: %s", request_id, exc)

        asyncio.get_running_loop().create_task(record())

    # -- internals ---------------------------------------------------------------------
    async def _approvals_off(self) -> Decision | str | None:
        """Break-glass: a NOTICE (the unit runs unreviewed: ``outcome`` allows it), a refusal, or None."""
        if self.break_glass is None:
            return None
        result = await self.break_glass.run()
        self.unreviewed = isinstance(result, str)
        return result

    def _what(self) -> str:
        steps = "; ".join(f"{st.name}: {st.required} of {', '.join(st.approvers)}"
                          for st in self.decision.steps)
        return f'Policy "{self.decision.policy}" requires: {steps}.'

    def _progress(self) -> str:
        if self.request is None:
            return ""
        return workflow.progress(self.request, self.service.clock()).summary()

    async def _wait(self) -> Decision:
        assert self.request is not None
        request_id = self.request.id
        deadline = time.monotonic() + self.wait_timeout
        while True:
            if self._cancelled is not None:
                return await self._cancel_request(request_id)
            change = self.service.watch(request_id)  # before the read: a change during it still wakes
            try:
                try:
                    current = await self.service.store.get(request_id)
                except StoreError:
                    current = None
                if current is not None:
                    self.request = current
                    final = await self._settle(current)
                    if final is not None:
                        return final
                left = deadline - time.monotonic()
                if left <= 0:
                    return deny(
                        f"pgvouch: no decision on request {request_id} within "
                        f"{workflow.format_duration(self.wait_timeout)}; it stays pending",
                        code=sqlstate.APPROVAL_TIMEOUT,
                        hint=f"Re-send the identical statement once {request_id} is approved.",
                    )
                cancelled: asyncio.Future[Any] = asyncio.ensure_future(self._cancel_event.wait())
                await asyncio.wait({change, cancelled}, timeout=min(self.poll_interval, left),
                                   return_when=asyncio.FIRST_COMPLETED)
                cancelled.cancel()
            finally:
                self.service.unwatch(request_id, change)

    async def _settle(self, request: Request) -> Decision | None:
        if request.status is Status.PENDING:
            return None
        if request.status is Status.APPROVED:
            try:
                self.request = await self.service.consume(request.id)
            except WorkflowError as exc:  # lapsed, or claimed by an identical statement elsewhere
                return deny(f"pgvouch: approval {request.id} cannot be used: {exc.message}",
                            code=sqlstate.APPROVAL_CLOSED)
            except StoreError:
                return deny("pgvouch: the approvals store is unavailable; statement not run",
                            code=sqlstate.STORE_UNAVAILABLE)
            self.claimed = True
            return ALLOW
        if request.status is Status.DENIED:
            voter = next((v.user for v in reversed(request.votes) if str(v.decision) == "deny"), "")
            note = f": {request.note}" if request.note else ""
            return deny(f"pgvouch: request {request.id} was denied by {voter or 'a reviewer'}{note}",
                        code=sqlstate.APPROVAL_DENIED, policy=self.decision.policy)
        why = f" ({request.note})" if request.status is Status.EXPIRED and request.note else ""
        return deny(f"pgvouch: request {request.id} is {request.status}{why}; the statement was not run",
                    code=sqlstate.APPROVAL_CLOSED)

    async def _cancel_request(self, request_id: str) -> Decision:
        try:
            await self.service.cancel(request_id, self.session.user, self._cancelled)
        except (WorkflowError, StoreError) as exc:
            log.info("cancel of %s: %s", request_id, exc)
        return deny(f"pgvouch: canceling statement due to user request; request {request_id} "
                    "cancelled", code=sqlstate.QUERY_CANCELED)


async def _allowed() -> Decision:
    return ALLOW


class ApprovalReviewer:
    """The proxy's Reviewer: every review decision becomes a hold."""

    def __init__(self, service: ApprovalService, settings: Settings,
                 auditor: StatementAuditor | None = None, on_grant_use: GrantUsed | None = None) -> None:
        self.service = service
        self.settings = settings
        # statements under a grant are audited durably (written alone when no writer loop runs)
        self.auditor = auditor or StatementAuditor(service.store)
        self.on_grant_use = on_grant_use
        self.modes = ApprovalModes(service)

    def review(self, session: SessionInfo, unit: Unit, classification: Classification,
               decision: PolicyDecision) -> Decision:
        database = self.settings.resources[session.resource].database
        subject = _subject(session, unit, classification, database)
        reviewed = ReviewedUnit(session, unit, classification, decision)
        check = GrantCheck(self.service, self.auditor, reviewed, self.on_grant_use)
        approvals_off = BreakGlassCheck(self.modes, self.auditor, reviewed)
        hold = StatementHold(self.service, self.settings.hold, session, subject, decision, check,
                             break_glass=approvals_off)
        return Decision("hold", policy=decision.policy, hold=hold)
