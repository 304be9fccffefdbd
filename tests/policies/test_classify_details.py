"""Classifier details: tables, prepared statements, volatility, caches, coverage."""

from __future__ import annotations

import pytest
from pglast import ast as pg_ast
from pglast import parser as pg_parser

from policies import classify as classify_module
from policies import pgreading, statements
from policies.classify import (
    Deallocate,
    Prepare,
    StatementInfo,
    cache_stats,
    classify,
    clear_caches,
    combined,
    unknown,
)
from policies.kinds import Kind, strictest
from policies.prepared import after_statement


@pytest.fixture(autouse=True)
def _fresh_caches() -> None:
    clear_caches()


# -- kinds ------------------------------------------------------------------------------


def test_strictness_order() -> None:
    assert [k.value for k in sorted(Kind, key=lambda k: k.strictness)] == [
        "read", "session", "write", "ddl", "destructive", "privilege", "admin", "unknown",
    ]
    assert strictest([]) is Kind.READ
    assert strictest([Kind.WRITE, Kind.SESSION]) is Kind.WRITE
    assert strictest([Kind.UNKNOWN, Kind.ADMIN]) is Kind.UNKNOWN


def test_message_takes_the_strictest_statement() -> None:
    result = classify("SELECT 1; UPDATE t SET a = 1 WHERE id = 1; SHOW work_mem")
    assert result.kinds == (Kind.READ, Kind.WRITE, Kind.READ)
    assert result.kind is Kind.WRITE
    assert result.reason.startswith("statement 2:")
    assert [s.text for s in result.statements] == [
        "SELECT 1",
        "UPDATE t SET a = 1 WHERE id = 1",
        "SHOW work_mem",
    ]


def test_batches_combine_and_opaque_calls_are_unknown() -> None:
    batch = combined([classify("SELECT 1"), classify("UPDATE t SET a = 1 WHERE id = $1")])
    assert batch.kinds == (Kind.READ, Kind.WRITE)
    assert batch.kind is Kind.WRITE and batch.reason.startswith("statement 2:")
    assert combined([]).statements == ()
    call = unknown("a FunctionCall message runs a function by OID")
    assert call.kind is Kind.UNKNOWN and call.tables == ("*",)
    assert combined([batch, call]).kind is Kind.UNKNOWN


def test_empty_text_has_no_statements() -> None:
    for sql in ("", "   ", "-- only a comment", ";", "/* */ ;"):
        result = classify(sql)
        assert result.statements == ()
        assert result.kind is Kind.READ


# -- tables -----------------------------------------------------------------------------

TABLES = [
    ("SELECT * FROM Public.Payments", {"public.payments"}),
    ("SELECT * FROM payments", {"payments"}),
    ('SELECT * FROM "MixedCase"', {"mixedcase"}),
    ("SELECT * FROM db.s.t", {"db.s.t"}),
    ("WITH x AS (SELECT * FROM a) SELECT * FROM x JOIN b ON true", {"a", "b"}),
    ("WITH x AS (SELECT * FROM x) SELECT * FROM x", {"x"}),  # non-recursive: inner x is a table
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n FROM r) SELECT * FROM r", set()),
    ("SELECT * FROM (WITH s AS (SELECT 1) SELECT * FROM s) q, s", {"s"}),  # outer s is real
    ("WITH D AS (SELECT 1) SELECT * FROM d", set()),
    ("WITH a AS (SELECT 1), b AS (SELECT * FROM a) SELECT * FROM b", set()),
    ("WITH b AS (SELECT * FROM a), a AS (SELECT 1) SELECT * FROM b", {"a"}),
    ("INSERT INTO a.b SELECT * FROM c", {"a.b", "c"}),
    ("UPDATE t SET a = u.a FROM u WHERE t.id = u.id", {"t", "u"}),
    ("DELETE FROM t USING u WHERE t.id = u.id", {"t", "u"}),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", {"t", "s"}),
    ("DROP TABLE a, s.b", {"a", "s.b"}),
    ("DROP TABLE a CASCADE", {"a", "*"}),
    ("DROP SCHEMA s CASCADE", {"*"}),
    ("DROP FUNCTION f()", set()),
    ("TRUNCATE a, b", {"a", "b"}),
    ("TRUNCATE a CASCADE", {"a", "*"}),
    ("COPY t TO STDOUT", {"t"}),
    ("COPY (SELECT * FROM hr.pay) TO STDOUT", {"hr.pay"}),
    ("SELECT * INTO n FROM t", {"n", "t"}),
    ("GRANT SELECT ON t TO x", {"t"}),
    ("GRANT SELECT ON ALL TABLES IN SCHEMA s TO x", {"*"}),
    ("ALTER TABLE t SET SCHEMA s", {"t", "s.t"}),
    ("ALTER SCHEMA hr RENAME TO x", {"*"}),
    ("COMMENT ON COLUMN s.t.a IS 'x'", {"s.t"}),
    ("COMMENT ON TABLE s.t IS 'x'", {"s.t"}),
    ("CREATE VIEW v AS SELECT * FROM t", {"v", "t"}),
    ("LOCK a, b", {"a", "b"}),
    ("VACUUM a", {"a"}),
    ("EXPLAIN SELECT * FROM t", {"t"}),
    ("EXPLAIN ANALYZE DELETE FROM t WHERE id = 1", {"t"}),
    ("DO $$ BEGIN END $$", {"*"}),
    ("foo", {"*"}),
    ("SELECT * FROM generate_series(1, 3)", set()),
    ("SELECT nextval('s')", set()),
]


