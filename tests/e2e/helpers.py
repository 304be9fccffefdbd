"""Scaffolding shared by the end-to-end tests that run the real ``pgvouch serve``.

Policy texts built from the usual rules, polling, port checks, starting and stopping the
server subprocess, REST calls with bearer tokens, and alice's psql through the proxy.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from approvals.auth import token_hash
from approvals.webhooks import verify
from tests.conftest import PASSWORDS, PSQL, PgServer, free_port

T = TypeVar("T")

# -- policies ------------------------------------------------------------------------------

DBA_REVIEW = '{steps: [{name: DBA review, approvers: ["group:dba"], required: 1}]}'
DANGEROUS = "destructive, privilege, admin, unknown"
ALLOW_READS = """\
      - when: {kinds: [read, session]}
        action: allow
"""


def policy(*rules: str, name: str = "app-writes") -> str:
    """A policy file with one policy for resource ``app``; anything else is denied."""
    return (f'\npolicies:\n  - name: {name}\n    match: {{resources: ["app"]}}\n    rules:\n'
            f"{''.join(rules)}defaults: {{action: deny}}\n")


def rule(action: str, kinds: str, *, name: str | None = None, tables: str | None = None,
         message: str | None = None, approval: str | None = None, jit: str | None = None) -> str:
    """One rule, in the order of keys the tests have always written them."""
    lines = [f"      - name: {name}\n        " if name else "      - "]
    when = f"{{kinds: [{kinds}]" + (f", tables: [{tables}]" if tables else "") + "}"
    lines.append(f"when: {when}\n        action: {action}\n")
    if message:
        lines.append(f"        message: {message}\n")
    if approval:
        lines.append(f"        approval: {approval}\n")
    if jit:
        lines.append(f"        jit: {{max_duration: {jit}}}\n")
    return "".join(lines)


def review(kinds: str = "write", *, approval: str = DBA_REVIEW, expires_after: str | None = None,
           **kwargs: str | None) -> str:
    """A review rule; by default writes, one DBA, requests never expiring."""
    if expires_after:
        approval = f"{approval[:-1]}, expires_after: {expires_after}}}"
    return rule("review", kinds, approval=approval, **kwargs)


def deny(kinds: str = DANGEROUS, **kwargs: str | None) -> str:
    return rule("deny", kinds, **kwargs)


# -- waiting -------------------------------------------------------------------------------


def wait_for(what: Callable[[], T | None], timeout: float = 15, step: float = 0.1) -> T:
    """``what()``'s first truthy answer, asked every ``step`` seconds for ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(step)
    raise AssertionError("timed out waiting")


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 20) -> None:
    """Until something listens on ``port``; fails at once if ``proc`` exits meanwhile."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"pgvouch exited early: {proc.stderr.read() if proc.stderr else ''}")
        if port_open(port):
            return
        time.sleep(0.1)
    raise AssertionError("pgvouch did not start listening")


# -- the server ----------------------------------------------------------------------------


def serve_extra(policies: Path, store: str, hold: str) -> str:
    """The usual start of ``config_yaml``'s ``extra``: the policy directory, the store,
    ``hold`` settings (without braces) and a 1 s drain."""
    return (f"policies: {policies}\n"
            f"store: {store}\n"
            f"hold: {{{hold}}}\n"
            "limits: {drain_timeout: 1s}\n")


def add_user_fields(text: str, fields: Mapping[str, Iterable[str]]) -> str:
    """``text`` (a ``config_yaml``) with extra lines under each named user."""
    for user, lines in fields.items():
        block = "".join(f"    {line}\n" for line in lines)
        text = text.replace(f"  - name: {user}\n", f"  - name: {user}\n{block}")
    return text


def add_tokens(text: str, tokens: Mapping[str, str]) -> str:
    """``text`` with each user's API token hash."""
    return add_user_fields(text, {user: [f"api_token_sha256: {token_hash(token)}"]
                                  for user, token in tokens.items()})


def start_serve(config: Path, *, env: Mapping[str, str] | None = None, log: Path | None = None,
                log_stdout: bool = False, cwd: Path | None = None) -> subprocess.Popen[Any]:
    """``pgvouch serve --config config``: stderr to ``log`` (a pipe without one; stdout too
    with ``log_stdout``), stdout discarded otherwise."""
    command = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)]
    if log is None:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env=env, cwd=cwd)
    with log.open("wb") as sink:
        return subprocess.Popen(command, stdout=sink if log_stdout else subprocess.DEVNULL,
                                stderr=sink, env=env, cwd=cwd)


def stop_serve(proc: subprocess.Popen[Any], timeout: float = 20) -> None:
    proc.terminate()  # SIGTERM: drain and stop
    proc.wait(timeout)


@contextmanager
def serving(config: Path, ports: Iterable[int], **kwargs: Any) -> Iterator[subprocess.Popen[Any]]:
    """A started ``pgvouch serve`` (see ``start_serve``) listening on ``ports``; stopped after."""
    proc = start_serve(config, **kwargs)
    try:
        for port in ports:
            wait_port(port, proc)
        yield proc
    finally:
        stop_serve(proc)


# -- webhooks ------------------------------------------------------------------------------


class WebhookReceiver:
    """A webhook receiver on 127.0.0.1 that checks every signature against ``secret``;
    subclasses keep what arrives (``record``), each after ``delay`` seconds."""

    delay = 0.0

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.bad_signatures = 0
        self.port = free_port()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def record(self, headers: Mapping[str, str], body: dict[str, Any]) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            if not verify(self.secret, request.headers.get("X-Pgvouch-Signature"), body, time.time()):
                self.bad_signatures += 1
                return web.Response(status=401)
            if self.delay:
                await asyncio.sleep(self.delay)
            self.record(request.headers, json.loads(body))
            return web.Response(text="ok")

        async def main() -> None:
            app = web.Application()
            app.router.add_post("/hook", handle)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._ready.set()
            await asyncio.Event().wait()

        asyncio.run(main())


