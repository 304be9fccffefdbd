"""Function volatility through the real proxy, psql and PostgreSQL (issue #3's "SELECT f()").

A read policy must not let ``SELECT wipe()`` through when wipe() deletes rows:
the proxy reads the resource's pg_proc before the first session, so a call of
a volatile function outside the system schemas, or of a function it has not
seen, is a write. After DDL passes, every user function counts as volatile
until the catalog was read again. When pg_proc cannot be read, sessions are
refused rather than classified blind.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from config.settings import FunctionSettings
from proxy.function_catalog import FunctionCatalog
from proxy.policy_decider import PolicyDecider, load_live_policies
from tests.conftest import GROUPS, PSQL
from tests.e2e.helpers import wait_for

POLICY = """
policies:
  - name: reads-only
    match: {resources: ["app"]}
    rules:
      - when: {kinds: [read, session, ddl]}
        action: allow
      - when: {kinds: [write, destructive, privilege, admin, unknown]}
        action: deny
        message: only reads here
defaults: {action: deny}
"""

SETUP = """
DROP TABLE IF EXISTS vol_rows;
CREATE TABLE vol_rows (id int);
INSERT INTO vol_rows SELECT generate_series(1, 5);
GRANT ALL ON vol_rows TO PUBLIC;
CREATE OR REPLACE FUNCTION vol_wipe() RETURNS bigint LANGUAGE sql VOLATILE
  AS $$ WITH d AS (DELETE FROM vol_rows RETURNING 1) SELECT count(*) FROM d $$;
CREATE OR REPLACE FUNCTION vol_answer() RETURNS int LANGUAGE sql STABLE AS $$ SELECT 42 $$;
CREATE OR REPLACE FUNCTION vol_later() RETURNS int LANGUAGE sql STABLE AS $$ SELECT 7 $$;
ALTER FUNCTION vol_later() OWNER TO pgv_scram;  -- the account alice's sessions log in as
DROP FUNCTION IF EXISTS vol_new();
CREATE OR REPLACE VIEW vol_view AS SELECT vol_wipe() AS wiped;
CREATE OR REPLACE VIEW vol_view2 AS SELECT * FROM vol_view;
GRANT SELECT ON vol_view, vol_view2 TO PUBLIC;
DROP TABLE IF EXISTS vol_guarded;
CREATE TABLE vol_guarded (id int);
INSERT INTO vol_guarded VALUES (1);
ALTER TABLE vol_guarded ENABLE ROW LEVEL SECURITY;
CREATE POLICY vol_guard ON vol_guarded USING (vol_wipe() >= 0);
GRANT SELECT ON vol_guarded TO PUBLIC;
CREATE OR REPLACE FUNCTION vol_step(bigint, int) RETURNS bigint LANGUAGE sql VOLATILE
  AS $$ SELECT $1 + vol_wipe() $$;
DROP AGGREGATE IF EXISTS vol_agg(int);
CREATE AGGREGATE vol_agg(int) (sfunc = vol_step, stype = bigint, initcond = '0');
DROP SCHEMA IF EXISTS "PG_CATALOG" CASCADE;
CREATE SCHEMA "PG_CATALOG";
CREATE FUNCTION "PG_CATALOG".vol_sneaky() RETURNS bigint LANGUAGE sql VOLATILE
  AS $$ SELECT vol_wipe() $$;
GRANT USAGE ON SCHEMA "PG_CATALOG" TO PUBLIC;
"""
TEARDOWN = """
DROP SCHEMA IF EXISTS "PG_CATALOG" CASCADE;
DROP AGGREGATE IF EXISTS vol_agg(int);
DROP VIEW IF EXISTS vol_view2, vol_view;
DROP TABLE IF EXISTS vol_guarded;
DROP FUNCTION IF EXISTS vol_step(bigint, int), vol_wipe(), vol_answer(), vol_later(), vol_new(),
  public.lower(integer);