@pytest.mark.parametrize(("sql", "tables"), TABLES)
def test_tables(sql: str, tables: set[str]) -> None:
    assert set(classify(sql).tables) == tables


def test_functions_are_recorded() -> None:
    (statement,) = classify("SELECT lower(a), pg_catalog.now(), myschema.f(1) FROM t").statements
    assert {"lower", "pg_catalog.now", "myschema.f"} <= set(statement.functions)


# -- prepared statements -------------------------------------------------------------------


def test_prepare_of_a_read_is_session_and_carries_the_inner_statement() -> None:
    (statement,) = classify("PREPARE q (int) AS SELECT * FROM t WHERE id = $1").statements
    assert statement.kind is Kind.SESSION
    assert isinstance(statement.effect, Prepare)
    assert statement.effect.name == "q"
    inner = statement.effect.statement
    assert inner.kind is Kind.READ
    assert inner.tables == ("t",)
    assert inner.text == "SELECT * FROM t WHERE id = $1"


def test_prepare_of_a_write_takes_the_inner_kind() -> None:
    (statement,) = classify("PREPARE wipe AS DELETE FROM t").statements
    assert statement.kind is Kind.DESTRUCTIVE
    assert isinstance(statement.effect, Prepare)
    assert statement.effect.statement.kind is Kind.DESTRUCTIVE


def _session(*texts: str) -> dict[str, StatementInfo]:
    prepared: dict[str, StatementInfo] = {}
    for text in texts:
        for statement in classify(text, prepared=prepared).statements:
            prepared = after_statement(prepared, statement, confirmed=True)
    return prepared


def test_execute_inherits_the_prepared_kind() -> None:
    session = _session("PREPARE wipe AS DELETE FROM t", "PREPARE look AS SELECT * FROM u")
    wipe = classify("EXECUTE wipe", prepared=session)
    assert wipe.kind is Kind.DESTRUCTIVE
    assert wipe.statements[0].executes == "wipe"
    assert wipe.tables == ("t",)
    assert classify("EXECUTE look", prepared=session).kind is Kind.READ
    assert classify("EXPLAIN ANALYZE EXECUTE wipe", prepared=session).kind is Kind.DESTRUCTIVE
    assert classify("EXPLAIN EXECUTE wipe", prepared=session).kind is Kind.READ
    assert classify("CREATE TABLE x AS EXECUTE look", prepared=session).kind is Kind.DDL


def test_execute_of_an_unknown_name_is_unknown() -> None:
    assert classify("EXECUTE nothing").kind is Kind.UNKNOWN
    session = _session("PREPARE look AS SELECT 1")
    assert classify("EXECUTE other", prepared=session).kind is Kind.UNKNOWN
    assert classify('EXECUTE "LOOK"', prepared=session).kind is Kind.UNKNOWN  # case matters
    assert classify("EXECUTE LOOK", prepared=session).kind is Kind.READ  # folded to look


def test_prepare_and_execute_in_one_message() -> None:
    result = classify("PREPARE wipe AS DELETE FROM t; EXECUTE wipe")
    assert result.kinds == (Kind.DESTRUCTIVE, Kind.DESTRUCTIVE)
    result = classify("PREPARE q AS SELECT 1; EXECUTE q; DEALLOCATE q; EXECUTE q")
    assert result.kinds == (Kind.SESSION, Kind.READ, Kind.SESSION, Kind.UNKNOWN)


