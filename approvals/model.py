"""Approval requests as immutable data, and how they are named and serialized.

Owns: the shape of a request (:class:`Request`, its :class:`Step` snapshots
and :class:`Vote` records), the statuses and subject kinds, short typeable
request ids (``R-7KQ2X``), the statement fingerprint that lets a re-sent
identical statement find its approval, canonical JSON, and the conversion of
a request to and from a JSON document (what the stores keep).

Must not: decide anything (which transition is allowed, who may vote: that is
``workflow``), read clocks, or do I/O.

Subjects
    A request is about a *statement* or a *grant* (a time window of access,
    issue 5). ``subject`` is a plain JSON object so it can be stored, shown in
    the API and hashed as is:

    - statement: ``{"sql", "params": [{"type_oid", "format", "value"}...],
      "kinds", "tables", "session": {"search_path", "role", "database"}}``;
      a text parameter's value is its text, a binary one's is hex (a text
      value that is not valid UTF-8 is hex too, marked ``"hex": true``), NULL
      is ``None``. Build it with :func:`statement_subject` and
      :func:`bound_param`. The proxy adds ``"statements": [{"sql",
      "param_indexes"}]`` (each statement of the unit with its parameters,
      for the impact preview); it is not part of the fingerprint.
    - grant: ``{"kinds", "tables", "duration", "reason"}`` (duration in
      seconds); build it with :func:`grant_subject`.

Ids
    ``R-`` and five Crockford base32 characters (no I, L, O, U): 33 million
    values, so a mistyped id almost never lands on another live request.
    They are not secrets (the API authenticates); stores retry on the rare
    collision and grow the length if collisions keep happening.
    :func:`normalize_request_id` accepts what people type (``r-7kq2x``,
    ``7KQ2X``, ``R-7KQ2O`` with the letter O for zero).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

ID_PREFIX = "R-"
ID_LENGTH = 5
CROCKFORD_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CROCKFORD_ALIASES = {"O": "0", "I": "1", "L": "1"}
_SESSION_KEYS = ("search_path", "role", "database")

JSONObject = dict[str, Any]


class Status(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    EXECUTING = "executing"  # statement released to the upstream, outcome not recorded yet
    EXECUTED = "executed"
    FAILED = "failed"
    DENIED = "denied"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    REVOKED = "revoked"  # an approved grant ended early


class SubjectKind(StrEnum):
    STATEMENT = "statement"
    GRANT = "grant"


class Decision(StrEnum):
    APPROVE = "approve"
    DENY = "deny"


@dataclass(frozen=True, kw_only=True)
class Step:
    """One approval step as snapshotted at submit time.

    ``eligible`` is who could approve it then (users named in ``approvers``
    that exist, plus members of the ``group:NAME`` entries), without the
    requester. It never changes afterwards.
    """

    name: str
    approvers: tuple[str, ...]  # user names and "group:NAME"
    required: int
    eligible: frozenset[str]
    policy: str = ""  # the policy and rule this step came from, for people
    rule: str = ""


@dataclass(frozen=True, kw_only=True)
class Vote:
    user: str
    decision: Decision
    note: str | None
    step_index: int  # 0-based step the vote counted for
    at: float


@dataclass(frozen=True, kw_only=True)
class Request:
    id: str
    subject_kind: SubjectKind
    requester: str
    requester_groups: tuple[str, ...]
    resource: str
    account: str
    subject: JSONObject
    policies: tuple[str, ...]
    steps: tuple[Step, ...]
    votes: tuple[Vote, ...]
    status: Status
    created_at: float
    expires_at: float  # a pending request expires then
    approved_ttl: float  # seconds an approval stays usable (a grant: its duration)
    decided_at: float | None  # approved, denied, cancelled or expired
    approved_until: float | None  # decided_at + approved_ttl once approved
    executed_at: float | None  # when the statement was released to the upstream
    note: str | None  # the deny, cancel, expiry or revocation note
    error: str | None  # why execution failed
    fingerprint: str
    version: int  # bumped by the store on every update (compare-and-swap)
    preview: JSONObject | None = None  # statement: the impact preview (``approvals.preview``)


# -- ids ---------------------------------------------------------------------


def new_request_id(length: int = ID_LENGTH) -> str:
    return ID_PREFIX + "".join(secrets.choice(CROCKFORD_ALPHABET) for _ in range(length))


def normalize_request_id(text: str) -> str:
    """The canonical id for what a person typed; ValueError if it cannot be one."""
    body = text.strip().upper()
    if body.startswith(ID_PREFIX):
        body = body[len(ID_PREFIX) :]
    body = "".join(_CROCKFORD_ALIASES.get(char, char) for char in body.replace("-", ""))
    if not body or any(char not in CROCKFORD_ALPHABET for char in body):
        raise ValueError(f"not a request id: {text!r} (expected something like R-7KQ2X)")
    return ID_PREFIX + body


# -- canonical JSON and fingerprints -----------------------------------------


def canonical_json(value: Any) -> str:
    """One text per value: sorted keys, no spaces, UTF-8, no NaN/Infinity."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def statement_fingerprint(
    *,
    sql: str,
    params: Sequence[Mapping[str, Any]],
    requester: str,
    resource: str,
    account: str,
    session: Mapping[str, str | None],
) -> str:
    """SHA-256 of what makes two statements "the same" for an approval."""
    return sha256_hex(
        canonical_json(
            {
                "sql": sql,
                "params": list(params),
                "requester": requester,
                "resource": resource,
                "account": account,
                "session": {key: session.get(key) for key in _SESSION_KEYS},
            }
        )
    )