DROP TABLE IF EXISTS vol_rows;
"""


@pytest.fixture
def volatility_proxy(start_proxy: Callable[..., Any], pg: Any, tmp_path: Path) -> Iterator[Any]:
    pg.psql(SETUP)
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "app.yaml").write_text(POLICY)
    live = load_live_policies(str(directory), {u: tuple(g) for u, g in GROUPS.items()})
    decider = PolicyDecider(live)
    proxy = start_proxy(decider)
    catalog = FunctionCatalog(FunctionSettings(refresh=3600))  # only a change makes it read again
    decider.functions = catalog
    proxy.server.functions = catalog
    try:
        yield proxy
    finally:
        pg.psql(TEARDOWN)


def _run(proxy: Any, sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PSQL, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose", "-d",
         proxy.dsn("alice"), "-c", sql],
        capture_output=True, text=True, timeout=60,
    )


def _refused_with(proxy: Any, sql: str, text: str) -> str | None:
    """The error of ``sql`` when it contains ``text``, else None (for wait_for)."""
    result = _run(proxy, sql)
    return result.stderr if text in result.stderr else None


def _change_then_call(proxy: Any, pg: Any, ddl: str, call: str, function: str) -> None:
    """``ddl`` passes; ``call`` from another session is refused at once (nothing is vouched
    for), and again once the catalog was read again (``function`` is volatile now)."""
    changed = _run(proxy, ddl)
    assert changed.returncode == 0, changed.stderr
    refused = _run(proxy, call)
    assert refused.returncode != 0
    assert f"{function}, which pgvouch cannot vouch for" in refused.stderr
    assert _count(pg) == "5"
    later = wait_for(lambda: _refused_with(proxy, call, "a volatile function of this resource"))
    assert f"{function}, a volatile function of this resource" in later
    assert _count(pg) == "5"


def _count(pg: Any) -> str:
    return str(pg.psql("SELECT count(*) FROM vol_rows")).strip()


def test_a_volatile_function_call_is_a_write(volatility_proxy: Any, pg: Any) -> None:
    ok = _run(volatility_proxy, "SELECT vol_answer(), count(*) > 0, now() IS NOT NULL FROM vol_rows")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "42|t|t"
    for sql in ("SELECT vol_wipe()", "SELECT public.vol_wipe()", "SELECT * FROM vol_wipe()"):
        refused = _run(volatility_proxy, sql)
        assert refused.returncode != 0, sql
        assert 'denied by policy "reads-only": only reads here' in refused.stderr
        assert "vol_wipe(), a volatile function of this resource" in refused.stderr
    assert _count(pg) == "5"  # nothing was deleted


@pytest.mark.parametrize(("sql", "why"), [
    ("SELECT * FROM vol_view", "reads vol_view, which runs a function"),
    ("SELECT wiped FROM public.vol_view2", "reads public.vol_view2, which runs a function"),
    ("SELECT count(*) FROM vol_guarded", "reads vol_guarded, which runs a function"),
    ("SELECT vol_agg(id) FROM vol_guarded", "vol_agg(), a volatile function"),
    ('SELECT "PG_CATALOG".vol_sneaky()', "pg_catalog.vol_sneaky(), a volatile function"),
])
def test_functions_run_by_views_policies_and_aggregates_count(volatility_proxy: Any, pg: Any,
                                                              sql: str, why: str) -> None:
    refused = _run(volatility_proxy, sql)
    assert refused.returncode != 0, sql
    assert why in refused.stderr
    assert _count(pg) == "5"


def test_a_function_created_behind_the_proxys_back_is_not_a_read(volatility_proxy: Any,
                                                                 pg: Any) -> None:
    assert _run(volatility_proxy, "SELECT vol_answer()").returncode == 0  # the catalog is read
    pg.psql("CREATE FUNCTION vol_new() RETURNS bigint LANGUAGE sql VOLATILE "
            "AS $$ WITH d AS (DELETE FROM vol_rows RETURNING 1) SELECT count(*) FROM d $$")
    refused = _run(volatility_proxy, "SELECT vol_new()")
    assert refused.returncode != 0
    assert "vol_new(), which pgvouch cannot vouch for" in refused.stderr
    assert _count(pg) == "5"


def test_after_ddl_through_the_proxy_user_functions_are_not_reads(volatility_proxy: Any,
                                                                  pg: Any) -> None:
    assert _run(volatility_proxy, "SELECT vol_later()").stdout.strip() == "7"
    # allowed DDL that makes vol_later() delete rows; the catalog read before does not know it
    _change_then_call(volatility_proxy, pg, """
        CREATE OR REPLACE FUNCTION vol_later() RETURNS int LANGUAGE sql VOLATILE
          AS $$ DELETE FROM vol_rows; SELECT 7 $$""", "SELECT vol_later()", "vol_later()")
    # built-ins are reads again
    assert _run(volatility_proxy, "SELECT lower('X'), now() IS NOT NULL").stdout.strip() == "x|t"


def test_a_new_overload_of_a_built_in_is_not_a_read_meanwhile(volatility_proxy: Any,
                                                              pg: Any) -> None:
    assert _run(volatility_proxy, "SELECT lower('X')").stdout.strip() == "x"
    # after the next read of the catalog, "lower" has a volatile overload of ours
    _change_then_call(volatility_proxy, pg, """
        CREATE FUNCTION public.lower(integer) RETURNS text LANGUAGE sql VOLATILE
          AS $$ DELETE FROM vol_rows; SELECT 'x' $$""", "SELECT lower(5)", "lower()")


def test_a_session_that_changed_functions_vouches_for_none_of_its_calls(
        volatility_proxy: Any, pg: Any) -> None:
    script = """
    BEGIN;
    ALTER FUNCTION vol_later() VOLATILE;
    \\! sleep 2
    SELECT 1;
    \\! sleep 2
    SELECT vol_later();
    COMMIT;
    """
    result = subprocess.run(
        [PSQL, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", volatility_proxy.dsn("alice")],
        input=script, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "vol_later(), which pgvouch cannot vouch for" in result.stderr
    assert _count(pg) == "5"


def test_sessions_are_refused_when_pg_proc_cannot_be_read(volatility_proxy: Any, pg: Any) -> None:
    pg.psql("REVOKE SELECT ON pg_catalog.pg_proc FROM PUBLIC")
    try:
        refused = _run(volatility_proxy, "SELECT 1")
    finally:
        pg.psql("GRANT SELECT ON pg_catalog.pg_proc TO PUBLIC")
    assert refused.returncode != 0
    assert "FATAL:  pgvouch could not read the functions of resource 'app'" in refused.stderr
    assert "reading pg_proc failed: permission denied for table pg_proc" in refused.stderr
    ok = _run(volatility_proxy, "SELECT vol_answer()")  # the next session reads it again
    assert ok.returncode == 0 and ok.stdout.strip() == "42"
