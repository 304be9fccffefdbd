"""The real `pgvouch` command: serve (drain on SIGTERM, metrics), demo, tools."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from proxy import scram
from tests.conftest import PASSWORDS, PSQL, config_yaml, free_port
from tests.e2e.helpers import wait_port as _wait_port

PGVOUCH = [sys.executable, "-m", "proxy.cli"]


@pytest.fixture
def served(pg, tmp_path: Path):
    port, api_port = free_port(), free_port()
    cfg = tmp_path / "pgvouch.yaml"
    cfg.write_text(config_yaml(pg, port=port, api_port=api_port,
                               extra="log: {format: json}\nlimits: {drain_timeout: 3s}\n"))
    proc = subprocess.Popen([*PGVOUCH, "serve", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_port(port, proc)
    yield proc, port, api_port
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _dsn(port: int, user: str = "alice") -> str:
    return (f"host=127.0.0.1 port={port} user={user} dbname=app "
            f"password={PASSWORDS[user]} sslmode=disable")


def test_serve_metrics_health_and_drain(served):
    proc, port, api_port = served
    r = subprocess.run([PSQL, "-X", "-At", "-d", _dsn(port), "-c", "SELECT 1"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "1", r.stderr
    bad = _dsn(port).replace("alice-pw", "wrong")
    subprocess.run([PSQL, "-X", "-d", bad, "-c", "SELECT 1"], capture_output=True)
    base = f"http://127.0.0.1:{api_port}"
    assert urllib.request.urlopen(f"{base}/healthz").status == 200
    assert urllib.request.urlopen(f"{base}/readyz").status == 200
    metrics = urllib.request.urlopen(f"{base}/metrics").read().decode()
    assert re.search(r"^pgvouch_client_connections_total [1-9]", metrics, re.M)
    assert re.search(r'^pgvouch_statements_total\{decision="allow"\} [1-9]', metrics, re.M)
    assert re.search(r'^pgvouch_auth_failures_total\{reason="password"\} 1', metrics, re.M)
    assert re.search(r"^pgvouch_upstream_connect_seconds_count [1-9]", metrics, re.M)
    assert re.search(r"^pgvouch_client_received_bytes_total [1-9]", metrics, re.M)

    # a session that is busy when SIGTERM arrives may finish; new ones are refused
    busy = subprocess.Popen([PSQL, "-X", "-At", "-d", _dsn(port), "-c",
                             "SELECT pg_sleep(1.5), 'finished'"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.7)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    late = subprocess.run([PSQL, "-X", "-d", _dsn(port, "bob"), "-c", "SELECT 1"],
                          capture_output=True, text=True)
    assert late.returncode != 0
    out, _ = busy.communicate(timeout=20)
    assert "finished" in out
    assert proc.wait(timeout=20) == 0
    logs = proc.stderr.read()
    assert '"msg": "session opened' in logs and '"msg": "session closed' in logs
    assert "alice-pw" not in logs and "pgv_scram-secret" not in logs


def test_drain_timeout_terminates_stuck_sessions(served):
    proc, port, _ = served
    stuck = subprocess.Popen([PSQL, "-X", "-d", _dsn(port), "-c", "SELECT pg_sleep(30)"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.7)
    proc.send_signal(signal.SIGTERM)
    _, err = stuck.communicate(timeout=20)
    assert "terminating connection due to administrator command" in err
    assert proc.wait(timeout=20) == 0


def test_config_check(tmp_path: Path, pg):
    good = tmp_path / "good.yaml"
    good.write_text(config_yaml(pg, port=1, api_port=2))
    r = subprocess.run([*PGVOUCH, "config", "check", str(good)], capture_output=True, text=True)
    assert r.returncode == 0 and "OK" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("    database: app\n", "    database: app\n    colour: red\n"))
    r = subprocess.run([*PGVOUCH, "config", "check", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    line = bad.read_text().splitlines().index("    colour: red") + 1
    assert f"bad.yaml:{line}: unknown key 'colour'" in r.stderr


def test_user_hash_makes_a_working_verifier():
    r = subprocess.run([*PGVOUCH, "user", "hash", "--password-stdin"], input="s3cret\n",
                       capture_output=True, text=True)
    assert r.returncode == 0
    verifier = scram.parse_verifier(r.stdout.strip())
    client = scram.ScramClient("s3cret")
    server = scram.ScramServer(verifier)
    server_first = server.first(client.first())
    client.verify(server.final(client.final(server_first)))
    assert "s3cret" not in r.stdout


def test_demo_runs_and_accepts_alice():
    port, api_port = free_port(), free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([*PGVOUCH, "demo", "--port", str(port), "--api-port", str(api_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        password = None
        deadline = time.time() + 60
        assert proc.stdout is not None
        while time.time() < deadline and password is None:
            line = proc.stdout.readline()
            match = re.match(r"\s+alice\s+(\S+)\s+groups", line)
            if match:
                password = match.group(1)
        assert password, "demo did not print alice's password"
        _wait_port(port, proc)
        dsn = f"host=127.0.0.1 port={port} user=alice dbname=demo password={password}"
        r = subprocess.run([PSQL, "-X", "-At", "-d", dsn, "-c", "SELECT count(*) FROM accounts"],
                           capture_output=True, text=True)
        assert r.stdout.strip() == "50", r.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def test_example_config_is_valid():
    example = Path(__file__).resolve().parents[2] / "config" / "pgvouch.example.yaml"
    r = subprocess.run([*PGVOUCH, "config", "check", str(example)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
