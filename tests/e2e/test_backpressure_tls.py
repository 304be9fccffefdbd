"""Flow control with a slow client, and upstream TLS."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy import wire
from proxy.pgcluster import LocalPostgres, find_server_binaries
from tests.conftest import PASSWORDS, PgServer, RunningProxy, config_yaml, free_port, make_settings
from tests.e2e.test_cli import _wait_port
from tests.rawclient import RawClient


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_slow_client_streaming_1gb_keeps_proxy_memory_flat(pg, tmp_path: Path):
    port = free_port()
    cfg = tmp_path / "pgvouch.yaml"
    extra = "log: {level: WARNING}\nlimits: {drain_timeout: 1s}\n"
    cfg.write_text(config_yaml(pg, port=port, api_port=free_port(), extra=extra))
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_port(port, proc)
        c = RawClient(port, timeout=60)
        c.startup("alice", PASSWORDS["alice"])
        baseline = _rss_mb(proc.pid)
        rows, width = 1_000_000, 1000  # ~1 GB of DataRows
        c.send(wire.query(f"SELECT repeat('x', {width}) FROM generate_series(1, {rows})"))
        peak = baseline
        # read slowly for a while: the upstream must be paused, not buffered
        framer = wire.Framer(1 << 30, "server")
        count, done = 0, False

        def take(data: bytes) -> None:
            nonlocal count, done
            for kind, _, _ in framer.feed(data)[1]:
                if kind == ord("D"):
                    count += 1
                elif kind == ord("Z"):
                    done = True

        take(c.buf)
        received = 0
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            data = c.sock.recv(16384)
            received += len(data)
            take(data)
            time.sleep(0.005)
            peak = max(peak, _rss_mb(proc.pid))
        assert received < 200 * 1024 * 1024
        # then drain everything at full speed and count the rows
        c.sock.settimeout(120)
        while not done:
            data = c.sock.recv(1 << 20)
            assert data, "connection closed early"
            take(data)
            if count % 64 == 0:
                peak = max(peak, _rss_mb(proc.pid))
        assert count == rows
        assert peak - baseline < 100, f"proxy RSS grew from {baseline:.0f} MB to {peak:.0f} MB"
        c.close()
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


@pytest.fixture(scope="module")
def tls_pg():
    binaries = find_server_binaries(require_tls=True)
    with LocalPostgres(binaries) as cluster:
        cert = cluster.enable_tls()
        cluster.setup_auth_roles()
        cluster.create_database("app")
        yield cluster, cert


def test_upstream_tls_require_and_verify_full(tls_pg, tmp_path: Path):
    cluster, cert = tls_pg
    os.environ["PGV_TLS_PASSWORD"] = "pgv_tls-secret"
    server = PgServer(cluster.host, cluster.port, "postgres", None, cluster)
    accounts = "- name: app\n  user: pgv_tls\n  password_env: PGV_TLS_PASSWORD\n"
    proxies = []
    try:
        for mode, extra in (("require", ""), ("verify-full", f"    ca_file: {cert}\n")):
            proxy = RunningProxy(make_settings(server, tmp_path, accounts=accounts,
                                               resource_extra=f"    sslmode: {mode}\n{extra}"))
            proxies.append(proxy)
            out = proxy.psql("-c", "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            assert out.stdout.strip() == "t", mode
        # the TLS-only role cannot log in without TLS: the error reaches the client
        proxy = RunningProxy(make_settings(server, tmp_path, accounts=accounts))
        proxies.append(proxy)
        r = proxy.psql("-c", "SELECT 1", check=False)
        assert r.returncode != 0 and "upstream refused the login" in r.stderr
    finally:
        for proxy in proxies:
            proxy.stop()
