"""The approval workflow: the one state machine every request goes through.

Owns: every rule about who may move a request where, for statements and for
grants alike: the transition table below, four-eyes (the requester never
approves), steps in order, quorum of distinct people per step, one vote per
person per request, deny-at-once, expiry, the approval window
(``approved_ttl``; for a grant its duration, capped by the rules' JIT
maximum), the eligible-people snapshot taken at submit, the refusal of
requests that could never complete, and the events each transition emits.

Must not: do I/O, read a clock (``now`` is always passed in), or know about
policies' YAML, the proxy, HTTP or the store. Callers persist what these
functions return with the store's compare-and-swap ``update`` (a lost race
raises ``Conflict`` there: re-read and call again) and act on the events
(audit, webhooks). Everything that changes a request's status lives in this
file; if you need a new transition, add it to :data:`TRANSITIONS` first.

The lifecycle::

    pending --approve (last step complete)--> approved
    pending --deny--> denied        pending --cancel (requester)--> cancelled
    pending --expire--> expired
    approved --consume (statement, before approved_until)--> executing
    executing --mark_executed--> executed      executing --mark_failed--> failed
    approved --revoke (grant; requester or an eligible approver)--> revoked
    approved --end (grant; its approved_until passed)--> expired
    pending --preview (statement; attach an impact preview)--> pending

A grant's window closes on its own at ``approved_until`` (coverage asks
``is_usable`` and the store's ``active_grants``); ``end_grant`` is the
sweeper's record of it, so the audit log and the channels hear that it
ended and the grant leaves ``approved``. An ended grant is ``expired`` with
its ``approved_until`` set; a request that expired undecided has none.

``executing`` is the claim that makes "runs exactly once" hold across
sessions and replicas: the proxy forwards a statement only after the store
accepted ``consume``. If the proxy dies before recording the outcome the
request stays ``executing``; it is never run again.

Beyond the issue's rules, one more keeps requests from getting stuck: a
person counts once per request, so an approval that would leave a later step
without enough distinct people is refused (``would_strand``) while someone
else can still approve the current step. Together with the check at submit
this keeps every pending request completable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

from approvals.model import (
    Decision,
    JSONObject,
    Request,
    Status,
    Step,
    SubjectKind,
    Vote,
    check_subject,
    new_request_id,
    subject_fingerprint,
)

GROUP_PREFIX = "group:"
SYSTEM = "system"  # the actor of transitions nobody asked for (expiry on time)

Directory = Mapping[str, Sequence[str]]  # user -> groups; every configured user is a key


class Code(StrEnum):
    """Stable error codes; the API returns them and tools match on them."""

    CANNOT_SELF_APPROVE = "cannot_self_approve"
    ALREADY_REVIEWED = "already_reviewed"
    NOT_ELIGIBLE = "not_eligible"
    EXPIRED = "expired"
    NOT_PENDING = "not_pending"
    NOT_APPROVED = "not_approved"
    NOT_EXECUTING = "not_executing"
    NOT_REQUESTER = "not_requester"
    NOT_DUE = "not_due"
    WRONG_SUBJECT = "wrong_subject"
    INVALID_DECISION = "invalid_decision"
    UNREACHABLE = "unreachable"
    WOULD_STRAND = "would_strand"
    GRANT_NOT_ALLOWED = "grant_not_allowed"
    DURATION_TOO_LONG = "duration_too_long"


class WorkflowError(Exception):
    """A transition the rules refuse; ``code`` is stable, ``message`` is for people."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Unreachable(WorkflowError):
    """At submit: some step could never collect its approvals."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.UNREACHABLE, message)


class EventType(StrEnum):
    CREATED = "request.created"
    VOTED = "request.voted"
    STEP_COMPLETED = "request.step_completed"
    APPROVED = "request.approved"
    DENIED = "request.denied"
    CANCELLED = "request.cancelled"
    EXPIRED = "request.expired"
    EXECUTING = "request.executing"
    EXECUTED = "request.executed"
    FAILED = "request.failed"
    REVOKED = "request.revoked"
    ENDED = "request.ended"  # a grant's window passed (the sweeper)
    PREVIEWED = "request.previewed"


@dataclass(frozen=True)
class Event:
    type: EventType
    request_id: str
    actor: str
    at: float
    data: JSONObject


class Outcome(NamedTuple):
    request: Request
    events: list[Event]


class Action(StrEnum):
    APPROVE = "approve"  # a vote after which some step still needs approvals
    APPROVE_FINAL = "approve_final"  # the vote that completes the last step
    DENY = "deny"
    CANCEL = "cancel"
    EXPIRE = "expire"
    CONSUME = "consume"
    SUCCEED = "succeed"
    FAIL = "fail"
    REVOKE = "revoke"
    END = "end"  # a grant's window passed
    PREVIEW = "preview"  # attach an impact preview; the status stays


# status -> {action: new status}. Anything not listed is refused.
TRANSITIONS: Mapping[Status, Mapping[Action, Status]] = MappingProxyType(
    {
        Status.PENDING: {
            Action.APPROVE: Status.PENDING,
            Action.APPROVE_FINAL: Status.APPROVED,
            Action.DENY: Status.DENIED,
            Action.CANCEL: Status.CANCELLED,
            Action.EXPIRE: Status.EXPIRED,
            Action.PREVIEW: Status.PENDING,  # statements only
        },
        Status.APPROVED: {
            Action.CONSUME: Status.EXECUTING,  # statements only
            Action.REVOKE: Status.REVOKED,  # grants only
            Action.END: Status.EXPIRED,  # grants only, once approved_until passed
        },
        Status.EXECUTING: {
            Action.SUCCEED: Status.EXECUTED,
            Action.FAIL: Status.FAILED,
        },
        Status.EXECUTED: {},
        Status.FAILED: {},
        Status.DENIED: {},
        Status.CANCELLED: {},
        Status.EXPIRED: {},
        Status.REVOKED: {},
    }
)

# The error for an action attempted in a status that does not allow it.
_WRONG_STATUS: Mapping[Action, Code] = MappingProxyType(
    {
        Action.APPROVE: Code.NOT_PENDING,
        Action.APPROVE_FINAL: Code.NOT_PENDING,
        Action.DENY: Code.NOT_PENDING,
        Action.CANCEL: Code.NOT_PENDING,
        Action.EXPIRE: Code.NOT_PENDING,
        Action.CONSUME: Code.NOT_APPROVED,
        Action.REVOKE: Code.NOT_APPROVED,
        Action.END: Code.NOT_APPROVED,
        Action.SUCCEED: Code.NOT_EXECUTING,
        Action.FAIL: Code.NOT_EXECUTING,
        Action.PREVIEW: Code.NOT_PENDING,
    }
)
_VOTES = frozenset({Action.APPROVE, Action.APPROVE_FINAL, Action.DENY})
_PAST = {Decision.APPROVE: "approved", Decision.DENY: "denied"}


def _require(request: Request, action: Action) -> Status:
    """The status ``action`` leads to from here, or the error that refuses it."""
    target = TRANSITIONS[request.status].get(action)
    if target is not None:
        return target
    if action in _VOTES and request.status is Status.EXPIRED:
        raise WorkflowError(Code.EXPIRED, f"request {request.id} expired; the requester must resubmit")
    raise WorkflowError(
        _WRONG_STATUS[action], f"request {request.id} is {request.status}; cannot {action.replace('_', ' ')}"
    )


def _move(request: Request, action: Action, **changes: Any) -> Request:
    return replace(request, status=_require(request, action), **changes)


class StepSpec(Protocol):
    """What submit needs from a configured step (``policies``' ReviewStep fits)."""

    @property
    def policy(self) -> str: ...
    @property
    def rule(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def approvers(self) -> tuple[str, ...]: ...
    @property
    def required(self) -> int: ...


# -- submit ------------------------------------------------------------------


def submit(
    *,
    subject_kind: SubjectKind | str,
    requester: str,
    resource: str,
    account: str,
    subject: Mapping[str, Any],
    policies: Sequence[str],
    steps: Sequence[StepSpec],
    directory: Directory,
    now: float,
    expires_after: float,
    approved_ttl: float | None = None,
    max_duration: float | None = None,
    request_id: str | None = None,
) -> Request:
    """A new pending request with its steps and eligible people snapshotted.

    ``approved_ttl`` is how long an approved statement may be re-sent. A
    grant's window is its subject's ``duration`` instead, at most
    ``max_duration`` (the rules' JIT cap; None: no rule lets a grant cover
    this, refused). Raises :class:`Unreachable` when the steps could never be
    completed by distinct eligible people other than the requester,
    :class:`WorkflowError` for a grant the rules refuse, ValueError on
    malformed input.
    """
    kind = SubjectKind(subject_kind)
    check_subject(kind, subject)
    if not steps:
        raise ValueError("a request needs at least one approval step")
    if expires_after <= 0:
        raise ValueError(f"expires_after must be positive, not {expires_after!r}")
    window = _approval_window(kind, subject, approved_ttl, max_duration)
    snapshot = tuple(_snapshot(spec, directory, requester) for spec in steps)
    _check_reachable(snapshot, requester)
    return Request(
        id=request_id or new_request_id(),
        subject_kind=kind,
        requester=requester,
        requester_groups=tuple(directory.get(requester, ())),
        resource=resource,
        account=account,
        subject=dict(subject),
        policies=tuple(dict.fromkeys(policies)),
        steps=snapshot,
        votes=(),
        status=Status.PENDING,
        created_at=now,
        expires_at=now + expires_after,
        approved_ttl=window,
        decided_at=None,
        approved_until=None,
        executed_at=None,
        note=None,
        error=None,
        fingerprint=subject_fingerprint(kind, subject, requester, resource, account),
        version=0,
    )


def _approval_window(
    kind: SubjectKind, subject: Mapping[str, Any], approved_ttl: float | None, max_duration: float | None
) -> float:
    if kind is SubjectKind.STATEMENT:
        if approved_ttl is None or approved_ttl <= 0:
            raise ValueError(f"a statement needs a positive approved_ttl, not {approved_ttl!r}")
        return float(approved_ttl)
    if approved_ttl is not None:
        raise ValueError("a grant's window is its duration; do not pass approved_ttl")
    duration = float(subject["duration"])
    if max_duration is None:
        raise WorkflowError(
            Code.GRANT_NOT_ALLOWED, "no rule that applies here lets a time-boxed grant stand in for review"
        )
    if duration > max_duration:
        raise WorkflowError(
            Code.DURATION_TOO_LONG,
            f"a grant here may last at most {format_duration(max_duration)}; "
            f"{format_duration(duration)} was asked for",
        )
    return duration


def submitted_events(request: Request) -> list[Event]:
    """The events of a freshly stored request (use the id the store kept)."""
    first = request.steps[0]
    return [
        Event(
            EventType.CREATED,
            request.id,
            request.requester,
            request.created_at,
            {
                "step": 0,
                "step_name": first.name,
                "required": first.required,
                "eligible": sorted(first.eligible),
                "expires_at": request.expires_at,
            },
        )
    ]


def eligible_people(approvers: Sequence[str], directory: Directory, requester: str) -> frozenset[str]:
    """Configured users named in ``approvers`` or in one of its groups, minus the requester."""
    names = {a for a in approvers if not a.startswith(GROUP_PREFIX)}
    groups = {a[len(GROUP_PREFIX) :] for a in approvers if a.startswith(GROUP_PREFIX)}
    return frozenset(
        user
        for user, member_of in directory.items()
        if user != requester and (user in names or groups.intersection(member_of))
    )


def _snapshot(spec: StepSpec, directory: Directory, requester: str) -> Step:
    if spec.required < 1:
        raise ValueError(f"step {spec.name!r}: required must be at least 1, not {spec.required}")
    return Step(
        name=spec.name,
        approvers=tuple(spec.approvers),
        required=spec.required,
        eligible=eligible_people(spec.approvers, directory, requester),
        policy=spec.policy,
        rule=spec.rule,
    )


def _check_reachable(steps: Sequence[Step], requester: str) -> None:
    for index, step in enumerate(steps):
        if len(step.eligible) < step.required:
            who = ", ".join(sorted(step.eligible)) or "nobody"
            raise Unreachable(
                f"step {_step_label(steps, index)} needs {step.required} approval(s) from distinct "
                f"people but only {len(step.eligible)} can give them ({who}); approvers: "
                f"{', '.join(step.approvers)}; the requester ({requester}) cannot approve their own request"
            )
    shortfall = _shortfall([(step.required, step.eligible) for step in steps])
    if shortfall is not None:
        indices, people = shortfall
        labels = " and ".join(_step_label(steps, i) for i in indices)
        need = sum(steps[i].required for i in indices)
        raise Unreachable(
            f"steps {labels} need {need} approvals from distinct people (a person counts once per "
            f"request) but only {len(people)} can give them ({', '.join(sorted(people)) or 'nobody'})"
        )


def _step_label(steps: Sequence[Step], index: int) -> str:
    return f"{index + 1}/{len(steps)} {steps[index].name!r}"


def _shortfall(needs: Sequence[tuple[int, frozenset[str]]]) -> tuple[list[int], frozenset[str]] | None:
    """None if distinct people can fill every need, else steps that cannot be filled together.

    Each need is (count, who may fill it). A bipartite matching of need slots
    to people; when a slot stays unmatched, the steps and people its failed
    search visited are a set whose combined count exceeds its people (Hall).
    """
    slot_step = [index for index, (count, _) in enumerate(needs) for _ in range(count)]
    holder: dict[str, int] = {}  # person -> slot

    def assign(slot: int, seen: set[str]) -> bool:
        for person in sorted(needs[slot_step[slot]][1]):
            if person in seen:
                continue
            seen.add(person)
            if person not in holder or assign(holder[person], seen):
                holder[person] = slot
                return True
        return False

    for slot in range(len(slot_step)):
        seen: set[str] = set()
        if not assign(slot, seen):
            steps = {slot_step[slot]} | {slot_step[holder[person]] for person in seen}
            return sorted(steps), frozenset(seen)
    return None


# -- votes -------------------------------------------------------------------


def current_step(request: Request) -> int | None:
    """The 0-based step collecting approvals now; None unless pending."""
    if request.status is not Status.PENDING:
        return None
    for index, step in enumerate(request.steps):
        if len(_approvers_of(request, index)) < step.required:
            return index
    return None


def _approvers_of(request: Request, index: int) -> tuple[str, ...]:
    return tuple(v.user for v in request.votes if v.step_index == index and v.decision is Decision.APPROVE)


def _voters(request: Request) -> frozenset[str]:
    return frozenset(v.user for v in request.votes)


def vote(request: Request, user: str, decision: Decision | str, note: str | None, now: float) -> Outcome:
    """``user`` approves or denies the current step; refused with a :class:`WorkflowError`."""
    try:
        choice = Decision(decision)
    except ValueError:
        raise WorkflowError(
            Code.INVALID_DECISION, f"decision must be approve or deny, not {decision!r}"
        ) from None
    _require(request, Action.DENY if choice is Decision.DENY else Action.APPROVE)
    index = _check_reviewer(request, user, now)
    ballot = Vote(user=user, decision=choice, note=note, step_index=index, at=now)
    voted = Event(
        EventType.VOTED,
        request.id,
        user,
        now,
        {"decision": str(choice), "note": note, "step": index, "step_name": request.steps[index].name},
    )
    if choice is Decision.DENY:
        return _deny(request, ballot, voted)
    return _approve(request, ballot, voted)


def _check_reviewer(request: Request, user: str, now: float) -> int:
    """The step ``user`` may review now, or the error that says why not."""
    if now >= request.expires_at:
        raise WorkflowError(Code.EXPIRED, f"request {request.id} expired; the requester must resubmit")
    if user == request.requester:
        raise WorkflowError(
            Code.CANNOT_SELF_APPROVE,
            f"{user} requested {request.id} and cannot review it (four-eyes); cancel it to withdraw it",
        )
    earlier = next((v for v in request.votes if v.user == user), None)
    if earlier is not None:
        raise WorkflowError(
            Code.ALREADY_REVIEWED,
            f"{user} already reviewed {request.id} ({_PAST[earlier.decision]} step "
            f"{earlier.step_index + 1}); a person counts once per request",
        )
    index = current_step(request)
    assert index is not None  # a pending request always has a current step
    if user not in request.steps[index].eligible:
        raise WorkflowError(
            Code.NOT_ELIGIBLE,
            f"{user} is not an approver of step {_step_label(request.steps, index)} of {request.id}; "
            f"may vote: {', '.join(_may_vote(request, index)) or 'nobody'}",
        )
    return index


def _deny(request: Request, ballot: Vote, voted: Event) -> Outcome:
    denied = _move(
        request, Action.DENY, votes=(*request.votes, ballot), decided_at=ballot.at, note=ballot.note
    )
    return Outcome(
        denied,
        [
            voted,
            Event(
                EventType.DENIED,
                request.id,
                ballot.user,
                ballot.at,
                {"note": ballot.note, "step": ballot.step_index},
            ),
        ],
    )


def _approve(request: Request, ballot: Vote, voted: Event) -> Outcome:
    index, now = ballot.step_index, ballot.at
    step = request.steps[index]
    votes = (*request.votes, ballot)
    approved_by = (*_approvers_of(request, index), ballot.user)
    step_done = len(approved_by) >= step.required
    last = index == len(request.steps) - 1
    if step_done and last:
        updated = _move(
            request,
            Action.APPROVE_FINAL,
            votes=votes,
            decided_at=now,
            approved_until=now + request.approved_ttl,
        )
    else:
        _check_not_stranding(request, index, ballot.user)
        updated = _move(request, Action.APPROVE, votes=votes)
    events = [voted]
    if step_done:
        following = None if last else index + 1
        events.append(
            Event(
                EventType.STEP_COMPLETED,
                request.id,
                ballot.user,
                now,
                {
                    "step": index,
                    "step_name": step.name,
                    "approved_by": list(approved_by),
                    "next_step": following,
                    "next_eligible": [] if following is None else list(_may_vote(updated, following)),
                },
            )
        )
    if updated.status is Status.APPROVED:
        events.append(
            Event(
                EventType.APPROVED,
                request.id,
                ballot.user,
                now,
                {
                    "approved_by": [v.user for v in votes if v.decision is Decision.APPROVE],
                    "approved_until": updated.approved_until,
                },
            )
        )
    return Outcome(updated, events)


def _may_vote(request: Request, index: int) -> tuple[str, ...]:
    return tuple(sorted(request.steps[index].eligible - _voters(request)))


def _remaining_needs(
    request: Request, voters: frozenset[str], index: int, extra: int
) -> list[tuple[int, frozenset[str]]]:
    """What steps ``index``.. still need from people not in ``voters``.

    ``extra`` more approvals are counted for step ``index``.
    """
    needs = []
    for i in range(index, len(request.steps)):
        step = request.steps[i]
        counted = len(_approvers_of(request, i)) + (extra if i == index else 0)
        if step.required > counted:
            needs.append((step.required - counted, step.eligible - voters))
    return needs


def _check_not_stranding(request: Request, index: int, user: str) -> None:
    before = _remaining_needs(request, _voters(request), index, 0)
    after = _remaining_needs(request, _voters(request) | {user}, index, 1)
    if _shortfall(before) is None and _shortfall(after) is not None:
        others = [p for p in _may_vote(request, index) if p != user]
        raise WorkflowError(
            Code.WOULD_STRAND,
            f"{user} is needed for a later step of {request.id} and a person counts once per request; "
            f"let someone else approve step {_step_label(request.steps, index)} "
            f"({', '.join(others)})",
        )


# -- the other transitions ---------------------------------------------------


def cancel(request: Request, user: str, now: float, note: str | None = None) -> Outcome:
    """The requester withdraws a pending request (not once its time is up: that is expiry)."""
    _require(request, Action.CANCEL)
    if now >= request.expires_at:
        raise WorkflowError(Code.EXPIRED, f"request {request.id} already expired")
    if user != request.requester:
        raise WorkflowError(
            Code.NOT_REQUESTER, f"only {request.requester}, who requested {request.id}, can cancel it"
        )
    cancelled = _move(request, Action.CANCEL, decided_at=now, note=note)
    return Outcome(cancelled, [Event(EventType.CANCELLED, request.id, user, now, {"note": note})])


def expire(request: Request, now: float, *, reason: str | None = None, actor: str = SYSTEM) -> Outcome:
    """A pending request runs out of time; with ``reason`` (break-glass) it expires now."""
    _require(request, Action.EXPIRE)
    if reason is None and now < request.expires_at:
        raise WorkflowError(
            Code.NOT_DUE, f"request {request.id} expires in {format_duration(request.expires_at - now)}"
        )
    expired = _move(request, Action.EXPIRE, decided_at=now, note=reason)
    return Outcome(expired, [Event(EventType.EXPIRED, request.id, actor, now, {"note": reason})])


def consume(request: Request, now: float) -> Outcome:
    """Claim an approved statement for its one run (re-sent within ``approved_until``)."""
    if request.subject_kind is not SubjectKind.STATEMENT:
        raise WorkflowError(Code.WRONG_SUBJECT, f"{request.id} is a grant; it is not run itself")
    _require(request, Action.CONSUME)
    assert request.approved_until is not None  # set by the approving vote
    if now >= request.approved_until:
        raise WorkflowError(
            Code.EXPIRED,
            f"the approval of {request.id} lapsed {format_duration(now - request.approved_until)} ago; "
            "submit the statement again",
        )
    claimed = _move(request, Action.CONSUME, executed_at=now)
    return Outcome(claimed, [Event(EventType.EXECUTING, request.id, request.requester, now, {})])


def mark_executed(request: Request, now: float) -> Outcome:
    done = _move(request, Action.SUCCEED)
    return Outcome(done, [Event(EventType.EXECUTED, request.id, request.requester, now, {})])


def mark_failed(request: Request, error: str, now: float) -> Outcome:
    failed = _move(request, Action.FAIL, error=error)
    return Outcome(failed, [Event(EventType.FAILED, request.id, request.requester, now, {"error": error})])


def revoke(request: Request, user: str, now: float, note: str | None = None) -> Outcome:
    """End an approved grant early: its requester or anyone who was eligible to approve it."""
    if request.subject_kind is not SubjectKind.GRANT:
        raise WorkflowError(Code.WRONG_SUBJECT, f"{request.id} is a statement; only grants are revoked")
    _require(request, Action.REVOKE)
    if user != request.requester and not any(user in step.eligible for step in request.steps):
        raise WorkflowError(
            Code.NOT_ELIGIBLE, f"only {request.requester} or an approver of {request.id} can revoke it"
        )
    revoked = _move(request, Action.REVOKE, note=note)
    return Outcome(revoked, [Event(EventType.REVOKED, request.id, user, now, {"note": note})])


def end_grant(request: Request, now: float) -> Outcome:
    """An approved grant whose window has passed ends (the sweeper records it; actor system)."""
    if request.subject_kind is not SubjectKind.GRANT:
        raise WorkflowError(Code.WRONG_SUBJECT, f"{request.id} is a statement; only grants end")
    _require(request, Action.END)
    assert request.approved_until is not None  # set by the approving vote
    if now < request.approved_until:
        raise WorkflowError(
            Code.NOT_DUE,
            f"grant {request.id} is open for {format_duration(request.approved_until - now)} more",
        )
    ended = _move(request, Action.END)
    data: JSONObject = {"approved_until": request.approved_until}
    return Outcome(ended, [Event(EventType.ENDED, request.id, SYSTEM, now, data)])


def attach_preview(request: Request, preview: JSONObject, now: float, *,
                   trigger: str = "created", requested_by: str | None = None) -> Outcome:
    """Keep an impact preview (``approvals.preview``) on a pending statement.

    ``trigger`` says why it was made: ``created`` (right after submit) or
    ``approve`` (a stale or missing one refreshed before ``requested_by``'s
    approval is accepted). The proxy makes previews, so the actor is system.
    """
    if request.subject_kind is not SubjectKind.STATEMENT:
        raise WorkflowError(Code.WRONG_SUBJECT, f"{request.id} is a grant; only statements are previewed")
    previous = request.preview
    previewed = _move(request, Action.PREVIEW, preview=preview)
    data: JSONObject = {
        "status": preview.get("status"),
        "estimated_rows": preview.get("estimated_rows"),
        "preview_at": preview.get("at"),
        "previous_at": None if previous is None else previous.get("at"),
        "trigger": trigger,
        "requested_by": requested_by,
    }
    return Outcome(previewed, [Event(EventType.PREVIEWED, request.id, SYSTEM, now, data)])


# -- questions about a request -----------------------------------------------


def is_due_for_expiry(request: Request, now: float) -> bool:
    return request.status is Status.PENDING and now >= request.expires_at


def is_usable(request: Request, now: float) -> bool:
    """An approved statement that may still be re-sent, or a grant that is running."""
    return (
        request.status is Status.APPROVED
        and request.approved_until is not None
        and now < request.approved_until
    )


@dataclass(frozen=True)
class StepProgress:
    index: int
    name: str
    required: int
    approved_by: tuple[str, ...]
    may_vote: tuple[str, ...]  # only for the current step of a pending request
    done: bool
    current: bool

    @property
    def count(self) -> str:
        return f"{len(self.approved_by)}/{self.required}"


@dataclass(frozen=True)
class Progress:
    request_id: str
    status: Status
    steps: tuple[StepProgress, ...]
    current_step: int | None
    time_left: float | None  # pending: until expiry; approved: until the approval lapses
    votes: tuple[Vote, ...]

    @property
    def may_vote(self) -> tuple[str, ...]:
        return () if self.current_step is None else self.steps[self.current_step].may_vote

    def summary(self) -> str:
        """One line for a NOTICE or a chat message."""
        if self.status is Status.PENDING and self.current_step is not None:
            step = self.steps[self.current_step]
            return (
                f"{self.request_id} pending: step {step.index + 1}/{len(self.steps)} {step.name!r} has "
                f"{step.count} approvals; may approve: {', '.join(step.may_vote) or 'nobody'}; "
                f"{format_duration(self.time_left or 0.0)} left"
            )
        if self.status is Status.APPROVED:
            return f"{self.request_id} approved; usable for {format_duration(self.time_left or 0.0)}"
        return f"{self.request_id} {self.status}"


def progress(request: Request, now: float) -> Progress:
    current = current_step(request)
    steps = tuple(
        StepProgress(
            index=index,
            name=step.name,
            required=step.required,
            approved_by=_approvers_of(request, index),
            may_vote=_may_vote(request, index) if index == current else (),
            done=len(_approvers_of(request, index)) >= step.required,
            current=index == current,
        )
        for index, step in enumerate(request.steps)
    )
    if request.status is Status.PENDING:
        time_left: float | None = max(0.0, request.expires_at - now)
    elif request.status is Status.APPROVED and request.approved_until is not None:
        time_left = max(0.0, request.approved_until - now)
    else:
        time_left = None
    return Progress(request.id, request.status, steps, current, time_left, request.votes)


def format_duration(seconds: float) -> str:
    """``7h59m``, ``59m``, ``45s``, ``2d3h``: the two largest units."""
    total = max(0, int(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        amount, total = divmod(total, size)
        if amount or (unit == "s" and not parts):
            parts.append(f"{amount}{unit}")
    return "".join(parts[:2])