def test_re_preparing_a_name_keeps_the_stricter_statement() -> None:
    session = _session("PREPARE q AS DELETE FROM t WHERE id = 1")
    result = classify("PREPARE q AS SELECT 1; EXECUTE q", prepared=session)
    assert result.kinds[1] is Kind.WRITE
    # The server refuses a second PREPARE of an existing name; if the proxy
    # recorded the unconfirmed one, the entry must not get weaker.
    (again,) = classify("PREPARE q AS SELECT 1").statements
    after = after_statement(session, again, confirmed=False)
    assert after["q"].kind is Kind.WRITE


def test_deallocate_forgets_only_when_confirmed() -> None:
    session = _session("PREPARE q AS SELECT 1", "PREPARE w AS INSERT INTO t VALUES (1)")
    (one,) = classify("DEALLOCATE q").statements
    assert one.effect == Deallocate("q")
    assert set(after_statement(session, one, confirmed=False)) == {"q", "w"}
    assert set(after_statement(session, one, confirmed=True)) == {"w"}
    for text in ("DEALLOCATE ALL", "DEALLOCATE PREPARE ALL", "DISCARD ALL"):
        (everything,) = classify(text).statements
        assert everything.effect == Deallocate(None)
        assert after_statement(session, everything, confirmed=True) == {}
    (plans,) = classify("DISCARD PLANS").statements
    assert plans.effect is None


def test_prepared_names_are_not_shared_through_the_cache() -> None:
    session = _session("PREPARE a AS SELECT 1", "PREPARE b AS DELETE FROM t")
    assert classify("EXECUTE a", prepared=session).kind is Kind.READ
    assert classify("EXECUTE b", prepared=session).kind is Kind.DESTRUCTIVE
    assert classify("EXECUTE a", prepared=session).kind is Kind.READ


# -- volatility -------------------------------------------------------------------------------


def test_volatile_functions_turn_reads_into_writes() -> None:
    volatile = frozenset({"audit_touch"})
    assert classify("SELECT audit_touch(1)").kind is Kind.READ
    assert classify("SELECT audit_touch(1)", volatile_functions=volatile).kind is Kind.WRITE
    assert classify("SELECT app.audit_touch(1)", volatile_functions=volatile).kind is Kind.WRITE
    assert classify("SELECT lower('x')", volatile_functions=volatile).kind is Kind.READ
    qualified = frozenset({"app.audit_touch"})
    assert classify("SELECT app.audit_touch(1)", volatile_functions=qualified).kind is Kind.WRITE
    # The call must run: a plain EXPLAIN or a view definition does not run it.
    assert classify("EXPLAIN SELECT audit_touch(1)", volatile_functions=volatile).kind is Kind.READ
    view = "CREATE VIEW v AS SELECT audit_touch(1)"
    assert classify(view, volatile_functions=volatile).kind is Kind.DDL
    # Stricter kinds are left alone.
    assert classify("DELETE FROM t", volatile_functions=volatile).kind is Kind.DESTRUCTIVE


def test_volatility_reaches_prepared_statements() -> None:
    volatile = frozenset({"audit_touch"})
    result = classify("PREPARE q AS SELECT audit_touch(1)", volatile_functions=volatile)
    assert result.kind is Kind.WRITE
    session = _session("PREPARE q AS SELECT audit_touch(1)")
    assert classify("EXECUTE q", prepared=session).kind is Kind.READ
    assert classify("EXECUTE q", prepared=session, volatile_functions=volatile).kind is Kind.WRITE


def test_standard_conforming_strings_off_makes_everything_unknown() -> None:
    result = classify("SELECT 1", standard_conforming_strings=False)
    assert result.kind is Kind.UNKNOWN
    assert "standard_conforming_strings" in result.reason


# -- caches -----------------------------------------------------------------------------------


def test_exact_text_cache_returns_the_same_result() -> None:
    first = classify("SELECT * FROM t WHERE id = 1")
    assert classify("SELECT * FROM t WHERE id = 1") is first
    assert cache_stats()["text_hits"] == 1


def test_shape_cache_ignores_literals_but_keeps_texts() -> None:
    classify("SELECT * FROM t WHERE id = 1")
    other = classify("SELECT * FROM t WHERE id = 2 AND name = 'x'")  # different shape
    same_shape = classify("SELECT * FROM t WHERE id = 42")
    assert cache_stats()["shape_hits"] == 1
    assert same_shape.statements[0].text == "SELECT * FROM t WHERE id = 42"
    assert other.statements[0].text == "SELECT * FROM t WHERE id = 2 AND name = 'x'"


def test_shape_cache_does_not_mix_schemas() -> None:
    # pglast's fingerprint ignores schema names; the cache key must not.
    assert pg_parser.fingerprint("SELECT * FROM hr.pay") == pg_parser.fingerprint(
        "SELECT * FROM public.pay"
    )
    assert classify("SELECT * FROM public.pay").tables == ("public.pay",)
    assert classify("SELECT * FROM hr.pay").tables == ("hr.pay",)
    assert classify("SELECT * FROM pay").tables == ("pay",)


