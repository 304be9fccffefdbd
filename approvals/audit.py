"""The audit log's format: canonical events, the hash chain, verification, export.

Owns: what an audit event is, how an appended event is sealed (its id, the
previous event's hash and its own hash over a canonical form), how a chain is
verified, the record written for a workflow event, and export as JSON lines.

Must not: talk to a database or serialize writers (stores call :func:`seal`
while holding their chain-head lock and feed rows to :class:`ChainVerifier`),
or decide anything about requests.

The chain
    Events are numbered 1, 2, 3, ... without gaps. Event N's ``hash`` is the
    SHA-256 of the canonical JSON of all its fields (id, at, type, actor,
    request_id, data) plus ``prev_hash``, the hash of event N-1 (64 zeros for
    event 1). Stores also keep the chain head (last id and hash) next to the
    events, updated in the same transaction. Verification then finds an
    edited row (its hash no longer matches its content), a deleted or
    reordered row (an id gap or a broken ``prev_hash`` link) and rows deleted
    from the end (the head points past the last row). What no hash chain
    inside one database can catch is someone with write access rewriting the
    whole tail *and* the head consistently: compare ``verify_audit``'s head
    with a copy kept elsewhere (an export, a webhook) for that.

Input events are plain dicts: ``type`` (e.g. ``request.approved``,
``statement.allowed``, ``policy.reloaded``) and ``actor`` are required,
``at`` (unix seconds) and ``request_id`` optional; every other key is the
event's ``data`` (what: statement, parameters, resource, account, kinds,
policy, ...). Data must be JSON (no NaN).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from approvals.model import JSONObject, Request, canonical_json, sha256_hex

if TYPE_CHECKING:
    from approvals.store import Store
    from approvals.workflow import Event

GENESIS_HASH = "0" * 64
_ENVELOPE = ("type", "actor", "at", "request_id")


@dataclass(frozen=True)
class NewAuditEvent:
    """A checked input event, not yet placed in the chain."""

    at: float
    type: str
    actor: str
    request_id: str | None
    data: JSONObject


@dataclass(frozen=True)
class AuditEvent:
    id: int
    at: float
    type: str
    actor: str
    request_id: str | None
    data: JSONObject
    prev_hash: str
    hash: str

    def to_dict(self) -> JSONObject:
        return {
            "id": self.id,
            "at": self.at,
            "type": self.type,
            "actor": self.actor,
            "request_id": self.request_id,
            "data": self.data,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


class ChainHead(NamedTuple):
    last_id: int
    last_hash: str


class Verification(NamedTuple):
    ok: bool
    first_bad_id: int | None
    message: str


def parse_event(event: Mapping[str, Any], now: float) -> NewAuditEvent:
    """Check an input event; ValueError says what is wrong. ``now`` fills a missing ``at``."""
    kind, actor = event.get("type"), event.get("actor")
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"an audit event needs a non-empty string 'type', got {kind!r}")
    if not isinstance(actor, str) or not actor:
        raise ValueError(f"an audit event needs a non-empty string 'actor', got {actor!r}")
    at = event.get("at", now)
    if isinstance(at, bool) or not isinstance(at, int | float):
        raise ValueError(f"an audit event's 'at' must be unix seconds, got {at!r}")
    request_id = event.get("request_id")
    if request_id is not None and not isinstance(request_id, str):
        raise ValueError(f"an audit event's 'request_id' must be a string, got {request_id!r}")
    data = {key: value for key, value in event.items() if key not in _ENVELOPE}
    try:
        data = json.loads(canonical_json(data))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"audit event data must be JSON: {exc}") from exc
    return NewAuditEvent(float(at), kind, actor, request_id, data)


def event_hash(
    *, id: int, at: float, type: str, actor: str, request_id: str | None, data: JSONObject, prev_hash: str
) -> str:
    return sha256_hex(
        canonical_json(
            {
                "id": id,
                "at": at,
                "type": type,
                "actor": actor,
                "request_id": request_id,
                "data": data,
                "prev_hash": prev_hash,
            }
        )
    )


def seal(new: NewAuditEvent, id: int, prev_hash: str) -> AuditEvent:
    """Place ``new`` in the chain as event ``id`` after an event whose hash is ``prev_hash``."""
    digest = event_hash(
        id=id,
        at=new.at,
        type=new.type,
        actor=new.actor,
        request_id=new.request_id,
        data=new.data,
        prev_hash=prev_hash,
    )
    return AuditEvent(id, new.at, new.type, new.actor, new.request_id, new.data, prev_hash, digest)


def data_text(data: JSONObject) -> str:
    """How stores keep an event's data (canonical, so it re-hashes identically)."""
    return canonical_json(data)