def subject_fingerprint(
    subject_kind: SubjectKind, subject: Mapping[str, Any], requester: str, resource: str, account: str
) -> str:
    if subject_kind is SubjectKind.STATEMENT:
        return statement_fingerprint(
            sql=subject["sql"],
            params=subject["params"],
            requester=requester,
            resource=resource,
            account=account,
            session=subject["session"],
        )
    return sha256_hex(
        canonical_json(
            {
                "grant": {key: subject[key] for key in ("kinds", "tables", "duration")},
                "requester": requester,
                "resource": resource,
                "account": account,
            }
        )
    )


# -- subjects ----------------------------------------------------------------


def bound_param(type_oid: int, value: bytes | None, *, binary: bool) -> JSONObject:
    """One bound parameter as shown to reviewers and hashed into the fingerprint."""
    param: JSONObject = {"type_oid": type_oid, "format": "binary" if binary else "text"}
    if value is None:
        param["value"] = None
    elif binary:
        param["value"] = value.hex()
    else:
        try:
            param["value"] = value.decode("utf-8")
        except UnicodeDecodeError:
            param["value"] = value.hex()
            param["hex"] = True
    return param


def statement_subject(
    *,
    sql: str,
    params: Sequence[Mapping[str, Any]] = (),
    kinds: Iterable[str] = (),
    tables: Iterable[str] = (),
    session: Mapping[str, str | None],
) -> JSONObject:
    return {
        "sql": sql,
        "params": [dict(param) for param in params],
        "kinds": sorted(set(kinds)),
        "tables": sorted(set(tables)),
        "session": {key: session.get(key) for key in _SESSION_KEYS},
    }


def grant_subject(
    *, kinds: Iterable[str], tables: Iterable[str] = (), duration: float, reason: str
) -> JSONObject:
    return {
        "kinds": sorted(set(kinds)),
        "tables": sorted(set(tables)),
        "duration": duration,
        "reason": reason,
    }


