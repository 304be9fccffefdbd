"""``workers: 2``: one `pgvouch serve` supervisor and two worker processes behind one port.

Everything runs for real: the supervisor accepts and hands each client socket to the
worker with the fewest sessions, so a second concurrent client lands on the other
worker. The tests check what must not change for clients and operators: one
connection limit, one /metrics, cancel requests that reach the other worker, the
console's session list, SIGHUP, SIGTERM, and a worker that dies being replaced.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy import wire
from tests.approvals.conftest import pg_dsn
from tests.conftest import PASSWORDS, PSQL, PgServer, config_yaml, free_port
from tests.e2e.helpers import (
    ALLOW_READS,
    add_tokens,
    api_call,
    policy,
    proxy_dsn,
    psql_popen,
    review,
    wait_for,
    write_policies,
)
from tests.rawclient import RawClient, error_fields

TOKENS = {"bob": "tok-bob-workers-0123456"}


class Workers:
    """``pgvouch serve`` with ``workers: 2``; its log (every process's) in a file."""

    def __init__(self, tmp_path: Path, pg: PgServer, extra: str = "",
                 env: dict[str, str] | None = None) -> None:
        self.config = tmp_path / "workers.yaml"
        self.log = tmp_path / "workers.log"
        for _attempt in range(5):  # a free port some other process took meanwhile: again
            self.port, self.api_port = free_port(), free_port()
            text = config_yaml(pg, port=self.port, api_port=self.api_port,
                               extra="workers: 2\n" + extra)
            self.config.write_text(add_tokens(text, TOKENS))
            with self.log.open("w") as sink:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "proxy.cli", "serve", "--config", str(self.config)],
                    stdout=subprocess.DEVNULL, stderr=sink, env=env)
            wait_for(lambda: self.proc.poll() is not None or "with 2 workers" in self.text(),
                     timeout=60)
            if self.proc.poll() is None or "in use" not in self.text():
                break
        assert self.proc.poll() is None, self.text()[-3000:]

    def text(self) -> str:
        return self.log.read_text()

    def worker_pids(self) -> dict[str, int]:
        """Each worker's latest pid, from the supervisor's "is ready" lines."""
        return {name: int(pid) for name, pid in
                re.findall(r"(worker-\d) \(pid (\d+)\) is ready", self.text())}

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.api_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read().decode()
        values = {}
        for line in body.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture
def workers(pg: PgServer, tmp_path: Path) -> Iterator[Workers]:
    started = Workers(tmp_path, pg, "limits: {drain_timeout: 1s, max_client_connections: 3}\n")
    try:
        yield started
    finally:
        assert started.stop() == 0, started.text()[-3000:]


def _session(port: int, user: str = "alice") -> RawClient:
    client = RawClient(port, timeout=20)
    client.startup(user, PASSWORDS[user], "app")
    return client


def _key(ready: list[tuple[str, bytes]]) -> tuple[int, bytes]:
    key = next(body for kind, body in ready if kind == "K")
    return struct.unpack("!i", key[:4])[0], key[4:8]


