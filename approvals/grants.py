"""Asking for a just-in-time grant: one function behind every entry point.

Owns: what a grant request must satisfy before it enters the workflow (the
resource and account exist and the user may use the account; the kinds are
kind names; the duration parses like the policies' durations; the current
policy set would put every requested kind up for review, never deny it) and
turning it into a pending ``grant`` request with the steps, expiry and JIT
cap of the rules that decided (:meth:`GrantDesk.request`). Also turning a
pending statement request into a grant request for the same kinds and
tables (:meth:`GrantDesk.convert`). The REST API (``POST /grants``), the
``pgvouch grant`` command (through that API) and psql's
``SELECT pgvouch.request_access(...)`` (``proxy.grant_command``) all call it.

Must not: decide workflow rules (``approvals.workflow``: the cap, four-eyes,
quorum) or policy outcomes (``policies.evaluate``), speak HTTP or the
PostgreSQL protocol, or check whether a running statement is covered by a
grant (``proxy.grant_coverage``).

How the policies are asked
    The grant is evaluated as if the user sent one statement per requested
    kind, each naming the requested tables, on that resource and account.
    Without tables the statements "may touch any table" (``*``), so a rule
    for some tables counts too: a grant without tables must be acceptable
    for every table. Any deny refuses the grant (a grant never overrides a
    deny); when nothing needs review there is nothing to grant.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from approvals import workflow
from approvals.model import Request, Status, SubjectKind, grant_subject
from approvals.service import ApprovalService
from approvals.store import NotFound, StoreError
from approvals.workflow import Code, WorkflowError, format_duration
from config.settings import Settings
from config.yamlnodes import parse_duration
from policies.classify import Classification, StatementInfo
from policies.evaluate import Decision as PolicyDecision
from policies.evaluate import Identity, evaluate
from policies.kinds import Kind, strictest
from policies.model import Action, PolicySet
from policies.reading import ANY_TABLE
from proxy.startup import may_use

log = logging.getLogger("pgvouch.grants")

MAX_REASON = 1000  # characters
MAX_TABLES = 50
KIND_NAMES = tuple(str(kind) for kind in Kind)

PolicySource = Callable[[], PolicySet]


class GrantError(Exception):
    """A grant request refused before it reached the workflow; ``code`` is stable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# The codes GrantError uses (the API maps each to an HTTP status).
INVALID_GRANT = "invalid_grant"  # malformed kinds, tables, duration or reason
UNKNOWN_RESOURCE = "unknown_resource"  # no such resource or account
ACCOUNT_NOT_ALLOWED = "account_not_allowed"  # accounts[].allow does not include the user
GRANT_DENIED = "grant_denied"  # a policy denies one of the kinds: a grant never overrides deny
NO_APPROVAL_NEEDED = "no_approval_needed"  # the policies allow everything asked for
GRANTS_UNAVAILABLE = "grants_unavailable"  # this process has no policies to ask


@dataclass(frozen=True)
class GrantAsk:
    """What a user asks for, already parsed (see :func:`parse_ask`)."""

    user: str
    resource: str
    account: str
    kinds: tuple[str, ...]
    tables: tuple[str, ...]
    duration: float  # seconds
    reason: str
    terminate_sessions: bool = False


def parse_kinds(value: str | Sequence[str]) -> tuple[str, ...]:
    """Kind names from ``"write, ddl"`` or ``["write", "ddl"]``; GrantError otherwise."""
    items = value.split(",") if isinstance(value, str) else list(value)
    kinds: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise GrantError(INVALID_GRANT, "kinds must be kind names")
        name = item.strip().lower()
        if name not in KIND_NAMES:
            raise GrantError(INVALID_GRANT, f"{item.strip()!r} is not a kind; kinds: {', '.join(KIND_NAMES)}")
        if name not in kinds:
            kinds.append(name)
    if not kinds:
        raise GrantError(INVALID_GRANT, f"name at least one kind ({', '.join(KIND_NAMES)})")
    return tuple(kinds)