def test_literal_dependent_results_are_not_shared() -> None:
    # set_config('role') and set_config('work_mem') differ only in a literal.
    assert pg_parser.normalize("SELECT set_config('role', 'x', false)") == pg_parser.normalize(
        "SELECT set_config('work_mem', 'x', false)"
    )
    assert classify("SELECT set_config('work_mem', '1MB', false)").kind is Kind.SESSION
    assert classify("SELECT set_config('role', 'admin', false)").kind is Kind.PRIVILEGE
    assert classify("SELECT set_config('work_mem', '2MB', false)").kind is Kind.SESSION
    assert cache_stats()["shape_entries"] == 0


def test_strings_that_look_like_sql_share_a_shape_safely() -> None:
    assert classify("SELECT 'x'").kind is Kind.READ
    assert classify("SELECT 'DROP TABLE t'").kind is Kind.READ
    assert classify("SELECT 'a'; DROP TABLE t").kind is Kind.DESTRUCTIVE


def test_results_do_not_depend_on_cache_order() -> None:
    texts = [
        "SELECT * FROM t WHERE a = 1",
        "SELECT * FROM t WHERE a = 'x''; DROP TABLE t; --'",
        "SELECT * FROM t WHERE a = E'\\''; DROP TABLE t; --'",
        "SELECT set_config('role', 'x', false)",
        "SELECT set_config('work_mem', 'x', false)",
        "UPDATE t SET a = 1 WHERE id = 1",
        "UPDATE t SET a = 1 WHERE 1 = 1",
        "SELECT * FROM hr.salaries",
        "SELECT * FROM public.salaries",
        "SET client_encoding = 'UTF8'",
        "SET client_encoding = 'SJIS'",
        "SELECT set_config($1, 'x', false)",
        "SELECT set_config(' role', 'x', false)",
    ]
    fresh = {}
    for text in texts:
        clear_caches()
        fresh[text] = classify(text)
    for order in (texts, list(reversed(texts))):
        clear_caches()
        for text in order:
            result = classify(text)
            assert (result.kind, result.tables, result.reason) == (
                fresh[text].kind,
                fresh[text].tables,
                fresh[text].reason,
            ), text


def test_long_texts_are_classified_but_not_cached() -> None:
    sql = "SELECT * FROM t WHERE a IN (" + ", ".join(str(i) for i in range(5000)) + ")"
    assert len(sql) > classify_module.MAX_CACHED_TEXT
    assert classify(sql).kind is Kind.READ
    assert cache_stats()["text_entries"] == 0


def test_caches_are_bounded() -> None:
    for i in range(classify_module.SHAPE_CACHE_SIZE + 10):
        classify(f"SELECT c{i} FROM t")
    stats = cache_stats()
    assert stats["shape_entries"] == classify_module.SHAPE_CACHE_SIZE
    assert stats["text_entries"] == classify_module.TEXT_CACHE_SIZE


# -- robustness ------------------------------------------------------------------------------


def test_deep_and_long_queries_do_not_crash() -> None:
    ors = "SELECT * FROM t WHERE " + " OR ".join(f"a = {i}" for i in range(3000))
    assert classify(ors).kind is Kind.READ
    sums = "SELECT " + " + ".join(["1"] * 5000)
    assert classify(sums).kind is Kind.READ
    parens = "SELECT " + "(" * 3000 + "1" + ")" * 3000
    assert classify(parens).kind is Kind.UNKNOWN  # fails closed where sqlglot gives up


def test_nul_characters_are_unknown() -> None:
    assert classify("SELECT 1\x00; DROP TABLE t").kind is Kind.UNKNOWN


def test_internal_errors_fail_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(node: object) -> object:
        raise RuntimeError("boom")

    monkeypatch.setattr(classify_module, "read_statement", broken)
    result = classify("SELECT 1")
    assert result.kind is Kind.UNKNOWN
    assert "classifier error" in result.reason


# -- coverage of PostgreSQL's statement types ------------------------------------------------------

TOP_LEVEL_ONLY = {"RawStmt", "ExplainStmt", "PrepareStmt", "SetOperationStmt"}


def test_every_postgresql_statement_type_has_a_kind() -> None:
    statement_types = {name for name in dir(pg_ast) if name.endswith("Stmt")}
    known = set(statements.FIXED) | pgreading.HANDLED_STATEMENTS | TOP_LEVEL_ONLY
    assert statement_types - known == set()
