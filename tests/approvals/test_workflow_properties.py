"""Random directories, steps and histories: the rules hold after every accepted transition.

A brute-force oracle decides whether steps can be completed by distinct
people; submit must agree with it (refuse exactly the impossible requests),
and every pending request must stay completable whatever was accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

from hypothesis import event, given, settings
from hypothesis import strategies as st

from approvals import workflow
from approvals.model import Decision, Request, Status
from approvals.workflow import TRANSITIONS, Unreachable, WorkflowError
from tests.approvals.helpers import T0, StepDef, statement

USERS = ("u0", "u1", "u2", "u3", "u4", "u5")
GROUPS = ("g0", "g1", "g2")

directories = st.fixed_dictionaries(
    {user: st.lists(st.sampled_from(GROUPS), unique=True, max_size=3).map(tuple) for user in USERS}
)
step_defs = st.builds(
    StepDef,
    name=st.sampled_from(("dba", "security", "owner")),
    approvers=st.lists(
        st.sampled_from(USERS + tuple(f"group:{g}" for g in GROUPS)), min_size=1, max_size=3, unique=True
    ).map(tuple),
    required=st.integers(1, 2),
)
actions = st.lists(
    st.tuples(
        st.sampled_from(
            (
                "approve",
                "approve_eligible",
                "approve_eligible",
                "deny",
                "cancel",
                "expire",
                "consume",
                "finish",
            )
        ),
        st.sampled_from(USERS),
        st.integers(0, 20),  # minutes that pass before the action
    ),
    max_size=20,
)


def feasible(needs: Sequence[tuple[int, frozenset[str]]], used: frozenset[str] = frozenset()) -> bool:
    if not needs:
        return True
    count, people = needs[0]
    available = sorted(people - used)
    return any(feasible(needs[1:], used | set(chosen)) for chosen in combinations(available, count))


def remaining_needs(request: Request) -> list[tuple[int, frozenset[str]]]:
    voters = frozenset(v.user for v in request.votes)
    needs = []
    for index, step in enumerate(request.steps):
        approvals = sum(1 for v in request.votes if v.step_index == index and v.decision is Decision.APPROVE)
        if approvals < step.required:
            needs.append((step.required - approvals, step.eligible - voters))
    return needs


def check_invariants(request: Request) -> None:
    users = [v.user for v in request.votes]
    assert request.requester not in users  # four-eyes
    assert len(users) == len(set(users))  # a person counts once
    indices = [v.step_index for v in request.votes]
    assert indices == sorted(indices)  # steps in order
    for vote in request.votes:
        assert vote.user in request.steps[vote.step_index].eligible
        assert request.requester not in request.steps[vote.step_index].eligible
        earlier = request.steps[: vote.step_index]
        for index, step in enumerate(earlier):
            done = sum(1 for v in request.votes if v.step_index == index and v.decision is Decision.APPROVE)
            assert done == step.required  # a later step only after the earlier one completed
    for index, step in enumerate(request.steps):
        approvals = [v for v in request.votes if v.step_index == index and v.decision is Decision.APPROVE]
        assert len(approvals) <= step.required
    denies = [v for v in request.votes if v.decision is Decision.DENY]
    assert len(denies) <= 1
    if denies:
        assert request.votes[-1] == denies[0]  # deny ends the voting
        assert request.status in (Status.DENIED,)
    if request.status is Status.PENDING:
        assert request.decided_at is None
        assert feasible(remaining_needs(request))  # never stuck
        return
    assert request.decided_at is not None
    if request.status in (Status.APPROVED, Status.EXECUTING, Status.EXECUTED, Status.FAILED):
        assert remaining_needs(request) == []
        assert request.approved_until == request.decided_at + request.approved_ttl


def act(request: Request, kind: str, user: str, now: float) -> workflow.Outcome:
    if kind == "approve_eligible":  # someone who may vote now, so histories get somewhere
        may_vote = workflow.progress(request, now).may_vote
        if may_vote:
            user = may_vote[USERS.index(user) % len(may_vote)]
        kind = "approve"
    if kind in ("approve", "deny"):
        return workflow.vote(request, user, kind, None, now)
    if kind == "cancel":
        return workflow.cancel(request, user, now)
    if kind == "expire":
        return workflow.expire(request, now)
    if kind == "consume":
        return workflow.consume(request, now)
    return workflow.mark_executed(request, now)


@settings(max_examples=1000, deadline=None)
@given(directories, st.lists(step_defs, min_size=1, max_size=3), st.sampled_from(USERS), actions)
def test_random_histories_keep_every_rule(
    directory: dict[str, tuple[str, ...]],
    steps: list[StepDef],
    requester: str,
    history: list[tuple[str, str, int]],
) -> None:
    possible = feasible(
        [(s.required, workflow.eligible_people(s.approvers, directory, requester)) for s in steps]
    )
    try:
        request = workflow.submit(
            subject_kind="statement",
            requester=requester,
            resource="prod-db",
            account="app",
            subject=statement(),
            policies=["p"],
            steps=steps,
            directory=directory,
            now=T0,
            expires_after=3600,
            approved_ttl=1800,
        )
    except Unreachable:
        assert not possible
        event("unreachable")
        return
    assert possible
    check_invariants(request)
    now = T0
    for kind, user, minutes in history:
        now += minutes * 60
        try:
            outcome = act(request, kind, user, now)
        except WorkflowError as refused:
            event(f"refused: {refused.code}")
            continue
        before, request = request, outcome.request
        if request.status is not before.status or kind not in ("approve", "approve_eligible", "deny"):
            assert request.status in TRANSITIONS[before.status].values()
        assert outcome.events
        assert all(event.request_id == request.id for event in outcome.events)
        check_invariants(request)
        if before.status is Status.PENDING and now >= before.expires_at:
            assert request.status is Status.EXPIRED  # nothing but expiry once the time is up
    event(f"ended {request.status}")
