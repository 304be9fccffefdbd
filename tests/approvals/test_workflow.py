"""Every workflow rule, one test (or a few) each, with plain values and a fixed clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from approvals import workflow
from approvals.model import Decision, Request, Status, SubjectKind, statement_fingerprint
from approvals.workflow import TRANSITIONS, Action, Code, EventType, Unreachable, WorkflowError
from tests.approvals.helpers import (
    DBA,
    DIRECTORY,
    HOUR,
    T0,
    StepDef,
    approve_all,
    make_grant,
    make_request,
    statement,
)

SECURITY = StepDef("security review", ("group:security",))


def refused(code: Code) -> pytest.RaisesExc[WorkflowError]:
    return pytest.raises(WorkflowError, check=lambda exc: exc.code == code)


def codes_of(events: list[workflow.Event]) -> list[EventType]:
    return [event.type for event in events]


# -- submit and the snapshot ---------------------------------------------------


def test_submit_snapshots_eligible_people_without_the_requester() -> None:
    request = make_request(
        steps=[StepDef("mixed", ("group:dba", "erin", "ghost", "alice"), required=2)], requester="frank"
    )
    assert request.status is Status.PENDING
    assert request.version == 0
    # group members and named users that exist; not unknown "ghost"; never the requester
    assert request.steps[0].eligible == frozenset({"bob", "carol", "erin", "alice"})
    assert request.requester_groups == ("dba", "developers")
    assert request.expires_at == T0 + 8 * HOUR
    assert request.approved_ttl == HOUR
    assert request.id.startswith("R-")


def test_fingerprint_covers_statement_params_identity_and_session() -> None:
    request = make_request()
    subject = request.subject
    assert request.fingerprint == statement_fingerprint(
        sql=subject["sql"],
        params=subject["params"],
        requester="alice",
        resource="prod-db",
        account="app",
        session=subject["session"],
    )
    other_value = make_request(subject=statement(value="8"))
    other_search_path = make_request(
        subject={**statement(), "session": {**statement()["session"], "search_path": "evil, public"}}
    )
    other_account = make_request(account="admin")
    other_requester = make_request(requester="dave")
    fingerprints = {
        r.fingerprint for r in (request, other_value, other_search_path, other_account, other_requester)
    }
    assert len(fingerprints) == 5
    assert make_request(now=T0 + 999).fingerprint == request.fingerprint


def test_snapshot_is_not_affected_by_later_directory_changes() -> None:
    directory = {name: tuple(groups) for name, groups in DIRECTORY.items()}
    request = make_request(directory=directory)
    directory["dave"] = ("dba",)  # joins the DBA group after submit
    directory["bob"] = ()  # leaves it
    with refused(Code.NOT_ELIGIBLE):
        workflow.vote(request, "dave", "approve", None, T0 + 1)
    assert workflow.vote(request, "bob", "approve", None, T0 + 1).request.status is Status.APPROVED


def test_submit_rejects_malformed_input() -> None:
    with pytest.raises(ValueError, match="at least one approval step"):
        make_request(steps=[])
    with pytest.raises(ValueError, match="required must be at least 1"):
        make_request(steps=[StepDef("zero", ("bob",), required=0)])
    with pytest.raises(ValueError, match="approved_ttl"):
        make_request(approved_ttl=0)
    with pytest.raises(ValueError, match="lacks sql"):
        make_request(subject={"params": [], "kinds": [], "tables": [], "session": {}})
    with pytest.raises(ValueError, match="duration"):
        make_grant(duration=0)
    with pytest.raises(ValueError, match="do not pass approved_ttl"):
        workflow.submit(
            subject_kind="grant",
            requester="alice",
            resource="prod-db",
            account="app",
            subject={"kinds": ["write"], "tables": [], "duration": 60, "reason": "x"},
            policies=["p"],
            steps=[DBA],
            directory=DIRECTORY,
            now=T0,
            expires_after=HOUR,
            approved_ttl=60,
        )


# -- unreachable quorum ---------------------------------------------------------


def test_unreachable_when_a_step_has_too_few_people() -> None:
    with pytest.raises(Unreachable) as caught:
        make_request(steps=[StepDef("two DBAs", ("group:dba",), required=4)])
    assert caught.value.code is Code.UNREACHABLE
    message = str(caught.value)
    assert "'two DBAs'" in message
    assert "needs 4" in message
    assert "bob, carol, frank" in message


def test_unreachable_when_the_requester_is_the_only_approver() -> None:
    with pytest.raises(Unreachable, match=r"only 0 can give them \(nobody\).*requester \(bob\)"):
        make_request(steps=[StepDef("bob only", ("bob",))], requester="bob")


def test_unreachable_counts_only_configured_users() -> None:
    with pytest.raises(Unreachable):
        make_request(steps=[StepDef("ghosts", ("ghost", "group:nobody-here"))])


def test_unreachable_across_steps_because_a_person_counts_once() -> None:
    # each step alone has someone, but both can only be done by erin, who counts once
    steps = [StepDef("first", ("erin",)), StepDef("second", ("erin", "group:nobody"))]
    with pytest.raises(Unreachable, match=r"steps 1/2 'first' and 2/2 'second' need 2 .* only 1 .*erin"):
        make_request(steps=steps)


def test_reachable_when_people_can_be_spread_over_steps() -> None:
    steps = [StepDef("a", ("bob", "carol")), StepDef("b", ("carol",))]
    request = make_request(steps=steps)
    assert request.status is Status.PENDING


# -- four-eyes -------------------------------------------------------------------


def test_requester_cannot_approve_their_own_request_even_as_approver() -> None:
    request = make_request(requester="bob", steps=[StepDef("dba", ("group:dba", "bob"))])
    with refused(Code.CANNOT_SELF_APPROVE):
        workflow.vote(request, "bob", "approve", None, T0 + 1)


def test_requester_cannot_deny_their_own_request_either() -> None:
    request = make_request(requester="bob")
    with refused(Code.CANNOT_SELF_APPROVE):
        workflow.vote(request, "bob", "deny", "oops", T0 + 1)


# -- quorum and distinct people ----------------------------------------------------


def test_quorum_needs_required_distinct_people() -> None:
    request = make_request(steps=[StepDef("two DBAs", ("group:dba",), required=2)])
    first = workflow.vote(request, "bob", "approve", "looks fine", T0 + 10)
    assert first.request.status is Status.PENDING
    assert codes_of(first.events) == [EventType.VOTED]
    assert workflow.progress(first.request, T0 + 10).steps[0].count == "1/2"
    second = workflow.vote(first.request, "carol", "approve", None, T0 + 20)
    assert second.request.status is Status.APPROVED
    assert codes_of(second.events) == [EventType.VOTED, EventType.STEP_COMPLETED, EventType.APPROVED]
    assert second.request.decided_at == T0 + 20
    assert second.events[-1].data["approved_by"] == ["bob", "carol"]


def test_one_person_counts_once() -> None:
    request = make_request(steps=[StepDef("two DBAs", ("group:dba",), required=2)])
    request = workflow.vote(request, "bob", "approve", None, T0 + 1).request
    with refused(Code.ALREADY_REVIEWED):
        workflow.vote(request, "bob", "approve", None, T0 + 2)
    with refused(Code.ALREADY_REVIEWED):
        workflow.vote(request, "bob", "deny", "changed my mind", T0 + 2)


def test_not_eligible_outside_the_current_step() -> None:
    request = make_request()
    with refused(Code.NOT_ELIGIBLE) as caught:
        workflow.vote(request, "dave", "approve", None, T0 + 1)
    assert "bob, carol, frank" in caught.value.message  # says who may vote
    with refused(Code.NOT_ELIGIBLE):
        workflow.vote(request, "dave", "deny", None, T0 + 1)


def test_invalid_decision() -> None:
    with refused(Code.INVALID_DECISION):
        workflow.vote(make_request(), "bob", "maybe", None, T0 + 1)


# -- steps in order ---------------------------------------------------------------


def test_steps_run_in_order() -> None:
    request = make_request(steps=[StepDef("dba", ("bob",)), StepDef("security", ("erin",))])
    with refused(Code.NOT_ELIGIBLE):  # erin's step has not started
        workflow.vote(request, "erin", "approve", None, T0 + 1)
    step_one = workflow.vote(request, "bob", "approve", None, T0 + 2)
    assert step_one.request.status is Status.PENDING
    assert codes_of(step_one.events) == [EventType.VOTED, EventType.STEP_COMPLETED]
    assert step_one.events[1].data["next_step"] == 1
    assert step_one.events[1].data["next_eligible"] == ["erin"]
    assert workflow.current_step(step_one.request) == 1
    with refused(Code.ALREADY_REVIEWED):
        workflow.vote(step_one.request, "bob", "approve", None, T0 + 3)
    step_two = workflow.vote(step_one.request, "erin", "approve", None, T0 + 4)
    assert step_two.request.status is Status.APPROVED
    assert [(v.user, v.step_index) for v in step_two.request.votes] == [("bob", 0), ("erin", 1)]


def test_a_person_eligible_for_two_steps_counts_for_one() -> None:
    steps = [StepDef("dba", ("group:dba",)), StepDef("security", ("group:security",))]
    request = workflow.vote(make_request(steps=steps), "bob", "approve", None, T0 + 1).request
    carol_again = workflow.vote(request, "carol", "approve", None, T0 + 2).request  # step 2 now
    assert carol_again.status is Status.APPROVED
    request = workflow.vote(make_request(steps=steps), "carol", "approve", None, T0 + 1).request
    with refused(Code.ALREADY_REVIEWED):
        workflow.vote(request, "carol", "approve", None, T0 + 2)
    assert workflow.vote(request, "erin", "approve", None, T0 + 2).request.status is Status.APPROVED


def test_approval_that_would_strand_a_later_step_is_refused() -> None:
    steps = [StepDef("dba", ("bob", "carol")), StepDef("security", ("carol",))]
    request = make_request(steps=steps)
    with refused(Code.WOULD_STRAND) as caught:
        workflow.vote(request, "carol", "approve", None, T0 + 1)
    assert "bob" in caught.value.message
    carol_can_still_deny = workflow.vote(request, "carol", "deny", "no", T0 + 1)
    assert carol_can_still_deny.request.status is Status.DENIED
    request = workflow.vote(request, "bob", "approve", None, T0 + 1).request
    assert workflow.vote(request, "carol", "approve", None, T0 + 2).request.status is Status.APPROVED


# -- deny at once ---------------------------------------------------------------------


def test_any_single_deny_rejects_at_once() -> None:
    request = make_request(steps=[StepDef("three", ("group:dba",), required=3)])
    request = approve_all(request, "bob", "carol")
    outcome = workflow.vote(request, "frank", "deny", "wrong table", T0 + 100)
    assert outcome.request.status is Status.DENIED
    assert outcome.request.note == "wrong table"
    assert outcome.request.decided_at == T0 + 100
    assert outcome.request.approved_until is None
    assert codes_of(outcome.events) == [EventType.VOTED, EventType.DENIED]
    assert outcome.events[1].data["note"] == "wrong table"
    assert outcome.events[1].actor == "frank"


def test_deny_by_a_later_steps_reviewer_is_not_eligible() -> None:
    request = make_request(steps=[DBA, StepDef("security", ("erin",))])
    with refused(Code.NOT_ELIGIBLE):
        workflow.vote(request, "erin", "deny", "no", T0 + 1)


# -- expiry ---------------------------------------------------------------------------


def test_expired_requests_cannot_be_approved_or_denied() -> None:
    request = make_request(expires_after=HOUR)
    with refused(Code.EXPIRED):
        workflow.vote(request, "bob", "approve", None, T0 + HOUR)
    with refused(Code.EXPIRED):
        workflow.vote(request, "bob", "deny", None, T0 + HOUR + 1)
    expired = workflow.expire(request, T0 + HOUR)
    assert expired.request.status is Status.EXPIRED
    assert expired.request.decided_at == T0 + HOUR
    assert codes_of(expired.events) == [EventType.EXPIRED]
    assert expired.events[0].actor == workflow.SYSTEM
    with refused(Code.EXPIRED):
        workflow.vote(expired.request, "bob", "approve", None, T0 + HOUR)


def test_expire_happens_once_and_only_when_due() -> None:
    request = make_request(expires_after=HOUR)
    with refused(Code.NOT_DUE):
        workflow.expire(request, T0 + HOUR - 1)
    assert not workflow.is_due_for_expiry(request, T0 + HOUR - 1)
    assert workflow.is_due_for_expiry(request, T0 + HOUR)
    expired = workflow.expire(request, T0 + HOUR).request
    with refused(Code.NOT_PENDING):
        workflow.expire(expired, T0 + HOUR + 1)
    approved = approve_all(make_request(expires_after=HOUR), "bob")
    with refused(Code.NOT_PENDING):
        workflow.expire(approved, T0 + 2 * HOUR)


def test_break_glass_expires_pending_requests_early_with_a_reason() -> None:
    outcome = workflow.expire(make_request(), T0 + 5, reason="approval mode off", actor="owner")
    assert outcome.request.status is Status.EXPIRED
    assert outcome.request.note == "approval mode off"
    assert outcome.events[0].actor == "owner"


# -- not pending ----------------------------------------------------------------------


@pytest.mark.parametrize("decision", ["approve", "deny"])
def test_votes_on_decided_requests_are_not_pending(decision: str) -> None:
    approved = approve_all(make_request(), "bob")
    denied = workflow.vote(make_request(), "bob", "deny", None, T0 + 1).request
    cancelled = workflow.cancel(make_request(), "alice", T0 + 1).request
    for request in (approved, denied, cancelled):
        with refused(Code.NOT_PENDING):
            workflow.vote(request, "carol", decision, None, T0 + 2)


# -- cancel ---------------------------------------------------------------------------


def test_only_the_requester_cancels() -> None:
    request = make_request()
    with refused(Code.NOT_REQUESTER):
        workflow.cancel(request, "bob", T0 + 1)
    outcome = workflow.cancel(request, "alice", T0 + 1, note="wrong id")
    assert outcome.request.status is Status.CANCELLED
    assert outcome.request.note == "wrong id"
    assert codes_of(outcome.events) == [EventType.CANCELLED]
    with refused(Code.NOT_PENDING):
        workflow.cancel(outcome.request, "alice", T0 + 2)
    with refused(Code.NOT_PENDING):
        workflow.cancel(approve_all(make_request(), "bob"), "alice", T0 + 2)
    with refused(Code.EXPIRED):  # once its time is up, a request only expires
        workflow.cancel(request, "alice", request.expires_at)


# -- approved_ttl, consume, execution ----------------------------------------------------


def test_approval_is_usable_until_approved_until() -> None:
    approved = approve_all(make_request(approved_ttl=HOUR), "bob", now=T0 + 600)
    assert approved.approved_until == T0 + 600 + HOUR
    assert workflow.is_usable(approved, T0 + 600 + HOUR - 1)
    assert not workflow.is_usable(approved, T0 + 600 + HOUR)
    with refused(Code.EXPIRED):
        workflow.consume(approved, T0 + 600 + HOUR)
    claimed = workflow.consume(approved, T0 + 700)
    assert claimed.request.status is Status.EXECUTING
    assert claimed.request.executed_at == T0 + 700
    assert codes_of(claimed.events) == [EventType.EXECUTING]


def test_an_approval_runs_exactly_once() -> None:
    approved = approve_all(make_request(), "bob")
    claimed = workflow.consume(approved, T0 + 70).request
    with refused(Code.NOT_APPROVED):
        workflow.consume(claimed, T0 + 71)
    done = workflow.mark_executed(claimed, T0 + 72)
    assert done.request.status is Status.EXECUTED
    assert codes_of(done.events) == [EventType.EXECUTED]
    with refused(Code.NOT_APPROVED):
        workflow.consume(done.request, T0 + 73)
    with refused(Code.NOT_EXECUTING):
        workflow.mark_failed(done.request, "late", T0 + 74)


def test_failed_execution_keeps_the_error() -> None:
    claimed = workflow.consume(approve_all(make_request(), "bob"), T0 + 70).request
    failed = workflow.mark_failed(claimed, "ERROR: deadlock detected", T0 + 71)
    assert failed.request.status is Status.FAILED
    assert failed.request.error == "ERROR: deadlock detected"
    assert failed.events[0].data == {"error": "ERROR: deadlock detected"}


def test_pending_and_approved_requests_cannot_be_marked_executed() -> None:
    with refused(Code.NOT_EXECUTING):
        workflow.mark_executed(make_request(), T0)
    with refused(Code.NOT_EXECUTING):
        workflow.mark_executed(approve_all(make_request(), "bob"), T0 + 70)
    with refused(Code.NOT_APPROVED):
        workflow.consume(make_request(), T0 + 1)


# -- grants -----------------------------------------------------------------------------


def test_a_grants_clock_starts_at_approval() -> None:
    grant = make_grant(duration=HOUR)
    assert grant.subject_kind is SubjectKind.GRANT
    approved = approve_all(grant, "carol", now=T0 + 1800)
    assert approved.approved_until == T0 + 1800 + HOUR
    assert workflow.is_usable(approved, T0 + 1800 + HOUR - 1)
    assert not workflow.is_usable(approved, T0 + 1800 + HOUR)
    with refused(Code.WRONG_SUBJECT):
        workflow.consume(approved, T0 + 1801)


def test_a_grant_is_capped_by_the_rules_jit_duration() -> None:
    assert make_grant(duration=4 * HOUR, max_duration=4 * HOUR).approved_ttl == 4 * HOUR
    with refused(Code.DURATION_TOO_LONG) as caught:
        make_grant(duration=5 * HOUR, max_duration=4 * HOUR)
    assert "at most 4h" in caught.value.message
    with refused(Code.GRANT_NOT_ALLOWED):  # a rule without jit cannot be satisfied by a grant
        make_grant(max_duration=None)


def test_grants_are_revoked_by_their_requester_or_an_approver() -> None:
    approved = approve_all(make_grant(), "carol")
    with refused(Code.NOT_ELIGIBLE):
        workflow.revoke(approved, "dave", T0 + 100)
    by_owner = workflow.revoke(approved, "alice", T0 + 100, note="done")
    by_approver = workflow.revoke(approved, "bob", T0 + 100)
    assert by_owner.request.status is Status.REVOKED
    assert by_owner.request.note == "done"
    assert by_approver.request.status is Status.REVOKED
    assert codes_of(by_approver.events) == [EventType.REVOKED]
    assert not workflow.is_usable(by_owner.request, T0 + 101)
    with refused(Code.NOT_APPROVED):
        workflow.revoke(make_grant(), "alice", T0 + 1)
    with refused(Code.WRONG_SUBJECT):
        workflow.revoke(approve_all(make_request(), "bob"), "alice", T0 + 100)


# -- events and progress -------------------------------------------------------------------


def test_created_event_lists_the_current_steps_approvers_but_never_the_requester() -> None:
    request = make_request(requester="bob", steps=[StepDef("dba", ("group:dba",), required=2)])
    events = workflow.submitted_events(request)
    assert codes_of(events) == [EventType.CREATED]
    assert events[0].data["eligible"] == ["carol", "frank"]
    assert events[0].actor == "bob"
    assert events[0].request_id == request.id


def test_progress_reports_counts_who_may_vote_and_time_left() -> None:
    request = make_request(
        steps=[StepDef("dba", ("group:dba",), required=2), SECURITY], expires_after=8 * HOUR
    )
    request = workflow.vote(request, "bob", "approve", None, T0 + 60).request
    report = workflow.progress(request, T0 + HOUR)
    assert report.current_step == 0
    assert [s.count for s in report.steps] == ["1/2", "0/1"]
    assert report.may_vote == ("carol", "frank")
    assert report.steps[1].may_vote == ()
    assert report.time_left == 7 * HOUR
    assert report.summary() == (
        f"{request.id} pending: step 1/2 'dba' has 1/2 approvals; may approve: carol, frank; 7h left"
    )
    request = workflow.vote(request, "frank", "approve", None, T0 + HOUR).request
    report = workflow.progress(request, T0 + HOUR)
    assert report.current_step == 1
    assert report.may_vote == ("carol", "erin")
    approved = workflow.vote(request, "erin", "approve", None, T0 + HOUR).request
    report = workflow.progress(approved, T0 + HOUR + 60)
    assert report.current_step is None
    assert report.time_left == HOUR - 60
    assert report.summary() == f"{request.id} approved; usable for 59m"
    assert workflow.progress(workflow.expire(make_request(), T0 + 9 * HOUR).request, T0).time_left is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (45, "45s"),
        (60, "1m"),
        (3599, "59m59s"),
        (3600 * 7 + 59 * 60 + 30, "7h59m"),
        (90000, "1d1h"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert workflow.format_duration(seconds) == text


# -- the transition table ---------------------------------------------------------------------


def test_the_table_covers_every_status_and_terminal_statuses_have_no_exits() -> None:
    assert set(TRANSITIONS) == set(Status)
    for status in (Status.EXECUTED, Status.FAILED, Status.DENIED, Status.CANCELLED, Status.EXPIRED):
        assert TRANSITIONS[status] == {}
    reachable = {target for moves in TRANSITIONS.values() for target in moves.values()}
    assert reachable | {Status.PENDING} == set(Status)


def _in_status(status: Status) -> Request:
    pending = make_request()
    approved = approve_all(make_request(), "bob")
    by_status = {
        Status.PENDING: pending,
        Status.APPROVED: approved,
        Status.EXECUTING: workflow.consume(approved, T0 + 61).request,
        Status.DENIED: workflow.vote(pending, "bob", "deny", None, T0 + 1).request,
        Status.CANCELLED: workflow.cancel(pending, "alice", T0 + 1).request,
        Status.EXPIRED: workflow.expire(pending, T0 + 9 * HOUR).request,
    }
    by_status[Status.EXECUTED] = workflow.mark_executed(by_status[Status.EXECUTING], T0 + 62).request
    by_status[Status.FAILED] = workflow.mark_failed(by_status[Status.EXECUTING], "x", T0 + 62).request
    by_status[Status.REVOKED] = workflow.revoke(approve_all(make_grant(), "bob"), "alice", T0 + 62).request
    return by_status[status]


@pytest.mark.parametrize("status", list(Status))
def test_every_refused_transition_has_its_code(status: Status) -> None:
    request = _in_status(status)
    assert request.status is status
    attempts: dict[Action, Callable[[Request], workflow.Outcome]] = {
        Action.APPROVE: lambda r: workflow.vote(r, "carol", Decision.APPROVE, None, T0 + 63),
        Action.DENY: lambda r: workflow.vote(r, "carol", Decision.DENY, None, T0 + 63),
        Action.CANCEL: lambda r: workflow.cancel(r, "alice", T0 + 63),
        Action.EXPIRE: lambda r: workflow.expire(r, T0 + 63, reason="break-glass"),
        Action.CONSUME: lambda r: workflow.consume(r, T0 + 63),
        Action.SUCCEED: lambda r: workflow.mark_executed(r, T0 + 63),
        Action.FAIL: lambda r: workflow.mark_failed(r, "x", T0 + 63),
        Action.REVOKE: lambda r: workflow.revoke(r, "alice", T0 + 63),
        Action.END: lambda r: workflow.end_grant(r, T0 + 63),
    }
    expected_code = {
        Action.APPROVE: Code.EXPIRED if status is Status.EXPIRED else Code.NOT_PENDING,
        Action.DENY: Code.EXPIRED if status is Status.EXPIRED else Code.NOT_PENDING,
        Action.CANCEL: Code.NOT_PENDING,
        Action.EXPIRE: Code.NOT_PENDING,
        Action.CONSUME: Code.NOT_APPROVED,
        Action.SUCCEED: Code.NOT_EXECUTING,
        Action.FAIL: Code.NOT_EXECUTING,
        Action.REVOKE: Code.NOT_APPROVED,
        Action.END: Code.NOT_APPROVED,
    }
    allowed = TRANSITIONS[status]
    for action, attempt in attempts.items():
        subject_ok = {
            Action.CONSUME: request.subject_kind is SubjectKind.STATEMENT,
            Action.REVOKE: request.subject_kind is SubjectKind.GRANT,
            Action.END: request.subject_kind is SubjectKind.GRANT,
        }.get(action, True)
        if action in allowed or (action is Action.APPROVE and Action.APPROVE_FINAL in allowed):
            if subject_ok:
                outcome = attempt(request)
                assert outcome.request.status in allowed.values()
            continue
        if not subject_ok:
            with refused(Code.WRONG_SUBJECT):
                attempt(request)
            continue
        with refused(expected_code[action]):
            attempt(request)


def test_transitions_never_change_the_snapshot() -> None:
    request = make_request(steps=[DBA, SECURITY])
    after = approve_all(request, "bob", "erin")
    assert after.steps == request.steps
    assert replace(after, status=request.status, votes=(), decided_at=None, approved_until=None) == request
