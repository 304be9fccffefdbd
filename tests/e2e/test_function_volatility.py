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
"""
TEARDOWN = """
DROP FUNCTION IF EXISTS vol_wipe(), vol_answer(), vol_later(), vol_new();
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


def test_a_function_created_behind_the_proxys_back_is_not_a_read(volatility_proxy: Any,
                                                                 pg: Any) -> None:
    assert _run(volatility_proxy, "SELECT vol_answer()").returncode == 0  # the catalog is read
    pg.psql("CREATE FUNCTION vol_new() RETURNS bigint LANGUAGE sql VOLATILE "
            "AS $$ WITH d AS (DELETE FROM vol_rows RETURNING 1) SELECT count(*) FROM d $$")
    refused = _run(volatility_proxy, "SELECT vol_new()")
    assert refused.returncode != 0
    assert "vol_new(), which is not among this resource's functions" in refused.stderr
    assert _count(pg) == "5"


def test_after_ddl_through_the_proxy_user_functions_are_not_reads(volatility_proxy: Any,
                                                                  pg: Any) -> None:
    assert _run(volatility_proxy, "SELECT vol_later()").stdout.strip() == "7"
    # allowed DDL that makes vol_later() delete rows; the catalog read before does not know it
    changed = _run(volatility_proxy, """
        CREATE OR REPLACE FUNCTION vol_later() RETURNS int LANGUAGE sql VOLATILE
          AS $$ DELETE FROM vol_rows; SELECT 7 $$""")
    assert changed.returncode == 0, changed.stderr
    refused = _run(volatility_proxy, "SELECT vol_later()")
    assert refused.returncode != 0
    assert "vol_later(), a volatile function of this resource" in refused.stderr
    assert _count(pg) == "5"
    # built-in functions are still reads
    assert _run(volatility_proxy, "SELECT lower('X'), now() IS NOT NULL").stdout.strip() == "x|t"


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
