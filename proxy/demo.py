"""``pgvouch demo``: the proxy in front of a throwaway local PostgreSQL.

Owns: starting a private PostgreSQL with the same launcher the tests use,
loading a little sample data, creating demo users (alice, bob, carol) with
fresh random passwords, writing a config next to the data, and running the
proxy with the example policies until Ctrl-C.

Must not: be used for anything but a local demo (the cluster is deleted on
exit).
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import textwrap
from pathlib import Path

from approvals.auth import token_hash
from config.settings import load_settings
from proxy import scram
from proxy.pgcluster import LocalPostgres

DEMO_USERS = {"alice": ["developers"], "bob": ["dba"], "carol": ["dba", "security"]}
EXAMPLE_POLICIES = Path(__file__).resolve().parent.parent / "config" / "policies"

SAMPLE_DATA = """
CREATE TABLE accounts (id int PRIMARY KEY, owner text NOT NULL, balance numeric NOT NULL);
INSERT INTO accounts SELECT g, 'customer ' || g, (g * 37) % 1000 FROM generate_series(1, 50) g;
CREATE TABLE payments (id bigserial PRIMARY KEY, account_id int REFERENCES accounts(id),
                       amount numeric NOT NULL, created_at timestamptz DEFAULT now());
INSERT INTO payments(account_id, amount) SELECT (g % 50) + 1, g FROM generate_series(1, 200) g;
"""


def _write_config(cluster: LocalPostgres, base: Path, port: int, api_port: int,
                  passwords: dict[str, str], tokens: dict[str, str],
                  upstream: dict[str, str]) -> Path:
    users = "".join(
        f"  - name: {name}\n    groups: [{', '.join(groups)}]\n"
        f"    password_verifier: \"{scram.make_verifier(passwords[name]).encode()}\"\n"
        f"    api_token_sha256: {token_hash(tokens[name])}\n"
        for name, groups in DEMO_USERS.items()
    )
    for name, secret in upstream.items():
        (base / f"{name}.password").write_text(secret)
    policies = f"policies: {EXAMPLE_POLICIES}\n" if EXAMPLE_POLICIES.is_dir() else ""
    text = textwrap.dedent(f"""\
        # Written by `pgvouch demo`; deleted when the demo stops.
        listen: {{host: 127.0.0.1, port: {port}}}
        api: {{host: 127.0.0.1, port: {api_port}}}
        client_auth: scram
        resources:
          - name: demo
            host: {cluster.host}
            port: {cluster.port}
            database: demo
            default_account: app
            accounts:
              - name: app
                user: demo_app
                password_file: {base / "demo_app.password"}
              - name: readonly
                user: demo_ro
                password_file: {base / "demo_ro.password"}
        store: sqlite:///{base / "pgvouch.db"}
        """) + policies + "users:\n" + users
    path = base / "pgvouch.yaml"
    path.write_text(text)
    return path


def run_demo(port: int = 6432, api_port: int = 8432) -> int:
    from proxy.cli import run_proxy

    print("pgvouch demo: starting a throwaway PostgreSQL ...", flush=True)
    with LocalPostgres(max_connections=100) as cluster:
        cluster.create_database("demo")
        upstream = {"demo_app": secrets.token_urlsafe(12), "demo_ro": secrets.token_urlsafe(12)}
        cluster.create_role("demo_app", upstream["demo_app"], "scram-sha-256")
        cluster.create_role("demo_ro", upstream["demo_ro"], "scram-sha-256")
        cluster.psql(SAMPLE_DATA, database="demo")
        cluster.psql(
            "GRANT ALL ON ALL TABLES IN SCHEMA public TO demo_app;"
            "GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO demo_app;"
            "GRANT SELECT ON ALL TABLES IN SCHEMA public TO demo_ro;",
            database="demo",
        )
        passwords = {name: secrets.token_urlsafe(9) for name in DEMO_USERS}
        tokens = {name: secrets.token_urlsafe(18) for name in DEMO_USERS}
        base = cluster.base_dir / "pgvouch"
        base.mkdir(mode=0o700)
        config = _write_config(cluster, base, port, api_port, passwords, tokens, upstream)
        settings = load_settings(config)

        def banner() -> None:
            print(textwrap.dedent(f"""
                pgvouch demo is running (Ctrl-C to stop; everything is deleted on exit)
                  proxy:  127.0.0.1:{port}     API: http://127.0.0.1:{api_port}/metrics
                  config: {config}
                Demo users (passwords are new each run):"""))
            for name, groups in DEMO_USERS.items():
                print(f"  {name:6} {passwords[name]:14} groups: {', '.join(groups)}")
            print(textwrap.dedent(f"""
                Try (reads run; writes wait for a DBA; DROP/TRUNCATE are denied):
                  PGPASSWORD={passwords['alice']} psql "host=127.0.0.1 port={port} user=alice dbname=demo"
                  demo=> UPDATE accounts SET balance = 0 WHERE id = 7;   -- held: note the request id
                Approve it as bob from another terminal:
                  curl -s -H "Authorization: Bearer {tokens['bob']}" \\
                       http://127.0.0.1:{api_port}/api/v1/requests?status=pending
                  curl -s -H "Authorization: Bearer {tokens['bob']}" -X POST -d '{{}}' \\
                       http://127.0.0.1:{api_port}/api/v1/requests/R-XXXXX/approve
                """), flush=True)

        try:
            asyncio.run(run_proxy(settings, on_ready=banner))
        except KeyboardInterrupt:
            pass
        except OSError as exc:
            print(f"pgvouch demo: {exc}", file=sys.stderr)
            return 1
    return 0
