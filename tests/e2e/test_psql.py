"""psql through the real proxy to the real PostgreSQL."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import PSQL


def test_script_with_transactions_and_errors(proxy):
    script = """
    BEGIN;
    CREATE TEMP TABLE t(x int);
    INSERT INTO t SELECT generate_series(1, 5);
    SELECT sum(x) FROM t;
    COMMIT;
    SELECT current_user, current_database();
    """
    out = proxy.psql("-f", "-", input=script).stdout.split()
    assert "15" in out
    assert "pgv_scram|app" in out


def test_error_keeps_session_usable(proxy):
    r = proxy.psql("-v", "ON_ERROR_STOP=0", "-c", "SELECT 1/0", "-c", "SELECT 42", check=False)
    assert "division by zero" in r.stderr
    assert r.stdout.strip() == "42"


def test_copy_both_ways(proxy, tmp_path: Path, pg):
    src = tmp_path / "in.csv"
    src.write_text("".join(f"{i},row {i}\n" for i in range(1, 2001)))
    proxy.psql("-c", "CREATE TABLE IF NOT EXISTS copy_t(id int, label text); TRUNCATE copy_t")
    proxy.psql("-c", f"\\copy copy_t FROM '{src}' WITH (FORMAT csv)")
    assert pg.psql("SELECT count(*), sum(id) FROM copy_t").strip() == "2000|2001000"
    dst = tmp_path / "out.csv"
    proxy.psql("-c", f"\\copy (SELECT * FROM copy_t ORDER BY id) TO '{dst}' WITH (FORMAT csv)")
    assert dst.read_text() == src.read_text()


def test_notify_listen(proxy):
    script = "LISTEN chan; NOTIFY chan, 'hello'; SELECT 1;"
    r = proxy.psql("-c", script)
    assert 'Asynchronous notification "chan" with payload "hello"' in r.stdout + r.stderr


def test_notice_and_parameter_status(proxy):
    r = proxy.psql("-c", "DO $$BEGIN RAISE NOTICE 'hi there'; END$$", "-c", "SET application_name = 'x1'",
                   "-c", "SHOW application_name")
    assert "hi there" in r.stderr
    assert r.stdout.strip().endswith("x1")


def test_upstream_auth_methods(proxy):
    for account in ("app", "md5", "plain", "trust"):
        r = proxy.psql("-c", "SELECT current_user", dbname=f"app/{account}")
        assert r.stdout.strip().startswith("pgv_"), account
    r = proxy.psql("-c", "SELECT current_user", options="-c pgvouch.account=md5")
    assert r.stdout.strip() == "pgv_md5"


def test_upstream_auth_really_used_each_method(proxy):
    # system_user (PG16+) names the method the upstream server used to log us in
    methods = {}
    for account in ("app", "md5", "plain"):
        out = proxy.psql("-c", "SELECT coalesce(system_user, '')", dbname=f"app/{account}")
        methods[account] = out.stdout.strip().split(":")[0]
    assert methods == {"app": "scram-sha-256", "md5": "md5", "plain": "password"}


def test_wrong_password(proxy):
    dsn = proxy.dsn("alice").replace("password=alice-pw", "password=nope")
    r = subprocess.run([PSQL, "-X", "-d", dsn, "-c", "SELECT 1"], capture_output=True, text=True)
    assert r.returncode != 0
    assert 'password authentication failed for user "alice"' in r.stderr


def test_unknown_user_looks_like_wrong_password(proxy):
    r = proxy.psql("-c", "SELECT 1", user="mallory", check=False)
    assert 'password authentication failed for user "mallory"' in r.stderr


def test_unknown_resource_and_account(proxy):
    r = proxy.psql("-c", "SELECT 1", dbname="nope", check=False)
    assert 'resource "nope" does not exist' in r.stderr
    r = proxy.psql("-c", "SELECT 1", dbname="app/nope", check=False)
    assert 'account "nope" does not exist' in r.stderr


def test_account_allow_list(proxy):
    r = proxy.psql("-c", "SELECT 1", dbname="app/admin", check=False)
    assert 'user "alice" may not use account "admin"' in r.stderr
    assert proxy.psql("-c", "SELECT 1", user="bob", dbname="app/admin").stdout.strip() == "1"


def test_startup_role_option_refused(proxy):
    r = proxy.psql("-c", "SELECT current_user", options="-c role=postgres", check=False)
    assert r.returncode != 0
    assert "not allowed through pgvouch" in r.stderr


def test_replication_refused(proxy):
    r = proxy.psql("-c", "IDENTIFY_SYSTEM", replication="database", check=False)
    assert "replication connections are not supported" in r.stderr


def test_sigint_cancels_running_query(proxy):
    proc = subprocess.Popen(
        [PSQL, "-X", "-d", proxy.dsn("alice"), "-c", "SELECT pg_sleep(60)"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(1.0)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert "canceling statement due to user request" in err
    assert time.monotonic() - started < 10


def test_tls_sslmode_require(start_proxy, tmp_path: Path, pg):
    key, cert = tmp_path / "server.key", tmp_path / "server.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    proxy = start_proxy(extra=f"tls: {{cert_file: {cert}, key_file: {key}}}\n")
    dsn = proxy.dsn("alice").replace("sslmode=disable", "sslmode=require")
    r = subprocess.run(
        [PSQL, "-X", "-At", "-d", dsn, "-c", "SELECT 7"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "7"
    # and without TLS configured, sslmode=require fails cleanly
    plain = start_proxy()
    dsn = plain.dsn("alice").replace("sslmode=disable", "sslmode=require")
    r = subprocess.run([PSQL, "-X", "-d", dsn, "-c", "SELECT 1"], capture_output=True, text=True)
    assert r.returncode != 0
    assert "SSL" in r.stderr


def test_max_client_connections(start_proxy):
    proxy = start_proxy(extra="limits: {max_client_connections: 1}\n")
    holder = subprocess.Popen(
        [PSQL, "-X", "-d", proxy.dsn("alice"), "-c", "SELECT pg_sleep(3)"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        time.sleep(1.0)
        r = proxy.psql("-c", "SELECT 1", user="bob", check=False)
        assert "too many clients" in r.stderr
    finally:
        holder.wait(20)


def test_upstream_unreachable(start_proxy):
    from tests.conftest import free_port

    proxy = start_proxy(upstream_port=free_port(), resource_extra="    connect_timeout: 2s\n")
    r = proxy.psql("-c", "SELECT 1", check=False)
    assert r.returncode != 0
    assert 'cannot connect to resource "app"' in r.stderr or "cannot connect to resource 'app'" in r.stderr


def test_missing_account_password_is_reported_without_secrets(start_proxy):
    bad = start_proxy(accounts="- name: app\n  user: pgv_scram\n  password_env: NOPE_NOT_SET\n")
    r = bad.psql("-c", "SELECT 1", check=False)
    assert "NOPE_NOT_SET is not set" in r.stderr


@pytest.mark.parametrize("n", [3])
def test_many_sequential_sessions(proxy, n):
    for _ in range(n):
        assert proxy.psql("-c", "SELECT 1").stdout.strip() == "1"
