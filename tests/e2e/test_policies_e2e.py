"""Policies enforced by the real proxy, with real clients, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import asyncpg
import psycopg
import pytest

from proxy.policy_decider import PolicyDecider, load_live_policies
from tests.conftest import GROUPS, PASSWORDS, PSQL, config_yaml, free_port
from tests.e2e.test_cli import _wait_port

POLICY = """
policies:
  - name: app-guard
    description: the test database
    match: {resources: ["app"]}
    rules:
      - when: {kinds: [read, session]}
        action: allow
      - when: {kinds: [write], tables: ["events", "public.events"]}
        action: allow
      - when: {kinds: [write, ddl]}
        action: review
        message: Writes need a DBA
        approval: {steps: [{name: DBA review, approvers: ["group:dba"], required: 1}]}
      - when: {kinds: [destructive, privilege, admin, unknown]}
        action: deny
        message: Destructive statements are not allowed here
defaults: {action: deny}
"""


def _policy_dir(tmp_path: Path, text: str = POLICY) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir(exist_ok=True)
    (directory / "app.yaml").write_text(text)
    return directory


@pytest.fixture
def guarded(start_proxy, tmp_path):
    live = load_live_policies(str(_policy_dir(tmp_path)), {u: tuple(g) for u, g in GROUPS.items()})
    return start_proxy(PolicyDecider(live))


def _rows(pg, sql: str) -> str:
    return pg.psql(sql).strip()


def test_reads_allowed_destructive_denied_with_policy_name(guarded, pg):
    assert guarded.psql("-c", "SELECT count(*) FROM accounts").stdout.strip() == "100"
    r = guarded.psql("-v", "ON_ERROR_STOP=0", "-c", "DELETE FROM accounts", "-c", "SELECT 1",
                     check=False)
    assert 'denied by policy "app-guard": Destructive statements are not allowed here' in r.stderr
    assert r.stdout.strip() == "1"  # the session stays usable
    assert _rows(pg, "SELECT count(*) FROM accounts") == "100"


def test_review_without_approvals_is_refused_with_pv001(guarded):
    c = subprocess.run([PSQL, "-X", "-d", guarded.dsn("alice"), "-v", "VERBOSITY=verbose", "-c",
                        "UPDATE accounts SET balance = 0 WHERE id = 1"],
                       capture_output=True, text=True)
    assert "PV001" in c.stderr and "approval required" in c.stderr


def test_denial_inside_a_transaction_aborts_it(guarded, pg):
    pg.psql("DELETE FROM events WHERE payload = 'policy-tx'")
    script = """
    BEGIN;
    INSERT INTO events(payload) VALUES ('policy-tx');
    DROP TABLE accounts;
    COMMIT;
    """
    r = guarded.psql("-v", "ON_ERROR_STOP=0", "-f", "-", input=script, check=False)
    assert "Destructive statements are not allowed" in r.stderr
    assert _rows(pg, "SELECT count(*) FROM events WHERE payload = 'policy-tx'") == "0"
    assert _rows(pg, "SELECT to_regclass('accounts') IS NOT NULL") == "t"


@pytest.mark.parametrize("sql", [
    "SELECT 1; DELETE FROM accounts",
    "/* harmless */ DELETE FROM accounts -- where id = 1",
    "PREPARE x AS DELETE FROM accounts; EXECUTE x",
    "WITH gone AS (DELETE FROM accounts RETURNING *) SELECT count(*) FROM gone",
    "EXPLAIN ANALYZE DELETE FROM accounts",
    "SELECT pg_terminate_backend(pg_backend_pid())",
    "DO $$BEGIN DELETE FROM accounts; END$$",
    "dElEtE fRoM accounts",
    "SELECT 1 /* /* nested */ */; TRUNCATE accounts",
])
def test_evasions_are_denied(guarded, pg, sql):
    r = guarded.psql("-c", sql, check=False)
    assert r.returncode != 0
    assert "denied by policy" in r.stderr, r.stderr
    assert _rows(pg, "SELECT count(*) FROM accounts") == "100"


def test_sql_prepare_then_execute_in_separate_messages(guarded, pg):
    r = guarded.psql("-v", "ON_ERROR_STOP=0", "-c", "PREPARE wipe AS DELETE FROM accounts",
                     "-c", "EXECUTE wipe", check=False)
    assert r.stderr.count("denied by policy") >= 1
    assert _rows(pg, "SELECT count(*) FROM accounts") == "100"


def test_no_false_alarms(guarded):
    out = guarded.psql("-c", "SELECT 'DROP TABLE accounts'", "-c",
                       "SELECT $$DELETE FROM accounts$$", "-c", "SET search_path = public",
                       "-c", "INSERT INTO events(payload) VALUES ('allowed write')").stdout
    assert "DROP TABLE accounts" in out and "DELETE FROM accounts" in out


def test_asyncpg_extended_denial_and_prepared(guarded, pg):
    async def main():
        conn = await asyncpg.connect(host="127.0.0.1", port=guarded.port, user="alice",
                                     password=PASSWORDS["alice"], database="app", ssl=False)
        try:
            assert await conn.fetchval("SELECT owner FROM accounts WHERE id = $1", 3) == "owner3"
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="app-guard"):
                await conn.execute("DELETE FROM accounts WHERE $1::int IS NOT NULL", 1)
            stmt = await conn.prepare("DELETE FROM accounts")  # preparing runs nothing
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await stmt.fetch()
            assert await conn.fetchval("SELECT 7") == 7
        finally:
            await conn.close()

    asyncio.run(main())
    assert _rows(pg, "SELECT count(*) FROM accounts") == "100"


def test_psycopg_pipeline_with_denial(guarded, pg):
    with psycopg.connect(guarded.dsn("alice"), autocommit=True) as conn:
        with conn.pipeline() as pipe:
            first = conn.execute("SELECT 1")
            pipe.sync()
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("TRUNCATE accounts")
                pipe.sync()
            last = conn.execute("SELECT 3")
        assert first.fetchone() == (1,) and last.fetchone() == (3,)
    assert _rows(pg, "SELECT count(*) FROM accounts") == "100"


def test_reload_on_change_and_sighup_keeps_old_set_when_invalid(pg, tmp_path: Path):
    directory = _policy_dir(tmp_path)
    port, api_port = free_port(), free_port()
    cfg = tmp_path / "pgvouch.yaml"
    cfg.write_text(config_yaml(pg, port=port, api_port=api_port,
                               extra=f"policies: {directory}\nlimits: {{drain_timeout: 1s}}\n"
                                     f"store: sqlite:///{tmp_path}/approvals.db\n"))
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dsn = f"host=127.0.0.1 port={port} user=alice dbname=app password=alice-pw sslmode=disable"

    def select() -> subprocess.CompletedProcess[str]:
        return subprocess.run([PSQL, "-X", "-At", "-d", dsn, "-c", "SELECT 41 + 1"],
                              capture_output=True, text=True)

    def wait_for(predicate, timeout: float = 10) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return True
            time.sleep(0.3)
        return False

    try:
        _wait_port(port, proc)
        assert select().stdout.strip() == "42"
        # a file change is picked up by the watcher
        (directory / "app.yaml").write_text(POLICY.replace("kinds: [read, session]",
                                                           "kinds: [session]"))
        assert wait_for(lambda: "denied" in select().stderr)
        # an invalid file is refused; the previous set stays in force
        (directory / "app.yaml").write_text("policies: [oops\n")
        time.sleep(3)
        assert "denied" in select().stderr
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics").read().decode()
        assert re.search(r'pgvouch_policy_reloads_total\{result="error"\} [1-9]', metrics)
        # SIGHUP reloads a valid set
        (directory / "app.yaml").write_text(POLICY)
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: select().stdout.strip() == "42")
    finally:
        proc.terminate()
        proc.wait(20)
    logs = proc.stderr.read() if proc.stderr else ""
    assert "policy reload refused" in logs
    # reloads are in the audit log too
    export = subprocess.run([sys.executable, "-m", "proxy.cli", "audit", "export", "--config",
                             str(cfg), "--format", "jsonl"], capture_output=True, text=True)
    assert export.returncode == 0, export.stderr
    assert '"policy.reload_refused"' in export.stdout and '"policy.reloaded"' in export.stdout


def test_serve_refuses_to_start_with_invalid_policies(pg, tmp_path: Path):
    directory = _policy_dir(tmp_path, "policies:\n  - name: x\n    match: {}\n    rules: []\n")
    cfg = tmp_path / "pgvouch.yaml"
    cfg.write_text(config_yaml(pg, port=free_port(), api_port=free_port(),
                               extra=f"policies: {directory}\nstore: sqlite:///{tmp_path}/a.db\n"))
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "app.yaml:" in r.stderr