def check_subject(subject_kind: SubjectKind, subject: Mapping[str, Any]) -> None:
    """ValueError unless ``subject`` has the keys its kind needs."""
    needed = {
        SubjectKind.STATEMENT: ("sql", "params", "kinds", "tables", "session"),
        SubjectKind.GRANT: ("kinds", "tables", "duration", "reason"),
    }[subject_kind]
    missing = [key for key in needed if key not in subject]
    if missing:
        raise ValueError(f"{subject_kind} subject lacks {', '.join(missing)}")
    if subject_kind is SubjectKind.GRANT:
        duration = subject["duration"]
        if isinstance(duration, bool) or not isinstance(duration, int | float) or duration <= 0:
            raise ValueError(f"a grant's duration must be a positive number of seconds, not {duration!r}")


# -- documents ---------------------------------------------------------------


def request_to_dict(request: Request) -> JSONObject:
    """A JSON-safe document of the request (the stores keep this)."""
    return {
        "id": request.id,
        "subject_kind": str(request.subject_kind),
        "requester": request.requester,
        "requester_groups": list(request.requester_groups),
        "resource": request.resource,
        "account": request.account,
        "subject": request.subject,
        "policies": list(request.policies),
        "steps": [
            {
                "name": step.name,
                "approvers": list(step.approvers),
                "required": step.required,
                "eligible": sorted(step.eligible),
                "policy": step.policy,
                "rule": step.rule,
            }
            for step in request.steps
        ],
        "votes": [
            {
                "user": vote.user,
                "decision": str(vote.decision),
                "note": vote.note,
                "step_index": vote.step_index,
                "at": vote.at,
            }
            for vote in request.votes
        ],
        "status": str(request.status),
        "created_at": request.created_at,
        "expires_at": request.expires_at,
        "approved_ttl": request.approved_ttl,
        "decided_at": request.decided_at,
        "approved_until": request.approved_until,
        "executed_at": request.executed_at,
        "note": request.note,
        "error": request.error,
        "fingerprint": request.fingerprint,
        "version": request.version,
        "preview": request.preview,
    }


def request_fields(request: Request) -> JSONObject:
    """What every outside view of a request starts with (the API, webhook bodies)."""
    return {
        "id": request.id,
        "kind": str(request.subject_kind),
        "status": str(request.status),
        "requester": request.requester,
        "resource": request.resource,
        "account": request.account,
        "policies": list(request.policies),
        "subject": request.subject,
        "created_at": request.created_at,
        "expires_at": request.expires_at,
        "note": request.note,
    }


def request_from_dict(doc: Mapping[str, Any]) -> Request:
    return Request(
        id=doc["id"],
        subject_kind=SubjectKind(doc["subject_kind"]),
        requester=doc["requester"],
        requester_groups=tuple(doc["requester_groups"]),
        resource=doc["resource"],
        account=doc["account"],
        subject=dict(doc["subject"]),
        policies=tuple(doc["policies"]),
        steps=tuple(
            Step(
                name=step["name"],
                approvers=tuple(step["approvers"]),
                required=int(step["required"]),
                eligible=frozenset(step["eligible"]),
                policy=step.get("policy", ""),
                rule=step.get("rule", ""),
            )
            for step in doc["steps"]
        ),
        votes=tuple(
            Vote(
                user=vote["user"],
                decision=Decision(vote["decision"]),
                note=vote["note"],
                step_index=int(vote["step_index"]),
                at=float(vote["at"]),
            )
            for vote in doc["votes"]
        ),
        status=Status(doc["status"]),
        created_at=float(doc["created_at"]),
        expires_at=float(doc["expires_at"]),
        approved_ttl=float(doc["approved_ttl"]),
        decided_at=_optional_float(doc.get("decided_at")),
        approved_until=_optional_float(doc.get("approved_until")),
        executed_at=_optional_float(doc.get("executed_at")),
        note=doc.get("note"),
        error=doc.get("error"),
        fingerprint=doc["fingerprint"],
        version=int(doc["version"]),
        preview=doc.get("preview"),
    )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
