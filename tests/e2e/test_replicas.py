"""Two real `pgvouch serve` processes sharing one PostgreSQL store.

A statement held on replica A is released within a second of its approval
through replica B's API (the holds' fallback re-read is set to 30 s, so only
NOTIFY can explain it); requests that expire while both sweepers run expire
once, with one audit event and one webhook; every event's webhook arrives
once although both delivery workers drain the same queue; and the audit
chain both processes extended verifies.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from approvals.auth import token_hash
from approvals.webhooks import verify
from tests.approvals.conftest import pg_dsn
from tests.conftest import PASSWORDS, PSQL, PgServer, config_yaml, free_port

POLICY = """
policies:
  - name: app-writes
    match: {resources: ["app"]}
    rules:
      - when: {kinds: [read, session]}
        action: allow
      - when: {kinds: [write], tables: ["events"]}
        action: review
        approval: {steps: [{name: DBA review, approvers: ["group:dba"], required: 1}],
                   expires_after: 2s}
      - when: {kinds: [write]}
        action: review
        approval: {steps: [{name: DBA review, approvers: ["group:dba"], required: 1}]}
defaults: {action: deny}
"""
TOKENS = {"alice": "tok-alice-replicas-0123", "bob": "tok-bob-replicas-0123"}
SECRET = "replica-webhook-secret"
EXPIRING = 20
POLL_INTERVAL = 30.0  # far above the latency the test allows: a release in time is NOTIFY's doing


class Receiver:
    """A webhook receiver on 127.0.0.1 recording every signed delivery (slow enough to overlap)."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[str, dict[str, Any]]] = []  # (X-Pgvouch-Delivery, body)
        self.bad_signatures = 0
        self.port = free_port()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        import asyncio

        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            if not verify(SECRET, request.headers.get("X-Pgvouch-Signature"), body, time.time()):
                self.bad_signatures += 1
                return web.Response(status=401)
            await asyncio.sleep(0.05)
            with self._lock:
                self.deliveries.append((request.headers["X-Pgvouch-Delivery"], json.loads(body)))
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

    def events(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(body["event"], body["request"]["id"]) for _, body in self.deliveries]


class Replica:
    """One `pgvouch serve` subprocess; its log goes to a file (a pipe could fill up and block it)."""

    def __init__(self, name: str, config: Path, port: int, api_port: int, env: dict[str, str]) -> None:
        self.name = name
        self.config = config
        self.port = port
        self.api_port = api_port
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
                    and _port_open(self.port) and _port_open(self.api_port)):
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
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{self.api_port}/api/v1{path}", data=data,
                                         method=method)
        request.add_header("Authorization", f"Bearer {TOKENS[user]}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def psql(self, sql: str, *, retry: bool = False) -> subprocess.Popen[str]:
        dsn = (f"host=127.0.0.1 port={self.port} user=alice dbname=app "
               f"password={PASSWORDS['alice']} sslmode=disable")
        if retry:
            dsn += " options='-c pgvouch.hold=retry'"
        return subprocess.Popen([PSQL, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-c", sql],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def _wait_for(what: Callable[[], Any], timeout: float = 20, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(step)
    raise AssertionError("timed out waiting")


class Cluster:
    def __init__(self, a: Replica, b: Replica, receiver: Receiver, env: dict[str, str]) -> None:
        self.a, self.b, self.receiver, self.env = a, b, receiver, env

    def pending(self, count: int = 1) -> list[dict[str, Any]]:
        def found() -> list[dict[str, Any]] | None:
            status, body = self.b.api("GET", "/requests?status=pending")
            assert status == 200, body
            return body["requests"] if len(body["requests"]) >= count else None

        return list(_wait_for(found))

    def audit(self) -> list[dict[str, Any]]:
        status, body = self.a.api("GET", "/audit?limit=1000")
        assert status == 200, body
        return list(body["events"])


def _write_config(tmp_path: Path, pg: PgServer, name: str, receiver: Receiver) -> tuple[Path, int, int]:
    port, api_port = free_port(), free_port()
    extra = (
        f"policies: {tmp_path / 'policies'}\n"
        "store_env: PGV_TEST_STORE\n"
        f"hold: {{wait_timeout: 30s, heartbeat: 60s, poll_interval: {int(POLL_INTERVAL)}s, "
        "sweep_interval: 20ms}\n"
        "preview: {enabled: false}\n"
        "limits: {drain_timeout: 1s}\n"
        f"notify: {{webhooks: [{{url: 'http://127.0.0.1:{receiver.port}/hook', "
        "secret_env: PGV_TEST_WEBHOOK_SECRET}]}\n"
    )
    text = config_yaml(pg, port=port, api_port=api_port, extra=extra)
    for user, token in TOKENS.items():
        text = text.replace(f"  - name: {user}\n",
                            f"  - name: {user}\n    api_token_sha256: {token_hash(token)}\n")
    config = tmp_path / f"replica-{name}.yaml"
    config.write_text(text)
    return config, port, api_port


def _start(tmp_path: Path, pg: PgServer, name: str, receiver: Receiver, env: dict[str, str]) -> Replica:
    for attempt in range(5):
        config, port, api_port = _write_config(tmp_path, pg, name, receiver)
        replica = Replica(name, config, port, api_port, env)
        try:
            replica.wait_ready()
            return replica
        except RuntimeError:
            replica.stop()
            if attempt == 4 or "in use" not in replica.log.read_text():
                raise  # not a port some other process grabbed meanwhile
    raise AssertionError("unreachable")


@pytest.fixture
def cluster(pg: PgServer, tmp_path: Path) -> Iterator[Cluster]:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "app.yaml").write_text(POLICY)
    schema = f"pgvouch_r{uuid.uuid4().hex[:12]}"
    env = dict(os.environ, PGV_TEST_WEBHOOK_SECRET=SECRET,
               PGV_TEST_STORE=f"{pg_dsn(pg)}?schema={schema}")
    receiver = Receiver()
    started: list[Replica] = []
    try:
        started.append(_start(tmp_path, pg, "a", receiver, env))
        started.append(_start(tmp_path, pg, "b", receiver, env))
        yield Cluster(started[0], started[1], receiver, env)
    finally:
        for replica in started:
            replica.stop()
        for replica in started:
            assert replica.proc.returncode == 0, replica.log.read_text()[-2000:]
        pg.psql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE', database="postgres")


def _balance(pg: PgServer, account: int) -> str:
    return pg.psql(f"SELECT balance FROM accounts WHERE id = {account}").strip()


def _audit_verify(cluster: Cluster) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "audit", "verify", "--config", str(cluster.a.config)],
        capture_output=True, text=True, env=cluster.env, timeout=60)


