"""The whole review flow through the real `pgvouch serve`: alice's psql is held,
bob approves through the REST API, the row really changes; a signed webhook
reaches a receiver on 127.0.0.1; an inbound hook decides; metrics count it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web

from approvals.auth import token_hash
from approvals.webhooks import sign, verify
from tests.conftest import GROUPS, PASSWORDS, PSQL, config_yaml, free_port
from tests.e2e.test_cli import _wait_port

POLICY = """
policies:
  - name: prod-writes
    match: {resources: ["app"]}
    rules:
      - when: {kinds: [read, session]}
        action: allow
      - when: {kinds: [write]}
        action: review
        message: Writes need a DBA
        approval: {steps: [{name: DBA review, approvers: ["group:dba"], required: 1}]}
      - when: {kinds: [destructive, privilege, admin, unknown, ddl]}
        action: deny
defaults: {action: deny}
"""
TOKENS = {"alice": "tok-alice-0123456789", "bob": "tok-bob-0123456789",
          "carol": "tok-carol-0123456789"}
SECRET = "webhook-secret-abc"
HOOK_SECRET = "inbound-secret-xyz"


class Receiver:
    """A webhook receiver on 127.0.0.1 that checks every signature."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.bad_signatures = 0
        self.port = free_port()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        import asyncio

        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            if not verify(SECRET, request.headers.get("X-Pgvouch-Signature"), body, time.time()):
                self.bad_signatures += 1
                return web.Response(status=401)
            self.events.append(json.loads(body))
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


@pytest.fixture
def served(pg, tmp_path: Path):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "app.yaml").write_text(POLICY)
    receiver = Receiver()
    port, api_port = free_port(), free_port()
    extra = (
        f"policies: {policies}\n"
        f"store: sqlite:///{tmp_path}/approvals.db\n"
        "hold: {wait_timeout: 30s, heartbeat: 2s}\n"
        "limits: {drain_timeout: 1s}\n"
        f"notify: {{webhooks: [{{url: 'http://127.0.0.1:{receiver.port}/hook', "
        "secret_env: PGV_TEST_WEBHOOK_SECRET}]}\n"
        "integrations: [{name: chatbot, secret_env: PGV_TEST_HOOK_SECRET, approvers: ['carol']}]\n"
    )
    text = config_yaml(pg, port=port, api_port=api_port, extra=extra)
    for user, token in TOKENS.items():  # add each user's token hash
        text = text.replace(f"  - name: {user}\n",
                            f"  - name: {user}\n    api_token_sha256: {token_hash(token)}\n")
    cfg = tmp_path / "pgvouch.yaml"
    cfg.write_text(text)
    env = dict(os.environ, PGV_TEST_WEBHOOK_SECRET=SECRET, PGV_TEST_HOOK_SECRET=HOOK_SECRET)
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    _wait_port(port, proc)
    yield port, api_port, receiver, proc
    proc.terminate()
    proc.wait(20)


def _api(api_port: int, method: str, path: str, user: str | None = None,
         body: dict | None = None, headers: dict | None = None, raw: bytes | None = None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(f"http://127.0.0.1:{api_port}{path}", data=data, method=method)
    if user:
        request.add_header("Authorization", f"Bearer {TOKENS[user]}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        request.add_header(k, v)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _held_psql(port: int, sql: str) -> subprocess.Popen[str]:
    dsn = (f"host=127.0.0.1 port={port} user=alice dbname=app password={PASSWORDS['alice']} "
           "sslmode=disable")
    return subprocess.Popen([PSQL, "-X", "-At", "-d", dsn, "-c", sql],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


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