def _cancel(port: int, pid: int, secret: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(wire.encode_cancel_request(pid, secret))
        assert sock.recv(10) == b""


def _quiet(client: RawClient, seconds: float) -> bool:
    readable, _, _ = select.select([client.sock], [], [], seconds)
    return not readable


def _spread(workers: Workers) -> bool:
    """Whether both workers have opened a session (their log lines may trail the client)."""
    wanted = {"worker-0", "worker-1"}
    return bool(wait_for(lambda: set(re.findall(
        r"\[(worker-\d)\] pgvouch\.session: session opened", workers.text())) == wanted))


def test_sessions_spread_over_the_workers_and_metrics_count_them_all(workers: Workers) -> None:
    clients = [_session(workers.port) for _ in range(2)]
    try:
        assert _spread(workers)
        for client in clients:
            client.send(wire.query("SELECT 1"))
            assert [kind for kind, _ in client.read_until_ready()] == ["T", "D", "C", "Z"]
        metrics = workers.metrics()
        assert metrics["pgvouch_client_connections_active"] == 2
        assert metrics['pgvouch_statements_total{decision="allow"}'] == 2
    finally:
        for client in clients:
            client.close()
    wait_for(lambda: workers.metrics()["pgvouch_client_connections_active"] == 0)
    assert workers.metrics()["pgvouch_client_connections_total"] == 2
    status, body = api_call(workers.api_port, "GET", "/readyz")
    assert status == 200 and body["status"] == "ready"
    # without pin_workers, a worker may run wherever the supervisor may
    for pid in workers.worker_pids().values():
        assert os.sched_getaffinity(pid) == os.sched_getaffinity(workers.proc.pid)


def test_pinned_workers_each_run_on_a_cpu_of_their_own(pg: PgServer, tmp_path: Path) -> None:
    started = Workers(tmp_path, pg, "pin_workers: true\n")
    try:
        cpus = sorted(os.sched_getaffinity(0))  # what the supervisor inherited
        wait_for(lambda: len(started.worker_pids()) == 2)
        for name, pid in started.worker_pids().items():
            index = int(name.rpartition("-")[2])
            cpu = cpus[index % len(cpus)]
            assert os.sched_getaffinity(pid) == {cpu}
            for task in os.listdir(f"/proc/{pid}/task"):  # its threads too
                assert os.sched_getaffinity(int(task)) == {cpu}
            assert f"{name} runs on CPU {cpu}" in started.text()
        clients = [_session(started.port) for _ in range(2)]
        assert _spread(started)
        for client in clients:
            client.send(wire.query("SELECT 1"))
            assert [kind for kind, _ in client.read_until_ready()] == ["T", "D", "C", "Z"]
            client.close()
    finally:
        assert started.stop() == 0, started.text()[-3000:]


def test_a_cancel_request_that_reaches_the_other_worker_cancels_the_statement(
    workers: Workers
) -> None:
    client = RawClient(workers.port, timeout=20)
    try:
        pid, secret = _key(client.startup("alice", PASSWORDS["alice"], "app"))
        client.send(wire.query("SELECT pg_sleep(30)"))
        time.sleep(0.5)
        # the worker with the session has one; the cancel request goes to the other
        wrong = bytes([secret[0] ^ 1]) + secret[1:]
        _cancel(workers.port, pid, wrong)
        assert _quiet(client, 1.5), "a wrong secret cancelled the statement"
        started = time.monotonic()
        _cancel(workers.port, pid, secret)
        answer = client.read_until_ready()
        assert [error_fields(body)["C"] for kind, body in answer if kind == "E"] == ["57014"]
        assert time.monotonic() - started < 5
        client.send(wire.query("SELECT 1"))
        assert [kind for kind, _ in client.read_until_ready()] == ["T", "D", "C", "Z"]
    finally:
        client.close()
    assert "received by another worker" in workers.text()


def test_the_connection_limit_is_one_limit_for_all_workers(workers: Workers) -> None:
    clients = [_session(workers.port) for _ in range(3)]  # max_client_connections: 3
    try:
        assert _spread(workers)
        refused = RawClient(workers.port, timeout=20)
        try:
            answer = refused.startup("alice", PASSWORDS["alice"], "app")
            assert [error_fields(body)["C"] for kind, body in answer if kind == "E"] == ["53300"]
        finally:
            refused.close()
        clients.pop().close()
        wait_for(lambda: workers.metrics()["pgvouch_client_connections_active"] == 2)
        clients.append(_session(workers.port))  # room again
    finally:
        for client in clients:
            client.close()


def test_a_worker_that_dies_is_replaced_and_the_others_keep_their_sessions(
    workers: Workers
) -> None:
    client = _session(workers.port)  # on worker-0, the first with the fewest sessions
    try:
        before = workers.worker_pids()
        os.kill(before["worker-1"], signal.SIGKILL)
        wait_for(lambda: workers.worker_pids()["worker-1"] != before["worker-1"], timeout=30)
        assert "worker-1 exited with status -9" in workers.text()
        client.send(wire.query("SELECT 1"))
        assert [kind for kind, _ in client.read_until_ready()] == ["T", "D", "C", "Z"]
        others = [_session(workers.port) for _ in range(2)]
        for other in others:
            other.close()
        assert workers.metrics()["pgvouch_client_connections_total"] >= 2
    finally:
        client.close()


def test_sighup_without_policies_harms_nothing(workers: Workers) -> None:
    client = _session(workers.port)
    try:
        pids = workers.worker_pids()
        workers.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: workers.text().count("no policies are configured, nothing to reload")
                 == 2, timeout=10)
        client.send(wire.query("SELECT 1"))
        assert [kind for kind, _ in client.read_until_ready()] == ["T", "D", "C", "Z"]
        assert workers.worker_pids() == pids and "exited" not in workers.text()
    finally:
        client.close()


