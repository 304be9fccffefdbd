"""Request ids, parameters, fingerprints and the stored document form."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from approvals import workflow
from approvals.model import (
    CROCKFORD_ALPHABET,
    ID_LENGTH,
    bound_param,
    canonical_json,
    new_request_id,
    normalize_request_id,
    request_from_dict,
    request_to_dict,
)
from tests.approvals.helpers import DBA, T0, StepDef, approve_all, make_grant, make_request


def test_ids_are_short_crockford_base32() -> None:
    ids = {new_request_id() for _ in range(2000)}
    assert len(ids) > 1990  # 33M values: collisions are rare (and retried by the store)
    for request_id in ids:
        assert request_id.startswith("R-")
        body = request_id[2:]
        assert len(body) == ID_LENGTH
        assert set(body) <= set(CROCKFORD_ALPHABET)
        assert not set(body) & set("ILOU")


@pytest.mark.parametrize(
    ("typed", "canonical"),
    [
        ("R-7KQ2X", "R-7KQ2X"),
        ("r-7kq2x", "R-7KQ2X"),
        ("7kq2x", "R-7KQ2X"),
        (" R-7KQ2O ", "R-7KQ20"),
        ("r-i1l0o", "R-11100"),
        ("R-7KQ-2X", "R-7KQ2X"),
    ],
)
def test_normalize_accepts_what_people_type(typed: str, canonical: str) -> None:
    assert normalize_request_id(typed) == canonical


@pytest.mark.parametrize("bad", ["", "R-", "R-7KQ2U", "R-7K Q2", "DROP TABLE"])
def test_normalize_rejects_non_ids(bad: str) -> None:
    with pytest.raises(ValueError, match="not a request id"):
        normalize_request_id(bad)


def test_bound_params_text_binary_null_and_undecodable_text() -> None:
    assert bound_param(23, b"7", binary=False) == {"type_oid": 23, "format": "text", "value": "7"}
    assert bound_param(23, b"\x00\x00\x00\x07", binary=True) == {
        "type_oid": 23,
        "format": "binary",
        "value": "00000007",
    }
    assert bound_param(25, None, binary=False) == {"type_oid": 25, "format": "text", "value": None}
    # two different byte strings must never look the same to a reviewer or the fingerprint
    assert bound_param(25, b"\xff\xfe", binary=False) == {
        "type_oid": 25,
        "format": "text",
        "value": "fffe",
        "hex": True,
    }
    assert bound_param(25, b"fffe", binary=False) != bound_param(25, b"\xff\xfe", binary=False)


def test_canonical_json_is_stable_and_strict() -> None:
    assert canonical_json({"b": 1, "a": [1.5, "é"]}) == '{"a":[1.5,"é"],"b":1}'
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_documents_round_trip() -> None:
    steps = [StepDef("dba", ("group:dba",), required=2), StepDef("sec", ("erin",), policy="p2", rule="r")]
    requests = [
        make_request(steps=steps),
        workflow.vote(make_request(steps=steps), "bob", "approve", "ok", T0 + 1.25).request,
        workflow.mark_failed(
            workflow.consume(approve_all(make_request(steps=[DBA]), "bob"), T0 + 61).request, "boom", T0 + 62
        ).request,
        approve_all(make_grant(), "carol"),
    ]
    for request in requests:
        doc = json.loads(canonical_json(request_to_dict(request)))
        assert request_from_dict(doc) == request


@given(st.text(), st.lists(st.one_of(st.none(), st.binary(max_size=8)), max_size=3))
def test_fingerprint_differs_when_sql_or_params_differ(sql: str, values: list[bytes | None]) -> None:
    params = [bound_param(17, value, binary=True) for value in values]
    base = make_request(subject={**make_request().subject, "sql": sql, "params": params})
    changed_sql = make_request(subject={**base.subject, "sql": sql + " "})
    changed_params = make_request(
        subject={**base.subject, "params": [*params, bound_param(25, b"", binary=False)]}
    )
    assert len({base.fingerprint, changed_sql.fingerprint, changed_params.fingerprint}) == 3
