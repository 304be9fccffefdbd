"""The audit chain without a database: sealing, verification, records, parsing."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from approvals import workflow
from approvals.audit import (
    GENESIS_HASH,
    AuditEvent,
    ChainHead,
    ChainVerifier,
    Verification,
    parse_event,
    request_record,
    seal,
)
from tests.approvals.helpers import T0, make_request


def chain(count: int) -> list[AuditEvent]:
    events: list[AuditEvent] = []
    prev = GENESIS_HASH
    for index in range(1, count + 1):
        new = parse_event({"type": "statement.allowed", "actor": "alice", "at": T0 + index, "n": index}, T0)
        event = seal(new, index, prev)
        events.append(event)
        prev = event.hash
    return events


def verify(events: list[AuditEvent], head: ChainHead | None) -> Verification:
    verifier = ChainVerifier()
    for event in events:
        verifier.feed(event)
    return verifier.finish(head)


def head_of(events: list[AuditEvent]) -> ChainHead:
    return ChainHead(events[-1].id, events[-1].hash)


def test_a_sealed_chain_verifies() -> None:
    events = chain(5)
    assert events[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(events))
    result = verify(events, head_of(events))
    assert result.ok
    assert result.first_bad_id is None
    assert "5 events verified" in result.message
    assert verify([], None).ok


def test_an_edited_event_is_found() -> None:
    events = chain(5)
    events[2] = replace(events[2], actor="mallory")
    assert verify(events, head_of(events))[:2] == (False, 3)


def test_an_edited_event_with_a_recomputed_hash_breaks_the_next_link() -> None:
    events = chain(5)
    forged = seal(parse_event({"type": "x", "actor": "mallory", "at": T0}, T0), 3, events[1].hash)
    events[2] = forged
    ok, bad, message = verify(events, head_of(events))
    assert (ok, bad) == (False, 4)
    assert "does not follow #3" in message


def test_a_deleted_event_is_found() -> None:
    events = chain(5)
    del events[1]
    ok, bad, message = verify(events, head_of(events))
    assert (ok, bad) == (False, 2)
    assert "#2 is missing" in message


def test_deleted_events_at_the_end_are_found_through_the_head() -> None:
    events = chain(5)
    head = head_of(events)
    ok, bad, message = verify(events[:3], head)
    assert (ok, bad) == (False, 4)
    assert "#4..#5 are missing at the end" in message


def test_reordered_events_are_found() -> None:
    events = chain(5)
    events[1], events[2] = replace(events[2], id=2), replace(events[1], id=3)
    assert verify(events, head_of(events))[:2] == (False, 2)


def test_a_head_that_does_not_match_is_found() -> None:
    events = chain(3)
    assert verify(events, ChainHead(3, "f" * 64))[:2] == (False, 3)
    assert verify(events, ChainHead(2, events[1].hash))[:2] == (False, 3)


def test_parse_event_validates_and_splits_data() -> None:
    new = parse_event({"type": "policy.reloaded", "actor": "system", "files": ["a.yaml"]}, T0)
    assert (new.type, new.actor, new.at, new.request_id, new.data) == (
        "policy.reloaded",
        "system",
        T0,
        None,
        {"files": ["a.yaml"]},
    )
    for bad in (
        {"actor": "x"},
        {"type": "t"},
        {"type": "t", "actor": "x", "at": "now"},
        {"type": "t", "actor": "x", "blob": b"bytes"},
        {"type": "t", "actor": "x", "v": float("inf")},
        {"type": "t", "actor": "x", "request_id": 7},
    ):
        with pytest.raises(ValueError):
            parse_event(bad, T0)


def test_request_record_carries_who_what_when() -> None:
    request = make_request()
    outcome = workflow.vote(request, "bob", "approve", "fine", T0 + 5)
    record = request_record(outcome.events[0], outcome.request)
    assert record["type"] == "request.voted"
    assert record["actor"] == "bob"
    assert record["at"] == T0 + 5
    assert record["request_id"] == request.id
    assert record["subject"]["sql"].startswith("UPDATE accounts")
    assert record["subject"]["params"] == [{"type_oid": 23, "format": "text", "value": "7"}]
    assert (record["resource"], record["account"], record["policies"]) == ("prod-db", "app", ["prod-writes"])
    assert record["event"]["note"] == "fine"
    parse_event(record, T0)  # a valid audit event as is