def test_a_statement_held_on_a_is_released_within_a_second_of_approval_on_b(
    cluster: Cluster, pg: PgServer
) -> None:
    before = _balance(pg, 42)
    held = cluster.a.psql("UPDATE accounts SET balance = balance + 1 WHERE id = 42")
    try:
        request = cluster.pending()[0]
        time.sleep(0.5)  # the hold is now waiting (and has read its request at least once)
        assert held.poll() is None
        status, body = cluster.b.api("POST", f"/requests/{request['id']}/approve", body={"note": "ok"})
        approved_at = time.monotonic()
        assert status == 200, body
        _wait_for(lambda: held.poll() is not None, timeout=10, step=0.005)
        latency = time.monotonic() - approved_at
    finally:
        if held.poll() is None:
            held.kill()
    out, err = held.communicate(timeout=10)
    assert held.returncode == 0, err
    assert "UPDATE 1" in out
    assert _balance(pg, 42) != before
    assert latency < 1.0, f"released {latency:.2f}s after the approval"
    assert latency < POLL_INTERVAL / 10  # not the holds' periodic re-read


def test_expiry_runs_once_with_both_sweepers(cluster: Cluster) -> None:
    # Distinct statements submitted at once through both replicas (retry mode: no waiting), so
    # they fall due together and both sweepers (every 20 ms) work through the same batch.
    submitted = [(cluster.a if n % 2 else cluster.b).psql(
        f"INSERT INTO events (payload) VALUES ('expire-{n}')", retry=True) for n in range(EXPIRING)]
    for result in submitted:
        _, err = result.communicate(timeout=30)
        assert result.returncode != 0 and "approval required" in err, err
    ids = [request["id"] for request in cluster.pending(EXPIRING)]
    assert len(set(ids)) == EXPIRING

    def all_expired() -> bool:
        status, body = cluster.b.api("GET", "/requests?status=expired")
        return status == 200 and {r["id"] for r in body["requests"]} >= set(ids)

    _wait_for(all_expired, timeout=20)
    _wait_for(lambda: {i for e, i in cluster.receiver.events() if e == "request.expired"} >= set(ids),
              timeout=20)
    time.sleep(1.5)  # give a second (wrong) expiry or delivery time to show up
    expired_events = Counter(e["request_id"] for e in cluster.audit() if e["type"] == "request.expired")
    assert {i: expired_events[i] for i in ids} == {i: 1 for i in ids}
    hooks = Counter(i for e, i in cluster.receiver.events() if e == "request.expired")
    assert {i: hooks[i] for i in ids} == {i: 1 for i in ids}
    assert cluster.receiver.bad_signatures == 0
    verified = _audit_verify(cluster)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_every_event_is_delivered_once_by_two_workers(cluster: Cluster, pg: PgServer) -> None:
    holds = [(cluster.a if n % 2 else cluster.b).psql(
        f"UPDATE accounts SET balance = balance + 1 WHERE id = {60 + n}") for n in range(10)]
    try:
        requests = cluster.pending(10)
        for n, request in enumerate(requests):  # approvals through both APIs
            status, body = (cluster.b if n % 2 else cluster.a).api(
                "POST", f"/requests/{request['id']}/approve", body={})
            assert status == 200, body
        for held in holds:
            _, err = held.communicate(timeout=20)
            assert held.returncode == 0, err
    finally:
        for held in holds:
            if held.poll() is None:
                held.kill()
    ids = {request["id"] for request in requests}

    def audited() -> Counter[tuple[str, str]]:
        return Counter((e["type"], e["request_id"]) for e in cluster.audit()
                       if e["request_id"] in ids and e["type"].startswith("request."))

    # created, voted/approved, executing, executed: each audited transition queues one webhook
    def settled() -> bool:
        expected = audited()
        return (all(expected[("request.executed", i)] == 1 for i in ids)
                and Counter(e for e in cluster.receiver.events() if e[1] in ids) == expected)

    _wait_for(settled, timeout=30, step=0.2)
    time.sleep(2.5)  # both workers poll every second: a double send would arrive by now
    received = Counter(e for e in cluster.receiver.events() if e[1] in ids)
    assert received == audited()
    assert max(received.values()) == 1
    delivery_ids = [delivery for delivery, _ in cluster.receiver.deliveries]
    assert len(delivery_ids) == len(set(delivery_ids))
    assert cluster.receiver.bad_signatures == 0
    verified = _audit_verify(cluster)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "OK" in verified.stdout or "ok" in verified.stdout.lower()
