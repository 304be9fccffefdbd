"""A JIT grant whose window runs out is recorded, end to end through the real ``pgvouch
serve``: alice's 3-second grant is approved through the API, covers her UPDATE through the
proxy to the real PostgreSQL, and once it lapses the sweeper moves it to ``expired``, the
audit log has one ``request.ended`` (actor ``system``) and a signed-webhook receiver on
127.0.0.1 (its ``events:`` filter naming ``request.ended``) got it; the next UPDATE is
reviewed again. Once with a SQLite store, once with a PostgreSQL one."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.approvals.conftest import pg_dsn
from tests.conftest import config_yaml, free_port
from tests.e2e.helpers import add_tokens, serving, wait_for, write_policies
from tests.e2e.test_jit_grants import POLICY, TOKENS, Served, _balance, _held
from tests.e2e.test_review_flow import SECRET, Receiver

_wait_for = partial(wait_for, timeout=20, step=0.1)


@pytest.fixture(params=["sqlite", "postgres"])
def served(request: pytest.FixtureRequest, pg: Any, tmp_path: Path) -> Iterator[tuple[Served, Receiver]]:
    policies = write_policies(tmp_path / "policies", POLICY)
    receiver = Receiver()
    schema = f"pgvouch_ge{uuid.uuid4().hex[:10]}"
    store = (f"sqlite:///{tmp_path}/approvals.db" if request.param == "sqlite"
             else f"{pg_dsn(pg)}?schema={schema}")
    port, api_port = free_port(), free_port()
    extra = (f"policies: {policies}\n"
             f"store: '{store}'\n"
             "hold: {wait_timeout: 30s, heartbeat: 5s, sweep_interval: 200ms}\n"
             "limits: {drain_timeout: 1s}\n"
             f"notify: {{webhooks: [{{url: 'http://127.0.0.1:{receiver.port}/hook', "
             "secret_env: PGV_TEST_WEBHOOK_SECRET, events: [request.approved, request.ended]}]}\n")
    config = tmp_path / "pgvouch.yaml"
    config.write_text(add_tokens(config_yaml(pg, port=port, api_port=api_port, extra=extra), TOKENS))
    log = tmp_path / "pgvouch.log"
    env = dict(os.environ, PGV_TEST_WEBHOOK_SECRET=SECRET)
    try:
        with serving(config, (port, api_port), log=log, env=env) as proc:
            yield Served(port, api_port, proc, policies, log), receiver
    finally:
        if request.param == "postgres":
            pg.psql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE', database="postgres")


def test_a_lapsed_grant_is_ended_in_the_audit_log_and_on_the_webhook(
        served: tuple[Served, Receiver], pg: Any) -> None:
    proxy, receiver = served
    pg.psql("UPDATE accounts SET balance = 460 WHERE id = 46")
    status, grant = proxy.api("POST", "/grants", "alice", {
        "resource": "app", "account": "app", "kinds": ["write"], "duration": "3s", "reason": "quick fix"})
    assert status == 201, grant
    grant_id = grant["id"]
    ends_at = proxy.approve(grant_id)["approved_until"]
    result = proxy.psql("UPDATE accounts SET balance = 461 WHERE id = 46")
    assert result.returncode == 0 and time.time() < ends_at, result.stderr  # ran under the grant
    assert _balance(pg, 46) == "461"
    assert [e for e in proxy.audit() if e["type"] == "request.ended"] == []  # not before its end

    def ended_records() -> list[dict[str, Any]]:
        return [e for e in proxy.audit() if e["type"] == "request.ended" and e["request_id"] == grant_id]

    [record] = _wait_for(ended_records)
    assert record["actor"] == "system" and record["at"] >= ends_at
    assert record["data"]["event"] == {"approved_until": ends_at}
    assert record["data"]["status"] == "expired" and record["data"]["subject_kind"] == "grant"

    status, after = proxy.api("GET", f"/requests/{grant_id}", "bob")
    assert status == 200 and after["status"] == "expired" and after["approved_until"] == ends_at
    assert proxy.api("GET", "/grants?active=true", "bob")[1]["grants"] == []
    assert [g["status"] for g in proxy.api("GET", "/grants", "bob")[1]["grants"]] == ["expired"]

    hooks = _wait_for(lambda: [e for e in receiver.events if e["event"] == "request.ended"])
    [hook] = hooks
    assert hook["actor"] == "system" and hook["request"]["id"] == grant_id
    assert hook["request"]["status"] == "expired" and hook["data"] == {"approved_until": ends_at}
    assert [e["event"] for e in receiver.events] == ["request.approved", "request.ended"]  # the filter
    assert receiver.bad_signatures == 0

    time.sleep(1)  # more sweeps: still ended once
    assert len(ended_records()) == 1 and len(receiver.events) == 2
    assert _held(proxy.psql("UPDATE accounts SET balance = 462 WHERE id = 46"))  # reviewed again
    assert _balance(pg, 46) == "461"