def test_a_worker_draining_on_its_own_gets_no_new_clients_but_keeps_its_cancels(
    pg: PgServer, tmp_path: Path
) -> None:
    started = Workers(tmp_path, pg, "limits: {drain_timeout: 20s}\n")
    try:
        held = RawClient(started.port, timeout=20)  # worker-0, which drains while it is open
        pid, secret = _key(held.startup("alice", PASSWORDS["alice"], "app"))
        other = _session(started.port)  # worker-1: one session each, so worker-0 is first
        os.kill(started.worker_pids()["worker-0"], signal.SIGTERM)
        wait_for(lambda: "worker-0 is draining" in started.text())
        begun = time.monotonic()
        for _ in range(3):  # worker-0 has as few sessions as worker-1 but takes none now
            _session(started.port).close()
        assert time.monotonic() - begun < 5
        held.send(wire.query("SELECT pg_sleep(30)"))  # the draining worker's session goes on
        time.sleep(0.5)
        _cancel(started.port, pid, secret)  # lands on worker-1; the note reaches worker-0
        answer = held.read_until_ready()
        assert [error_fields(body)["C"] for kind, body in answer if kind == "E"] == ["57014"]
        held.close()
        other.close()
        wait_for(lambda: "worker-0 exited with status 0" in started.text(), timeout=20)
    finally:
        assert started.stop() == 0, started.text()[-3000:]


def test_a_worker_that_stops_answering_gets_no_new_clients_until_it_answers(
    workers: Workers
) -> None:
    first = _session(workers.port)  # worker-0; so worker-1 would be next
    stopped = workers.worker_pids()["worker-1"]
    os.kill(stopped, signal.SIGSTOP)
    try:
        wait_for(lambda: "worker-1 has not answered" in workers.text(), timeout=15)
        second = _session(workers.port)  # worker-0 again, at once
        second.close()
    finally:
        os.kill(stopped, signal.SIGCONT)
    wait_for(lambda: "worker-1 answers again" in workers.text(), timeout=10)
    third = _session(workers.port)  # worker-1 takes clients again
    third.close()
    first.close()
    opened = "[worker-1] pgvouch.session: session opened"
    wait_for(lambda: opened in workers.text())
    assert workers.text().count(opened) == 1  # the third client only


def test_a_restarted_worker_runs_the_configuration_the_others_run(workers: Workers) -> None:
    workers.config.write_text("this: [is not a pgvouch configuration\n")  # edited meanwhile
    before = workers.worker_pids()
    os.kill(before["worker-1"], signal.SIGKILL)
    wait_for(lambda: workers.worker_pids()["worker-1"] != before["worker-1"], timeout=30)
    clients = [_session(workers.port) for _ in range(2)]  # one on each worker
    try:
        for client in clients:
            client.send(wire.query("SELECT 1"))
            assert [kind for kind, _ in client.read_until_ready()] == ["T", "D", "C", "Z"]
    finally:
        for client in clients:
            client.close()
    wait_for(lambda: "[worker-1] pgvouch.session: session opened" in workers.text())


def test_clients_wait_while_no_worker_can_take_them(pg: PgServer, tmp_path: Path) -> None:
    started = Workers(tmp_path, pg, "limits: {max_client_connections: 2000}\n")
    pids = started.worker_pids()
    waiting: list[socket.socket] = []
    try:
        for pid in pids.values():
            os.kill(pid, signal.SIGSTOP)
        try:
            # more than both workers' socket queues hold (a few hundred each)
            waiting = [socket.create_connection(("127.0.0.1", started.port), timeout=10)
                       for _ in range(700)]
            wait_for(lambda: "clients wait" in started.text(), timeout=10)
        finally:
            for pid in pids.values():
                os.kill(pid, signal.SIGCONT)
        client = _session(started.port)
        client.close()
        for sock in waiting:  # none was dropped: each is still open, waiting for its login
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1, socket.MSG_PEEK)
        assert "could not hand" not in started.text()
    finally:
        for sock in waiting:
            sock.close()
        assert started.stop() == 0, started.text()[-3000:]


