"""The classifier's integer-form cache (policies.classify, "Caches" 3).

A text that differs from an already classified one only in small integer
literals takes that shape's result without PostgreSQL's normaliser. These
tests check that it is used, that it is learnt only where PostgreSQL's lexer
confirms every replaced run is an integer constant, and that a result taken
through it always equals what a fresh, uncached classification says.
"""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pglast import parser as pg_parser

from policies import classify as classify_module
from policies.classify import Classification, cache_stats, classify, clear_caches
from policies.kinds import Kind
from tests.policies.corpus import CASES, EVASIONS

_RUN = re.compile(r"[0-9]+")


@pytest.fixture(autouse=True)
def _fresh_caches() -> None:
    clear_caches()


def _summary(result: Classification) -> tuple[object, ...]:
    return (
        result.kind,
        tuple(
            (s.kind, s.tables, s.reason, s.functions, s.effect, s.executes)
            for s in result.statements
        ),
    )


def _fresh(sql: str) -> tuple[object, ...]:
    clear_caches()
    return _summary(classify(sql))


class _CountingNormalize:
    def __init__(self, real: object) -> None:
        self.real = real
        self.calls = 0

    def __call__(self, sql: str) -> str:
        self.calls += 1
        return self.real(sql)  # type: ignore[operator, no-any-return]


def test_a_fresh_integer_literal_skips_the_normaliser(monkeypatch: pytest.MonkeyPatch) -> None:
    counting = _CountingNormalize(pg_parser.normalize)
    monkeypatch.setattr(pg_parser, "normalize", counting)  # the module policies.classify calls
    first = classify("SELECT abalance FROM pgbench_accounts WHERE aid = 17;", texts=False)
    assert counting.calls == 1
    assert cache_stats()["form_entries"] == 1
    for aid in (42, 99, 10, 55):
        again = classify(f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};", texts=False)
        assert again is first  # the shape's own result, not a re-reading
    assert counting.calls == 1
    # another number of digits is another form, learnt once
    for aid in (123456, 654321, 100000):
        again = classify(f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};", texts=False)
        assert again is first
    assert counting.calls == 2
    assert cache_stats()["form_entries"] == 2


def test_callers_that_need_the_texts_never_use_forms() -> None:
    classify("DELETE FROM t WHERE id = 1", texts=False)
    result = classify("DELETE FROM t WHERE id = 2")
    assert result.statements[0].text == "DELETE FROM t WHERE id = 2"


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM t WHERE note = 'x 5 y'",  # in a string
        "SELECT 1 -- 5\n",  # in a line comment
        "SELECT /* 5 */ 1",  # in a block comment
        "SELECT $$ 5 $$",  # in a dollar quote
        "SELECT $q$ (5) $q$, 1",
        "SELECT E' \\' 5 '",  # in an escape string (its quote is escaped)
        'SELECT "col 5 " FROM t WHERE x = 1',  # in a quoted identifier
        "SELECT set_config('role', 'x', false), 5",  # a literal-dependent result
        "PREPARE p AS SELECT 5",  # session state: never shared by shape
        "SELECT 0x1F, 5",  # hexadecimal: a digit run bordered by a letter
        "SELECT 1e5, 5",  # a float
        "SELECT 1.5 + 2",
        "SELECT a[1] FROM t WHERE b = 3",
        "SELECT 5::int4, 3",  # digits in a type name
        "SELECT c FROM t1 WHERE id = 2",  # digits in an identifier
        "SELECT $1, 2",
        "SELECT 1234567890, 2",  # ten digits
    ],
)
def test_no_form_unless_every_digit_is_in_a_small_integer_constant(sql: str) -> None:
    classify(sql, texts=False)
    assert cache_stats()["form_entries"] == 0


@pytest.mark.parametrize(
    ("sql", "form"),
    [
        ("SELECT x FROM t WHERE a = 5 AND b IN (10,20)", b"SELECT x FROM t WHERE a = 0 AND b IN (00,00)"),
        ("SELECT -1, 2*3/4", b"SELECT -0, 0*0/0"),
        ("SELECT x FROM t LIMIT 10", b"SELECT x FROM t LIMIT 00"),
    ],
)
def test_the_form_is_the_text_with_its_digits_zeroed(sql: str, form: bytes) -> None:
    classify(sql, texts=False)
    assert classify_module.integer_form(sql) == form
    assert list(classify_module._FORMS) == [form]


# Every corpus text PostgreSQL accepts and that has a run of digits somewhere
# (in literals, identifiers, strings or comments), plus texts written to sit
# on the edges of the rule.
_EDGES = [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 1;",
    "UPDATE pgbench_accounts SET abalance = abalance + 5 WHERE aid = 7",
    "DELETE FROM t WHERE 1=1",
    "DELETE FROM t3 WHERE id IN (1,2,3)",
    "SELECT 1;DROP TABLE t",
    "SELECT -1, - 2, 3-4, 5*6/7",
    "SELECT 1 -- 2\n, 3",
    "SELECT 1 /* 2 */ , 3",
    "SELECT 't 1 ', 2",
    "SELECT U&'d\\0061t\\+000061', 5",
    "FETCH 5 FROM c",
    "EXECUTE p(5)",
    "SELECT pg_terminate_backend(123)",
    "SELECT setval('s', 5)",
    "SELECT 0, 00, 007",
    "SELECT\t1\r\n,\n2",
    "CREATE TABLE t9 (c varchar(10))",
    "SELECT x FROM t WHERE a<1 AND b>2 AND c<=3 AND d<>4",
]
_TEXTS = sorted(
    {sql for table in (CASES, EVASIONS) for rows in table.values() for sql, _ in rows
     if _RUN.search(sql)}
    | set(_EDGES)
)


def _with_new_digits(sql: str, rng: random.Random) -> str:
    """``sql`` with every digit replaced by a random one (the same form, when it has one)."""
    return "".join(str(rng.randrange(10)) if ch.isdigit() and ch.isascii() else ch for ch in sql)


@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(sql=st.sampled_from(_TEXTS), seed=st.integers(0, 2**32 - 1))
def test_a_result_through_a_form_equals_a_fresh_reading(sql: str, seed: int) -> None:
    rng = random.Random(seed)
    other = _with_new_digits(sql, rng)
    expected = _fresh(other)
    clear_caches()
    classify(sql, texts=False)  # learns sql's form, when it has one
    assert _summary(classify(other, texts=False)) == expected, (sql, other)


def test_the_edge_texts_learn_forms_where_expected() -> None:
    learnt = []
    for sql in _EDGES:
        clear_caches()
        classify(sql, texts=False)
        if cache_stats()["form_entries"]:
            learnt.append(sql)
    assert "SELECT abalance FROM pgbench_accounts WHERE aid = 1;" in learnt
    assert "SELECT 1 -- 2\n, 3" not in learnt
    assert "SELECT 't 1 ', 2" not in learnt
    assert "CREATE TABLE t9 (c varchar(10))" not in learnt  # t9: digits in an identifier
    assert "SELECT -1, - 2, 3-4, 5*6/7" in learnt


def test_a_full_form_cache_starts_again() -> None:
    names = [f"c_{chr(97 + n % 26)}{chr(97 + n // 26 % 26)}{chr(97 + n // 676)}"
             for n in range(classify_module.FORM_CACHE_SIZE + 5)]
    for name in names:
        classify(f"SELECT {name} FROM t WHERE id = 1", texts=False)
    assert 0 < cache_stats()["form_entries"] <= classify_module.FORM_CACHE_SIZE
    assert classify(f"SELECT {names[3]} FROM t WHERE id = 2", texts=False).kind is Kind.READ