def from_stored(
    id: int, at: Any, type: str, actor: str, request_id: str | None, data: str, prev_hash: str, hash: str
) -> AuditEvent:
    """A stored row as an event. Data that no longer parses is kept as text (its hash will not match)."""
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = {"unparseable": data}
    return AuditEvent(id, at, type, actor, request_id, parsed, prev_hash, hash)


class ChainVerifier:
    """Feed events in id order, then :meth:`finish` with the stored head."""

    def __init__(self) -> None:
        self._expected_id = 1
        self._prev_hash = GENESIS_HASH
        self._problem: Verification | None = None

    @property
    def broken(self) -> bool:
        return self._problem is not None

    def feed(self, event: AuditEvent) -> None:
        if self._problem is not None:
            return
        if event.id != self._expected_id:
            if event.id > self._expected_id:
                missing = (
                    f"#{self._expected_id}"
                    if event.id == self._expected_id + 1
                    else f"#{self._expected_id}..#{event.id - 1}"
                )
                self._fail(self._expected_id, f"event {missing} is missing (deleted?)")
            else:
                self._fail(event.id, f"event #{event.id} appears out of order after #{self._expected_id - 1}")
            return
        if event.prev_hash != self._prev_hash:
            self._fail(
                event.id,
                f"event #{event.id} does not follow #{event.id - 1}: its prev_hash does not match "
                f"(#{event.id - 1} was rewritten, or rows were removed or reordered)",
            )
            return
        recomputed = event_hash(
            id=event.id,
            at=event.at,
            type=event.type,
            actor=event.actor,
            request_id=event.request_id,
            data=event.data,
            prev_hash=event.prev_hash,
        )
        if recomputed != event.hash:
            self._fail(event.id, f"event #{event.id} was modified: its content does not match its hash")
            return
        self._prev_hash = event.hash
        self._expected_id += 1

    def finish(self, head: ChainHead | None) -> Verification:
        if self._problem is not None:
            return self._problem
        last_id = self._expected_id - 1
        if head is None:
            head = ChainHead(0, GENESIS_HASH)
        if head.last_id > last_id:
            return Verification(
                False,
                last_id + 1,
                f"events #{last_id + 1}..#{head.last_id} are missing at the end of the log (deleted?)",
            )
        if head.last_id < last_id:
            return Verification(
                False, head.last_id + 1, f"events after #{head.last_id} were added behind the chain head"
            )
        if head.last_hash != self._prev_hash:
            return Verification(False, last_id, f"event #{last_id} does not match the chain head")
        return Verification(True, None, f"{last_id} events verified; head #{last_id} {self._prev_hash}")

    def _fail(self, event_id: int, message: str) -> None:
        self._problem = Verification(False, event_id, message)


def request_record(event: Event, request: Request) -> JSONObject:
    """The audit event for a workflow event: who, what (the whole subject) and when."""
    return {
        "type": str(event.type),
        "actor": event.actor,
        "at": event.at,
        "request_id": request.id,
        "subject_kind": str(request.subject_kind),
        "requester": request.requester,
        "resource": request.resource,
        "account": request.account,
        "policies": list(request.policies),
        "status": str(request.status),
        "subject": request.subject,
        "event": event.data,
    }


def to_json_line(event: AuditEvent) -> str:
    return canonical_json(event.to_dict())


async def export(
    store: Store, since: float | None = None, format: str = "jsonl", *, batch: int = 1000
) -> AsyncIterator[str]:
    """Yield the audit log from ``since`` (unix seconds) on, one JSON line per event."""
    if format != "jsonl":
        raise ValueError(f"unknown export format {format!r} (supported: jsonl)")
    after_id = 0
    while True:
        events = await store.audit(since=since, limit=batch, after_id=after_id)
        if not events:
            return
        for event in events:
            yield to_json_line(event) + "\n"
        after_id = events[-1].id
