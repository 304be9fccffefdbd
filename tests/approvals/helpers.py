"""Builders shared by the approvals tests: a user directory, steps, requests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from approvals import workflow
from approvals.model import Request, grant_subject, statement_subject

DIRECTORY: dict[str, tuple[str, ...]] = {
    "alice": ("developers",),
    "bob": ("dba",),
    "carol": ("dba", "security"),
    "dave": (),
    "erin": ("security",),
    "frank": ("dba", "developers"),
}
T0 = 1_700_000_000.0
HOUR = 3600.0


@dataclass(frozen=True)
class StepDef:
    name: str
    approvers: tuple[str, ...]
    required: int = 1
    policy: str = "prod-writes"
    rule: str = "#1"


DBA = StepDef("DBA review", ("group:dba",))


def statement(sql: str = "UPDATE accounts SET balance = 0 WHERE id = $1", value: str = "7") -> dict[str, Any]:
    return statement_subject(
        sql=sql,
        params=[{"type_oid": 23, "format": "text", "value": value}],
        kinds=["write"],
        tables=["public.accounts"],
        session={"search_path": '"$user", public', "role": "app", "database": "app"},
    )


def make_request(
    *,
    steps: Sequence[StepDef] = (DBA,),
    requester: str = "alice",
    directory: dict[str, tuple[str, ...]] | None = None,
    now: float = T0,
    expires_after: float = 8 * HOUR,
    approved_ttl: float = HOUR,
    resource: str = "prod-db",
    account: str = "app",
    subject: dict[str, Any] | None = None,
    request_id: str | None = None,
) -> Request:
    return workflow.submit(
        subject_kind="statement",
        requester=requester,
        resource=resource,
        account=account,
        subject=subject if subject is not None else statement(),
        policies=sorted({s.policy for s in steps}),
        steps=steps,
        directory=DIRECTORY if directory is None else directory,
        now=now,
        expires_after=expires_after,
        approved_ttl=approved_ttl,
        request_id=request_id,
    )


def make_grant(
    *,
    duration: float = HOUR,
    now: float = T0,
    requester: str = "alice",
    max_duration: float | None = 4 * HOUR,
) -> Request:
    return workflow.submit(
        subject_kind="grant",
        requester=requester,
        resource="prod-db",
        account="app",
        subject=grant_subject(kinds=["write"], duration=duration, reason="incident 4711"),
        policies=["prod-writes"],
        steps=[DBA],
        directory=DIRECTORY,
        now=now,
        expires_after=8 * HOUR,
        max_duration=max_duration,
    )


def approve_all(request: Request, *users: str, now: float = T0 + 60) -> Request:
    for user in users:
        request = workflow.vote(request, user, "approve", None, now).request
    return request