def test_sigterm_drains_every_worker_and_stops(pg: PgServer, tmp_path: Path) -> None:
    started = Workers(tmp_path, pg, "limits: {drain_timeout: 1s}\n")
    pids = started.worker_pids()
    client = _session(started.port)
    try:
        begun = time.monotonic()
        assert started.stop() == 0, started.text()[-3000:]
        assert time.monotonic() - begun < 15
        ended = client.read_until_ready()  # the drain timeout ended the idle session
        assert [error_fields(body)["C"] for kind, body in ended if kind == "E"] == ["57P01"]
    finally:
        client.close()
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", started.port), timeout=1).close()


def test_workers_with_policies_share_holds_console_and_reloads(pg: PgServer,
                                                                tmp_path: Path) -> None:
    policies = write_policies(tmp_path / "policies", policy(ALLOW_READS, review()))
    schema = f"pgvouch_w{uuid.uuid4().hex[:12]}"
    env = dict(os.environ, PGV_TEST_STORE=f"{pg_dsn(pg)}?schema={schema}")
    started = Workers(tmp_path, pg, f"policies: {policies}\nstore_env: PGV_TEST_STORE\n"
                      "hold: {poll_interval: 30s}\nlimits: {drain_timeout: 1s}\n", env=env)
    try:
        idle = _session(started.port)  # worker-0; the held statement runs on worker-1
        held = psql_popen(started.port, "UPDATE accounts SET balance = balance WHERE id = 1")

        def pending() -> list[dict[str, object]] | None:
            status, body = api_call(started.api_port, "GET", "/api/v1/requests?status=pending",
                                    token=TOKENS["bob"])
            assert status == 200, body
            return list(body["requests"]) or None

        request = wait_for(pending)[0]
        assert _spread(started)
        # held on worker-1, counted from the store by worker-0's /metrics
        assert started.metrics()["pgvouch_requests_pending"] == 1
        console = subprocess.run(
            [PSQL, "-X", "-At", "-d", proxy_dsn(started.port, "bob").replace(
                "dbname=app", "dbname=pgvouch"), "-c", "SHOW SESSIONS"],
            capture_output=True, text=True, timeout=30)
        assert console.returncode == 0, console.stderr
        rows = [line.split("|") for line in console.stdout.splitlines()]
        assert {row[1] for row in rows} >= {"alice", "bob"} and len(rows) == 3
        assert any(row[8] == request["id"] for row in rows)  # the held one, on the other worker
        status, body = api_call(started.api_port, "POST",
                                f"/api/v1/requests/{request['id']}/approve",
                                token=TOKENS["bob"], body={"note": "ok"})
        assert status == 200, body
        out, err = held.communicate(timeout=10)
        assert held.returncode == 0 and "UPDATE 1" in out, err
        assert started.metrics()["pgvouch_requests_pending"] == 0
        idle.close()
        started.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(re.findall(r"\[worker-\d\] pgvouch\.policy: policies reloaded from",
                                        started.text())) >= 2, timeout=10)
    finally:
        assert started.stop() == 0, started.text()[-3000:]
        pg.psql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE', database="postgres")


def test_psql_with_tls_and_copy_works_through_either_worker(pg: PgServer, tmp_path: Path) -> None:
    key, cert = tmp_path / "server.key", tmp_path / "server.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    started = Workers(tmp_path, pg, f"tls: {{cert_file: {cert}, key_file: {key}}}\n"
                      "limits: {drain_timeout: 1s}\n")
    try:
        idle = _session(started.port)  # the psql below lands on the other worker
        dsn = proxy_dsn(started.port).replace("sslmode=disable", "sslmode=require")
        for _ in range(2):  # sslmode=require: psql fails unless the worker speaks TLS
            result = subprocess.run(
                [PSQL, "-X", "-At", "-d", dsn,
                 "-c", r"\copy (SELECT g FROM generate_series(1, 3) g) TO STDOUT"],
                capture_output=True, text=True, timeout=30)
            assert result.returncode == 0, result.stderr
            assert result.stdout.split() == ["1", "2", "3"]
            idle.close()
        assert _spread(started)
    finally:
        assert started.stop() == 0, started.text()[-3000:]
