"""A ProxyServer with a minimal configuration, for tests that need no PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from config.settings import load_settings
from proxy.server import ProxyServer

CONFIG = """
listen: {host: 127.0.0.1, port: 6999}
client_auth: trust
resources:
  - name: app
    host: 127.0.0.1
    port: 5432
    database: app
    accounts: [{name: app, user: app, password_env: PGV_UNUSED_PASSWORD}]
users: [{name: alice}]
"""


def minimal_server(tmp_path: Path) -> ProxyServer:
    path = tmp_path / "pgvouch.yaml"
    path.write_text(CONFIG)
    return ProxyServer(load_settings(str(path)))
