"""The whole review flow through the real `pgvouch serve`: alice's psql is held,
bob approves through the REST API, the row really changes; a signed webhook
reaches a receiver on 127.0.0.1; an inbound hook decides; metrics count it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from approvals.webhooks import sign
from tests.conftest import GROUPS, config_yaml, free_port
from tests.e2e.helpers import (
    ALLOW_READS,
    DANGEROUS,
    WebhookReceiver,
    add_tokens,
    api_call,
    deny,
    policy,
    psql_popen,
    review,
    serve_extra,
    serving,
    write_policies,
)

POLICY = policy(ALLOW_READS, review(message="Writes need a DBA"), deny(f"{DANGEROUS}, ddl"),
                name="prod-writes")
TOKENS = {"alice": "tok-alice-0123456789", "bob": "tok-bob-0123456789",
          "carol": "tok-carol-0123456789"}
SECRET = "webhook-secret-abc"
HOOK_SECRET = "inbound-secret-xyz"


class Receiver(WebhookReceiver):
    """A webhook receiver on 127.0.0.1 that checks every signature."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        super().__init__(SECRET)

    def record(self, headers: Mapping[str, str], body: dict[str, Any]) -> None:
        self.events.append(body)


@pytest.fixture
def served(pg, tmp_path: Path):
    policies = write_policies(tmp_path / "policies", POLICY)
    receiver = Receiver()
    port, api_port = free_port(), free_port()
    extra = (
        serve_extra(policies, f"sqlite:///{tmp_path}/approvals.db", "wait_timeout: 30s, heartbeat: 2s")
        + f"notify: {{webhooks: [{{url: 'http://127.0.0.1:{receiver.port}/hook', "
        "secret_env: PGV_TEST_WEBHOOK_SECRET}]}\n"
        "integrations: [{name: chatbot, secret_env: PGV_TEST_HOOK_SECRET, approvers: ['carol']}]\n"
    )
    text = add_tokens(config_yaml(pg, port=port, api_port=api_port, extra=extra), TOKENS)
    cfg = tmp_path / "pgvouch.yaml"
    cfg.write_text(text)
    env = dict(os.environ, PGV_TEST_WEBHOOK_SECRET=SECRET, PGV_TEST_HOOK_SECRET=HOOK_SECRET)
    with serving(cfg, (port,), env=env) as proc:
        yield port, api_port, receiver, proc


def _api(api_port: int, method: str, path: str, user: str | None = None,
         body: dict | None = None, headers: dict | None = None, raw: bytes | None = None):
    return api_call(api_port, method, path, token=TOKENS[user] if user else None, body=body,
                    raw=raw, headers=headers)


def _held_psql(port: int, sql: str) -> subprocess.Popen[str]:
    return psql_popen(port, sql)


def _pending(api_port: int, timeout: float = 10) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, body = _api(api_port, "GET", "/api/v1/requests?status=pending", "bob")
        assert status == 200
        items = body["requests"] if isinstance(body, dict) else body
        if items:
            return items[0]
        time.sleep(0.2)
    raise AssertionError("no pending request")


def test_alice_held_bob_approves_through_the_api(served, pg):
    port, api_port, receiver, _proc = served
    pg.psql("UPDATE accounts SET balance = 50 WHERE id = 95")
    psql = _held_psql(port, "UPDATE accounts SET balance = 0 WHERE id = 95")
    request = _pending(api_port)
    rid = request["id"]
    # alice cannot approve her own request; the API says why, with a stable code
    status, body = _api(api_port, "POST", f"/api/v1/requests/{rid}/approve", "alice", {})
    assert status == 403 and body["error"]["code"] == "cannot_self_approve"
    status, detail = _api(api_port, "GET", f"/api/v1/requests/{rid}", "bob")
    assert status == 200 and "bob" in json.dumps(detail)
    assert pg.psql("SELECT balance FROM accounts WHERE id = 95").strip() == "50"
    status, _ = _api(api_port, "POST", f"/api/v1/requests/{rid}/approve", "bob", {"note": "ok"})
    assert status == 200
    _, err = psql.communicate(timeout=30)
    assert f"held for approval as request {rid}" in err
    assert pg.psql("SELECT balance FROM accounts WHERE id = 95").strip() == "0"
    # webhooks: created (eligible approvers, never the requester), approved, executed; all signed
    deadline = time.time() + 15
    while time.time() < deadline and {"request.created", "request.approved",
                                        "request.executed"} - {e["event"] for e in receiver.events}:
        time.sleep(0.2)
    kinds = [e["event"] for e in receiver.events]
    assert {"request.created", "request.approved", "request.executed"} <= set(kinds)
    created = next(e for e in receiver.events if e["event"] == "request.created")
    assert "alice" not in created["eligible_approvers"] and "bob" in created["eligible_approvers"]
    assert receiver.bad_signatures == 0
    status, audit = _api(api_port, "GET", "/api/v1/audit/verify", "bob")
    assert status == 200 and audit.get("ok") is True
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics").read().decode()
    assert re.search(r'pgvouch_request_decisions_total\{outcome="approved"\} 1', metrics)
    assert re.search(r'pgvouch_webhook_deliveries_total\{result="delivered"\} [1-9]', metrics)


def test_deny_through_the_api_and_inbound_hook_approval(served, pg):
    port, api_port, _receiver, _proc = served
    pg.psql("UPDATE accounts SET balance = 960 WHERE id = 96")
    psql = _held_psql(port, "UPDATE accounts SET balance = 1 WHERE id = 96")
    rid = _pending(api_port)["id"]
    status, _ = _api(api_port, "POST", f"/api/v1/requests/{rid}/deny", "bob",
                     {"note": "use the migration tool"})
    assert status == 200
    _, err = psql.communicate(timeout=30)
    assert "denied by bob: use the migration tool" in err
    assert pg.psql("SELECT balance FROM accounts WHERE id = 96").strip() == "960"

    # a chat bot approves for carol through the signed inbound hook
    psql = _held_psql(port, "UPDATE accounts SET balance = 2 WHERE id = 96")
    rid = _pending(api_port)["id"]
    body = json.dumps({"request_id": rid, "approver": "carol", "decision": "approve",
                       "note": "from chat"}).encode()
    forged = sign("wrong-secret", body, int(time.time()))
    status, answer = _api(api_port, "POST", "/api/v1/hooks/chatbot", raw=body,
                          headers={"X-Pgvouch-Signature": forged})
    assert status == 401
    header = sign(HOOK_SECRET, body, int(time.time()))
    status, answer = _api(api_port, "POST", "/api/v1/hooks/chatbot", raw=body,
                          headers={"X-Pgvouch-Signature": header})
    assert status == 200, answer
    psql.communicate(timeout=30)
    assert pg.psql("SELECT balance FROM accounts WHERE id = 96").strip() == "2"
    # the same signed call again is a replay
    status, answer = _api(api_port, "POST", "/api/v1/hooks/chatbot", raw=body,
                          headers={"X-Pgvouch-Signature": header})
    assert status == 401 and answer["error"]["code"] == "replayed_signature"
    assert GROUPS["carol"]  # carol is a DBA: eligible in the snapshot