# -- clients -------------------------------------------------------------------------------


def api_call(api_port: int, method: str, path: str, *, token: str | None = None,
             body: Any = None, raw: bytes | None = None, headers: Mapping[str, str] | None = None,
             timeout: float = 10) -> tuple[int, Any]:
    """(status, JSON answer) of a REST call; ``path`` includes ``/api/v1`` where it is meant."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(f"http://127.0.0.1:{api_port}{path}", data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def post_slack_interaction(api_port: int, body: bytes, headers: Mapping[str, str]) -> int:
    """The status of a (signed) Slack button click posted to the proxy's API."""
    request = urllib.request.Request(f"http://127.0.0.1:{api_port}/api/v1/slack/interactions",
                                     data=body, method="POST", headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def proxy_dsn(port: int, user: str = "alice") -> str:
    return (f"host=127.0.0.1 port={port} user={user} dbname=app "
            f"password={PASSWORDS[user]} sslmode=disable")


def psql_popen(port: int, sql: str, *, user: str = "alice", retry: bool = False,
               on_error_stop: bool = False) -> subprocess.Popen[str]:
    """A psql running ``sql`` through the proxy in the background (it may be held);
    ``retry``: a statement needing review fails at once instead of waiting."""
    dsn = proxy_dsn(port, user)
    if retry:
        dsn += " options='-c pgvouch.hold=retry'"
    stop = ["-v", "ON_ERROR_STOP=1"] if on_error_stop else []
    return subprocess.Popen([PSQL, "-X", "-At", *stop, "-d", dsn, "-c", sql],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def balance(pg: PgServer, row: int) -> str:
    """accounts.balance of one row, read directly from PostgreSQL."""
    return pg.psql(f"SELECT balance FROM accounts WHERE id = {row}").strip()


def audit_verify(config: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """``pgvouch audit verify`` on the store ``config`` names."""
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "audit", "verify", "--config", str(config)],
        capture_output=True, text=True, env=env, timeout=60)


# -- replicas: several `pgvouch serve` on one PostgreSQL store ----------------------------


class Replica:
    """One `pgvouch serve` subprocess; its log goes to a file (a pipe could fill up and block it)."""

    def __init__(self, name: str, config: Path, port: int, api_port: int, env: Mapping[str, str],
                 tokens: Mapping[str, str]) -> None:
        self.name = name
        self.config = config
        self.port = port
        self.api_port = api_port
        self.tokens = tokens
        self.log = config.with_suffix(".log")
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)],
                stdout=subprocess.DEVNULL, stderr=log, text=True, env=env)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica {self.name} exited: {self.log.read_text()[-2000:]}")
            if ("listening for store changes" in self.log.read_text()
                    and port_open(self.port) and port_open(self.api_port)):
                return
            time.sleep(0.1)
        raise AssertionError(f"replica {self.name} did not become ready: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: drain and stop
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def api(self, method: str, path: str, user: str = "bob", body: dict[str, Any] | None = None
            ) -> tuple[int, Any]:
        return api_call(self.api_port, method, f"/api/v1{path}", token=self.tokens[user], body=body)

    def psql(self, sql: str, *, retry: bool = False) -> subprocess.Popen[str]:
        return psql_popen(self.port, sql, retry=retry, on_error_stop=True)


def start_replica(name: str, write_config: Callable[[str], tuple[Path, int, int]],
                  env: Mapping[str, str], tokens: Mapping[str, str], attempts: int = 5) -> Replica:
    """A ready replica; ``write_config(name)`` writes its config on fresh ports: (path, port,
    api port). A port some other process grabbed meanwhile means another try."""
    for attempt in range(attempts):
        config, port, api_port = write_config(name)
        replica = Replica(name, config, port, api_port, env, tokens)
        try:
            replica.wait_ready()
            return replica
        except RuntimeError:
            replica.stop()
            if attempt == attempts - 1 or "in use" not in replica.log.read_text():
                raise  # not a port some other process grabbed meanwhile
    raise AssertionError("unreachable")


@contextmanager
def replica_pair(pg: PgServer, schema: str, write_config: Callable[[str], tuple[Path, int, int]],
                 env: Mapping[str, str], tokens: Mapping[str, str]) -> Iterator[tuple[Replica, Replica]]:
    """Replicas a and b on the store in ``schema``; after: both stopped cleanly, schema dropped."""
    started: list[Replica] = []
    try:
        started.append(start_replica("a", write_config, env, tokens))
        started.append(start_replica("b", write_config, env, tokens))
        yield started[0], started[1]
    finally:
        for replica in started:
            replica.stop()
        for replica in started:
            assert replica.proc.returncode == 0, replica.log.read_text()[-2000:]
        pg.psql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE', database="postgres")


def replica_config(tmp_path: Path, name: str, text: str, port: int,
                   api_port: int) -> tuple[Path, int, int]:
    """Write replica ``name``'s config: (path, proxy port, API port), as start_replica wants."""
    config = tmp_path / f"replica-{name}.yaml"
    config.write_text(text)
    return config, port, api_port


def write_policies(directory: Path, text: str) -> Path:
    """``directory`` (made here) holding ``text`` as its one policy file, app.yaml."""
    directory.mkdir()
    (directory / "app.yaml").write_text(text)
    return directory
