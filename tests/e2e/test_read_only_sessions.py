"""Sessions whose policies never allow a write are read-only at the server too.

The classifier cannot see every way a read may write (a function behind an
operator, a cast, a domain CHECK, a cursor declared before a function
changed). When no rule could ever allow or approve anything but reads and
session control for a user on a resource, pgvouch logs the session in with
default_transaction_read_only on, and refuses the statements that would
turn it off, so such a write fails in PostgreSQL instead of running.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.policy_decider import PolicyDecider, load_live_policies
from tests.conftest import GROUPS, PSQL

READS_ONLY = """
policies:
  - name: reads-only
    match: {resources: ["app"]}
    rules:
      - when: {kinds: [read, session]}
        action: allow
defaults: {action: deny}
"""
WRITES_FOR_DBAS = READS_ONLY.replace("defaults:", """  - name: dba-writes
    match: {resources: ["app"], users: ["group:dba"]}
    rules:
      - when: {kinds: [write]}
        action: allow
defaults:""")

SETUP = """
DROP TABLE IF EXISTS ro_rows;
CREATE TABLE ro_rows (id int);
INSERT INTO ro_rows SELECT generate_series(1, 5);
GRANT ALL ON ro_rows TO PUBLIC;
CREATE OR REPLACE FUNCTION ro_wipe(int, int) RETURNS boolean LANGUAGE plpgsql VOLATILE
  AS $$ BEGIN DELETE FROM ro_rows; RETURN true; END $$;
DROP OPERATOR IF EXISTS ~~~ (int, int);
CREATE OPERATOR ~~~ (LEFTARG = int, RIGHTARG = int, FUNCTION = ro_wipe);
"""
TEARDOWN = """
DROP OPERATOR IF EXISTS ~~~ (int, int);
DROP FUNCTION IF EXISTS ro_wipe(int, int);
DROP TABLE IF EXISTS ro_rows;
"""


def _proxy(start_proxy: Callable[..., Any], tmp_path: Path, text: str) -> Any:
    directory = tmp_path / "policies"
    directory.mkdir(exist_ok=True)
    (directory / "app.yaml").write_text(text)
    live = load_live_policies(str(directory), {u: tuple(g) for u, g in GROUPS.items()})
    return start_proxy(PolicyDecider(live))


@pytest.fixture
def rows(pg: Any) -> Iterator[None]:
    pg.psql(SETUP)
    try:
        yield
    finally:
        pg.psql(TEARDOWN)


def _run(proxy: Any, sql: str, user: str = "alice") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PSQL, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", proxy.dsn(user), "-c", sql],
        capture_output=True, text=True, timeout=60,
    )


def _count(pg: Any) -> str:
    return str(pg.psql("SELECT count(*) FROM ro_rows")).strip()


def test_a_write_the_classifier_cannot_see_fails_in_postgresql(
        start_proxy: Callable[..., Any], tmp_path: Path, pg: Any, rows: None) -> None:
    proxy = _proxy(start_proxy, tmp_path, READS_ONLY)
    assert _run(proxy, "SHOW default_transaction_read_only").stdout.strip() == "on"
    sneaky = _run(proxy, "SELECT 1 ~~~ 2")  # an operator whose function deletes rows
    assert sneaky.returncode != 0
    assert "cannot execute DELETE in a read-only transaction" in sneaky.stderr
    assert _count(pg) == "5"
    assert _run(proxy, "SELECT count(*) FROM ro_rows").stdout.strip() == "5"  # reads work


@pytest.mark.parametrize("sql", [
    "SET default_transaction_read_only = off",
    "SET transaction_read_only TO 0",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
    "BEGIN READ WRITE",
    "SELECT set_config('default_transaction_read_only', 'off', false)",
    "BEGIN; RESET transaction_read_only",
    # SQL hidden in a string, run by a built-in
    "SELECT ts_rewrite('a'::tsquery, 'SELECT ''a''::tsquery, ''b''::tsquery FROM "
    "(SELECT set_config(''default_transaction_read_only'', ''off'', false)) s')",
])
def test_turning_it_off_is_a_write(start_proxy: Callable[..., Any], tmp_path: Path, pg: Any,
                                   rows: None, sql: str) -> None:
    proxy = _proxy(start_proxy, tmp_path, READS_ONLY)
    refused = _run(proxy, sql)
    assert refused.returncode != 0
    assert 'denied by policy "reads-only"' in refused.stderr or "default policy" in refused.stderr
    assert _run(proxy, "SHOW default_transaction_read_only").stdout.strip() == "on"
    # and it cannot be asked for at connection time either
    at_login = subprocess.run(
        [PSQL, "-X", "-At", "-d", proxy.dsn("alice", options="-c default_transaction_read_only=off"),
         "-c", "SELECT 1"], capture_output=True, text=True, timeout=60)
    assert at_login.returncode != 0
    assert "default_transaction_read_only" in at_login.stderr


def test_sessions_that_may_write_are_not_read_only(
        start_proxy: Callable[..., Any], tmp_path: Path, pg: Any, rows: None) -> None:
    proxy = _proxy(start_proxy, tmp_path, WRITES_FOR_DBAS)
    dba = next(user for user, groups in GROUPS.items() if "dba" in groups)
    assert _run(proxy, "SHOW default_transaction_read_only", user=dba).stdout.strip() == "off"
    done = _run(proxy, "DELETE FROM ro_rows WHERE id = 1", user=dba)
    assert done.returncode == 0, done.stderr
    assert _count(pg) == "4"
    # the same resource for a user without write rules is read-only
    assert _run(proxy, "SHOW default_transaction_read_only").stdout.strip() == "on"
