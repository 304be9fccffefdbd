"""Table-driven classifier tests: every kind, every evasion family, false alarms.

Each row is (SQL, expected message kind). A row that fails names the family
it belongs to, so a regression says which trick got through.
"""

from __future__ import annotations

import pytest

from policies.classify import classify
from policies.kinds import Kind
from tests.policies.corpus import CASES, CLIENTS, EVASIONS, FALSE_ALARMS


def _rows(table: dict[str, list[tuple[str, Kind]]]) -> list[object]:
    return [
        pytest.param(sql, kind, id=f"{family}: {sql[:60]}")
        for family, rows in table.items()
        for sql, kind in rows
    ]


@pytest.mark.parametrize(("sql", "expected"), _rows(CASES))
def test_kinds(sql: str, expected: Kind) -> None:
    result = classify(sql)
    assert result.kind is expected, result.reason


@pytest.mark.parametrize(("sql", "expected"), _rows(EVASIONS))
def test_evasions(sql: str, expected: Kind) -> None:
    result = classify(sql)
    assert result.kind is expected, result.reason


@pytest.mark.parametrize(
    ("sql", "expected"), [pytest.param(sql, kind, id=sql[:60]) for sql, kind in CLIENTS]
)
def test_what_real_clients_send(sql: str, expected: Kind) -> None:
    result = classify(sql)
    assert result.kind is expected, result.reason


@pytest.mark.parametrize("sql", FALSE_ALARMS)
def test_no_false_alarms(sql: str) -> None:
    assert classify(sql).kind is Kind.READ


def test_every_kind_is_covered() -> None:
    seen = {kind for rows in CASES.values() for _, kind in rows}
    assert seen == set(Kind)


def test_the_table_is_large() -> None:
    rows = sum(len(r) for r in CASES.values()) + sum(len(r) for r in EVASIONS.values())
    assert rows >= 300