def parse_tables(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """Table globs (lowercased, like the policies') from ``"public.a*, b"`` or a list; may be empty."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    tables: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise GrantError(INVALID_GRANT, "tables must be table names or globs")
        glob = item.strip().lower()
        if not glob:
            if isinstance(value, str):
                continue
            raise GrantError(INVALID_GRANT, "a table glob must not be empty")
        if glob == ANY_TABLE or glob.count("[") != glob.count("]") or not glob.isprintable() \
                or any(c.isspace() for c in glob):
            raise GrantError(INVALID_GRANT, f"{item.strip()!r} is not a table glob such as public.orders*")
        if glob not in tables:
            tables.append(glob)
    if len(tables) > MAX_TABLES:
        raise GrantError(INVALID_GRANT, f"name at most {MAX_TABLES} table globs")
    return tuple(tables)


def parse_grant_duration(text: str) -> float:
    """Seconds from ``1h``, ``30m``, ``1h30m``, ``2s`` (the policies' duration syntax); positive."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise GrantError(INVALID_GRANT, f"duration: {exc}") from None
    if seconds <= 0:
        raise GrantError(INVALID_GRANT, "a grant's duration must be positive, such as 1h or 30m")
    return seconds


def parse_reason(text: str) -> str:
    reason = " ".join(text.split())
    if not reason.isprintable():  # NUL, escape sequences: also, jsonb cannot keep a NUL
        raise GrantError(INVALID_GRANT, "the reason must not contain control characters")
    if not reason:
        raise GrantError(INVALID_GRANT, "say why you need the grant (reason), e.g. an incident number")
    if len(reason) > MAX_REASON:
        raise GrantError(INVALID_GRANT, f"the reason may be at most {MAX_REASON} characters")
    return reason


def grant_classification(kinds: Iterable[str], tables: Sequence[str]) -> Classification:
    """The statements a grant stands for: one per kind, naming ``tables`` (any table if none)."""
    names = tuple(tables) or (ANY_TABLE,)
    statements = tuple(
        StatementInfo(kind=Kind(kind), tables=names, text=f"<grant: {kind}>",
                      reason=f"a JIT grant for {kind} statements")
        for kind in kinds
    )
    return Classification(strictest(s.kind for s in statements), statements, "a JIT grant request")


class GrantDesk:
    """Grant requests checked against the policies in force, submitted through the service."""

    def __init__(self, service: ApprovalService, settings: Settings, policies: PolicySource) -> None:
        self.service = service
        self.settings = settings
        self.policies = policies

    def decide(self, ask: GrantAsk) -> PolicyDecision:
        """The policy decision for ``ask``; GrantError unless it is a review."""
        resource = self.settings.resources.get(ask.resource)
        if resource is None:
            raise GrantError(UNKNOWN_RESOURCE, f'resource "{ask.resource}" does not exist')
        account = resource.accounts.get(ask.account)
        if account is None:
            raise GrantError(UNKNOWN_RESOURCE,
                             f'account "{ask.account}" does not exist on resource "{ask.resource}"')
        if not may_use(self.settings, ask.user, account):
            raise GrantError(ACCOUNT_NOT_ALLOWED, f'user "{ask.user}" may not use account '
                             f'"{ask.account}" on resource "{ask.resource}"')
        identity = Identity(ask.user, self.settings.groups_of(ask.user))
        decision = evaluate(grant_classification(ask.kinds, ask.tables), identity, ask.resource,
                            ask.account, self.policies())
        if decision.action is Action.DENY:
            raise GrantError(GRANT_DENIED, _denied_message(decision))
        if decision.action is Action.ALLOW:
            raise GrantError(NO_APPROVAL_NEEDED, f"no approval needed: the policies already allow "
                             f"{', '.join(ask.kinds)} statements {_where(ask)} for {ask.user}")
        return decision

    async def request(self, ask: GrantAsk) -> Request:
        """Submit ``ask`` as a pending grant request (GrantError, WorkflowError or StoreError if not)."""
        decision = self.decide(ask)
        subject = grant_subject(kinds=ask.kinds, tables=ask.tables, duration=ask.duration, reason=ask.reason)
        subject["terminate_sessions"] = ask.terminate_sessions
        try:
            pending = workflow.submit(
                subject_kind=SubjectKind.GRANT, requester=ask.user, resource=ask.resource,
                account=ask.account, subject=subject,
                policies=list(dict.fromkeys(step.policy for step in decision.steps)),
                steps=decision.steps, directory=self.service.directory, now=self.service.clock(),
                expires_after=decision.expires_after or self.settings.hold.expires_after,
                max_duration=decision.jit_max_duration,
            )
        except WorkflowError as exc:
            if exc.code is Code.GRANT_NOT_ALLOWED:
                raise WorkflowError(exc.code, _no_jit_message(decision)) from None
            raise
        stored = await self.service.create(pending)
        log.info("grant %s requested by %s on %s/%s: %s for %s", stored.id, ask.user, ask.resource,
                 ask.account, ",".join(ask.kinds), format_duration(ask.duration))
        return stored

    async def convert(self, request_id: str, user: str, duration: float, reason: str
                      ) -> tuple[Request, Request]:
        """Turn ``user``'s pending statement request into a grant request for its kinds and tables.

        Returns (the cancelled statement request, the new grant request). The
        statement request is cancelled with the note "converted to grant R-...";
        if that fails (decided meanwhile), the new grant request is withdrawn.
        """
        current = await self.service.store.get(request_id)
        if current is None:
            raise NotFound(request_id)
        if current.subject_kind is not SubjectKind.STATEMENT:
            raise WorkflowError(Code.WRONG_SUBJECT, f"{request_id} is already a grant request")
        if current.requester != user:
            raise WorkflowError(Code.NOT_REQUESTER,
                                f"only {current.requester}, who requested {request_id}, can convert it")
        if current.status is not Status.PENDING:
            raise WorkflowError(Code.NOT_PENDING, f"request {request_id} is {current.status}; "
                                "only a pending statement can become a grant request")
        tables = [str(t) for t in current.subject.get("tables", [])]
        ask = GrantAsk(
            user=user, resource=current.resource, account=current.account,
            kinds=parse_kinds([str(k) for k in current.subject.get("kinds", [])]),
            tables=() if ANY_TABLE in tables else parse_tables(tables),
            duration=duration, reason=reason,
        )
        grant = await self.request(ask)
        try:
            cancelled = await self.service.cancel(request_id, user, f"converted to grant {grant.id}")
        except (WorkflowError, StoreError, NotFound):
            try:
                await self.service.cancel(grant.id, user, f"{request_id} could not be converted")
            except (WorkflowError, StoreError, NotFound) as exc:
                log.error("could not withdraw grant %s after a failed conversion: %s", grant.id, exc)
            raise
        return cancelled, grant


def _where(ask: GrantAsk) -> str:
    tables = f" on {', '.join(ask.tables)}" if ask.tables else ""
    return f"on {ask.resource}/{ask.account}{tables}"


def _denied_message(decision: PolicyDecision) -> str:
    denials = [v for v in decision.verdicts if v.action is Action.DENY]
    if denials:
        by = "; ".join(f'policy "{v.policy}" rule {v.rule} denies {v.subject.kind}'
                       + (f" ({v.message})" if v.message else "") for v in denials)
    else:
        by = f"the default policy denies it ({decision.reason})"
    return f"a grant never overrides a deny: {by}"


def _no_jit_message(decision: PolicyDecision) -> str:
    rules = sorted({f'policy "{v.policy}" rule {v.rule}' for v in decision.verdicts
                    if v.action is Action.REVIEW and v.matched.jit is None})
    return (f"no grant can stand in for review here: {', '.join(rules) or 'the deciding rule'} "
            "has no jit (only rules with jit: {max_duration: ...} accept time-boxed grants)")
