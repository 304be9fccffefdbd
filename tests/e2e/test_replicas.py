"""Two real `pgvouch serve` processes sharing one PostgreSQL store.

A statement held on replica A is released within a second of its approval
through replica B's API (the holds' fallback re-read is set to 30 s, so only
NOTIFY can explain it); requests that expire while both sweepers run expire
once, with one audit event and one webhook; every event's webhook arrives
once although both delivery workers drain the same queue; and the audit
chain both processes extended verifies.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from proxy import wire
from tests.approvals.conftest import pg_dsn
from tests.conftest import PASSWORDS, PgServer, config_yaml, free_port
from tests.e2e.helpers import (
    ALLOW_READS,
    Replica,
    WebhookReceiver,
    add_tokens,
    audit_verify,
    balance,
    policy,
    replica_config,
    replica_pair,
    review,
    wait_for,
    write_policies,
)
from tests.rawclient import RawClient, error_fields

POLICY = policy(ALLOW_READS, review(tables='"events"', expires_after="2s"), review())
TOKENS = {"alice": "tok-alice-replicas-0123", "bob": "tok-bob-replicas-0123"}
SECRET = "replica-webhook-secret"
EXPIRING = 20
POLL_INTERVAL = 30.0  # far above the latency the test allows: a release in time is NOTIFY's doing


class Receiver(WebhookReceiver):
    """A webhook receiver on 127.0.0.1 recording every signed delivery (slow enough to overlap)."""

    delay = 0.05

    def __init__(self) -> None:
        self.deliveries: list[tuple[str, dict[str, Any]]] = []  # (X-Pgvouch-Delivery, body)
        self._lock = threading.Lock()
        super().__init__(SECRET)

    def record(self, headers: Mapping[str, str], body: dict[str, Any]) -> None:
        with self._lock:
            self.deliveries.append((headers["X-Pgvouch-Delivery"], body))

    def events(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(body["event"], body["request"]["id"]) for _, body in self.deliveries]


_wait_for = partial(wait_for, timeout=20, step=0.05)


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
    text = add_tokens(config_yaml(pg, port=port, api_port=api_port, extra=extra), TOKENS)
    return replica_config(tmp_path, name, text, port, api_port)


@pytest.fixture
def cluster(pg: PgServer, tmp_path: Path) -> Iterator[Cluster]:
    write_policies(tmp_path / "policies", POLICY)
    schema = f"pgvouch_r{uuid.uuid4().hex[:12]}"
    env = dict(os.environ, PGV_TEST_WEBHOOK_SECRET=SECRET,
               PGV_TEST_STORE=f"{pg_dsn(pg)}?schema={schema}")
    receiver = Receiver()
    with replica_pair(pg, schema, lambda name: _write_config(tmp_path, pg, name, receiver),
                      env, TOKENS) as (a, b):
        yield Cluster(a, b, receiver, env)


_balance = balance


def _audit_verify(cluster: Cluster) -> subprocess.CompletedProcess[str]:
    return audit_verify(cluster.a.config, cluster.env)


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


def _cancel(port: int, pid: int, secret: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(wire.encode_cancel_request(pid, secret))
        assert sock.recv(10) == b""  # the proxy answers a cancel request by closing


def _quiet(client: RawClient, seconds: float) -> bool:
    """Whether nothing arrives from ``client``'s server for ``seconds``."""
    readable, _, _ = select.select([client.sock], [], [], seconds)
    return not readable


def test_a_cancel_request_that_reaches_b_cancels_the_statement_running_on_a(
    cluster: Cluster
) -> None:
    # Behind one address clients reach either replica: psql's Ctrl-C opens a new
    # connection, which may land on the replica that did not issue its key.
    client = RawClient(cluster.a.port, timeout=20)
    try:
        ready = client.startup("alice", PASSWORDS["alice"], "app")
        key = next(body for kind, body in ready if kind == "K")
        pid, secret = struct.unpack("!i", key[:4])[0], key[4:8]
        client.send(wire.query("SELECT pg_sleep(30)"))
        time.sleep(0.5)  # the statement is running upstream
        wrong = bytes([secret[0] ^ 1]) + secret[1:]
        _cancel(cluster.b.port, pid, wrong)
        assert _quiet(client, 1.5), "a wrong secret cancelled the statement"
        started = time.monotonic()
        _cancel(cluster.b.port, pid, secret)
        answer = client.read_until_ready()  # RowDescription comes before the sleep starts
        errors = [error_fields(body)["C"] for kind, body in answer if kind == "E"]
        assert errors == ["57014"], answer
        assert time.monotonic() - started < 5
        client.send(wire.query("SELECT 1"))  # the session goes on
        assert [k for k, _ in client.read_until_ready()] == ["T", "D", "C", "Z"]
    finally:
        client.close()
    assert "announced to the other replicas" in cluster.b.log.read_text()
    assert "received by another replica" in cluster.a.log.read_text()
