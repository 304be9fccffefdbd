"""Break-glass end to end through the real `pgvouch serve`: real psql, real PostgreSQL, the
REST API and the `pgvouch approval-mode` command, a signed-webhook receiver on 127.0.0.1.

alice's UPDATE is held; dave (an owner) switches approvals off for the resource: the
pending request expires and alice's waiting psql hears why; her next UPDATE runs at once
with a NOTICE and a durable break-glass audit event; a DROP is still denied; the switch
is announced to the webhook; it survives a restart of the proxy; switching back on holds
the next UPDATE again. Runs once with the SQLite store and once with the shared
PostgreSQL store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from approvals.auth import token_hash
from tests.approvals.conftest import pg_dsn
from tests.conftest import config_yaml, free_port
from tests.e2e.helpers import (
    ALLOW_READS,
    DANGEROUS,
    add_user_fields,
    api_call,
    deny,
    policy,
    psql_popen,
    review,
    start_serve,
    stop_serve,
    wait_for,
    wait_port,
    write_policies,
)
from tests.e2e.test_review_flow import SECRET, Receiver

POLICY = policy(ALLOW_READS, review(), deny(f"{DANGEROUS}, ddl"))
TOKENS = {"bob": "tok-bob-0123456789", "dave": "tok-dave-0123456789"}
REASON = "incident 4711: payments stuck"


class Served:
    def __init__(self, tmp_path: Path, config: Path, port: int, api_port: int) -> None:
        self.tmp_path = tmp_path
        self.config = config
        self.port = port
        self.api_port = api_port
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = start_serve(self.config, env=dict(os.environ, PGV_TEST_WEBHOOK_SECRET=SECRET))
        wait_port(self.port, self.proc)
        wait_port(self.api_port, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_serve(self.proc)
            self.proc = None

    def api(self, method: str, path: str, user: str | None = None, body: dict | None = None
            ) -> tuple[int, Any]:
        return api_call(self.api_port, method, "/api/v1" + path, body=body,
                        token=TOKENS[user] if user else None)

    def psql(self, sql: str, *, retry: bool = False) -> subprocess.Popen[str]:
        return psql_popen(self.port, sql, retry=retry)

    def cli(self, *args: str, user: str = "dave") -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PGVOUCH_TOKEN=TOKENS[user])
        return subprocess.run(
            [sys.executable, "-m", "proxy.cli", "approval-mode", *args,
             "--api", f"http://127.0.0.1:{self.api_port}"],
            capture_output=True, text=True, env=env, timeout=60)

    def audit(self) -> list[dict[str, Any]]:
        status, body = self.api("GET", "/audit?limit=1000", "bob")
        assert status == 200
        return list(body["events"])


_wait_for = partial(wait_for, timeout=15, step=0.2)


@pytest.fixture(params=["sqlite", "postgres"])
def served(request: pytest.FixtureRequest, pg: Any, tmp_path: Path
           ) -> Iterator[tuple[Served, Receiver]]:
    policies = write_policies(tmp_path / "policies", POLICY)
    receiver = Receiver()
    schema = f"pgvouch_bg{uuid.uuid4().hex[:10]}"
    if request.param == "sqlite":
        store = f"sqlite:///{tmp_path}/approvals.db"
    else:  # the shared store several replicas would use
        store = f"{pg_dsn(pg)}?schema={schema}"
    port, api_port = free_port(), free_port()
    extra = (
        f"policies: {policies}\n"
        f"store: '{store}'\n"
        "hold: {wait_timeout: 30s, heartbeat: 2s}\n"
        "limits: {drain_timeout: 1s}\n"
        f"notify: {{webhooks: [{{url: 'http://127.0.0.1:{receiver.port}/hook', "
        "secret_env: PGV_TEST_WEBHOOK_SECRET, events: [request.created]}]}\n"
    )
    text = add_user_fields(config_yaml(pg, port=port, api_port=api_port, extra=extra), {
        "bob": [f"api_token_sha256: {token_hash(TOKENS['bob'])}"],
        "dave": ["roles: [owner]", f"api_token_sha256: {token_hash(TOKENS['dave'])}"]})
    config = tmp_path / "pgvouch.yaml"
    config.write_text(text)
    running = Served(tmp_path, config, port, api_port)
    running.start()
    try:
        yield running, receiver
    finally:
        running.stop()
        if request.param == "postgres":
            pg.psql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE', database="postgres")


def _pending(served: Served) -> list[dict[str, Any]]:
    status, body = served.api("GET", "/requests?status=pending", "bob")
    assert status == 200
    return list(body["requests"])


def test_break_glass_on_and_off(served: tuple[Served, Receiver], pg: Any) -> None:
    proxy, receiver = served
    pg.psql("UPDATE accounts SET balance = 810 WHERE id IN (81, 82, 83)")

    # alice's UPDATE is held, and waits
    held = proxy.psql("UPDATE accounts SET balance = 1 WHERE id = 81")
    [request] = _wait_for(lambda: _pending(proxy))

    # a non-owner cannot switch; an owner must give a reason
    status, body = proxy.api("POST", "/approval-mode", "bob",
                             {"resources": "ap*", "enabled": False, "reason": REASON})
    assert (status, body["error"]["code"]) == (403, "not_owner")
    refused = proxy.cli("off", "--resources", "ap*", "--reason", REASON, user="bob")
    assert refused.returncode == 1 and "not_owner" in refused.stderr
    status, body = proxy.api("POST", "/approval-mode", "dave", {"resources": "ap*", "enabled": False})
    assert (status, body["error"]["code"]) == (400, "bad_request")
    assert "reason" in body["error"]["message"]
    assert proxy.api("GET", "/approval-mode", "bob")[1] == {"modes": []}

    # dave switches approvals off from the shell: the pending request expires at once
    off = proxy.cli("off", "--resources", "ap*", "--reason", REASON)
    assert off.returncode == 0, off.stderr
    assert "approvals are OFF for ap*" in off.stdout and request["id"] in off.stdout
    out, err = held.communicate(timeout=30)
    assert held.returncode != 0
    assert f"request {request['id']} is expired (approvals were switched off for ap* by dave: " \
           f"{REASON})" in err, err
    assert pg.psql("SELECT balance FROM accounts WHERE id = 81").strip() == "810"
    status, expired = proxy.api("GET", f"/requests/{request['id']}", "bob")
    assert expired["status"] == "expired"

    # now alice's UPDATE runs directly, with a NOTICE, and is audited as break-glass
    direct = proxy.psql("UPDATE accounts SET balance = 2 WHERE id = 82")
    out, err = direct.communicate(timeout=30)
    assert direct.returncode == 0, err
    assert "UPDATE 1" in out
    assert f"approvals are OFF for ap* (switched off by dave: {REASON}); this statement runs " \
           "without review and was audited" in err
    assert pg.psql("SELECT balance FROM accounts WHERE id = 82").strip() == "2"
    assert _pending(proxy) == []

    # deny rules still apply
    drop = proxy.psql("DROP TABLE accounts")
    _, err = drop.communicate(timeout=30)
    assert drop.returncode != 0 and 'denied by policy "app-writes"' in err
    assert pg.psql("SELECT count(*) FROM accounts").strip() == "100"

    events = proxy.audit()
    [switched] = [e for e in events if e["type"] == "approval_mode.off"]
    assert (switched["actor"], switched["data"]["reason"], switched["data"]["resources"]) == (
        "dave", REASON, "ap*")
    [glass] = [e for e in events if e["type"] == "statement.break_glass"]
    assert glass["actor"] == "alice"
    assert glass["data"]["statements"] == ["UPDATE accounts SET balance = 2 WHERE id = 82"]
    assert glass["data"]["break_glass"]["switched_off_by"] == "dave"
    assert glass["data"]["break_glass"]["reason"] == REASON
    assert [e["actor"] for e in events if e["type"] == "request.expired"] == ["dave"]
    _wait_for(lambda: [e for e in proxy.audit() if e["type"] == "statement.denied"])  # queued

    # the switch was announced to the webhook (its events filter does not apply)
    announced = _wait_for(lambda: [e for e in receiver.events if e["event"] == "approval_mode.off"])
    assert announced[0]["actor"] == "dave" and announced[0]["data"]["reason"] == REASON
    assert receiver.bad_signatures == 0

    status_out = proxy.cli("status", user="bob")
    assert status_out.returncode == 0 and "OFF ap*" in status_out.stdout and "by dave" in status_out.stdout

    # the mode is in the store: a restarted proxy still runs the UPDATE directly
    proxy.stop()
    proxy.start()
    again = proxy.psql("UPDATE accounts SET balance = 3 WHERE id = 82")
    _, err = again.communicate(timeout=30)
    assert again.returncode == 0 and "approvals are OFF for ap*" in err
    assert pg.psql("SELECT balance FROM accounts WHERE id = 82").strip() == "3"

    # switching back on: audited, announced, and the next UPDATE is held again
    on = proxy.cli("on", "--resources", "ap*", "--reason", "incident over")
    assert on.returncode == 0 and "approvals are ON again for ap*" in on.stdout, on.stderr
    again = proxy.psql("UPDATE accounts SET balance = 4 WHERE id = 83", retry=True)
    _, err = again.communicate(timeout=30)
    assert again.returncode != 0 and "approval required: request" in err
    assert pg.psql("SELECT balance FROM accounts WHERE id = 83").strip() == "810"
    assert len(_pending(proxy)) == 1
    [back_on] = [e for e in proxy.audit() if e["type"] == "approval_mode.on"]
    assert (back_on["actor"], back_on["data"]["reason"]) == ("dave", "incident over")
    _wait_for(lambda: [e for e in receiver.events if e["event"] == "approval_mode.on"])
    assert json.dumps(proxy.api("GET", "/approval-mode", "bob")[1]["modes"][0]["enabled"]) == "true"
    assert proxy.cli("on", "--resources", "ap*").returncode == 1  # not off any more
