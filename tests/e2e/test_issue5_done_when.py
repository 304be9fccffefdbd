"""Issue 5's "Done when", end to end: a DBA approves a one-hour window from Slack and
alice's psql session writes without further prompts until the window ends, with every
step in the audit log, on two replicas sharing a PostgreSQL store.

Everything is real and on 127.0.0.1: PostgreSQL (the app database and the shared
store), two ``pgvouch serve`` processes (A and B) with their delivery workers and
LISTEN/NOTIFY listeners, a fake of Slack's endpoints (incoming webhook and response
URLs) and one long-lived psql of alice's on replica A, driven statement by statement
through pipes. bob's click is signed the way Slack signs it and lands on replica B.
Holds re-read the store only every 30 s, so nothing here is explained by that poll.
An hour cannot be waited out: the second test approves a seconds-long window the
same way and shows alice's next UPDATE, in the same session, held again once it ends.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from approvals.auth import token_hash
from tests.approvals.conftest import pg_dsn
from tests.approvals.fake_slack import SIGNING_SECRET, ThreadedFakeSlack, click, signed_headers
from tests.conftest import PSQL, PgServer, config_yaml, free_port
from tests.e2e.helpers import (
    ALLOW_READS,
    Replica,
    add_user_fields,
    audit_verify,
    balance,
    policy,
    post_slack_interaction,
    proxy_dsn,
    replica_config,
    replica_pair,
    review,
    wait_for,
    write_policies,
)
from tests.e2e.test_replicas import TOKENS

POLICY = policy(ALLOW_READS, review(name="writes", jit="4h"))
SLACK_IDS = {"alice": "U0ALICE", "bob": "U0BOB"}
POLL_INTERVAL = 30  # seconds: a hold's own re-read of the store, far above anything allowed here
WAIT_TIMEOUT = 4  # seconds a held statement waits before PV002 (so a wrong hold cannot hang the test)
PROMPT = 3.0  # seconds an UPDATE under a grant may take at most (well under both of the above)
_wait_for = partial(wait_for, timeout=20, step=0.05)


@dataclass
class Answer:
    out: list[str]  # psql's stdout lines for the statement
    err: list[str]  # its stderr lines: NOTICEs and errors
    seconds: float


class PsqlSession:
    """One open psql of alice's: each statement is followed by markers on stdout and stderr."""

    def __init__(self, replica: Replica) -> None:
        self.proc = subprocess.Popen([PSQL, "-X", "-At", "-v", "VERBOSITY=verbose", "-d",
                                      proxy_dsn(replica.port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: dict[str, list[str]] = {"out": [], "err": []}
        self._arrived = threading.Condition()
        self._count = 0
        for name, stream in (("out", self.proc.stdout), ("err", self.proc.stderr)):
            threading.Thread(target=self._read, args=(name, stream), daemon=True).start()

    def _read(self, name: str, stream: Any) -> None:
        for line in stream:
            with self._arrived:
                self.lines[name].append(line.rstrip("\n"))
                self._arrived.notify_all()
        with self._arrived:
            self.lines[name].append("<closed>")
            self._arrived.notify_all()

    def run(self, sql: str, timeout: float = 30) -> Answer:
        assert self.proc.stdin is not None and self.proc.poll() is None, self.lines
        self._count += 1
        marker = f"--- statement {self._count} done ---"
        with self._arrived:
            start = {name: len(lines) for name, lines in self.lines.items()}
        began = time.monotonic()
        self.proc.stdin.write(f"{sql.rstrip().rstrip(';')};\n\\echo {marker}\n\\warn {marker}\n")
        self.proc.stdin.flush()

        def done() -> bool:
            return all(marker in lines[start[name]:] or "<closed>" in lines[start[name]:]
                       for name, lines in self.lines.items())

        with self._arrived:
            finished = self._arrived.wait_for(done, timeout)
            seconds = time.monotonic() - began
            answer = {name: lines[start[name]:] for name, lines in self.lines.items()}
        assert finished, f"no answer to {sql!r} within {timeout}s: {answer}"
        assert "<closed>" not in answer["out"] + answer["err"], f"psql ended during {sql!r}: {answer}"
        return Answer([line for line in answer["out"] if line != marker],
                      [line for line in answer["err"] if line != marker], seconds)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class Cluster:
    def __init__(self, a: Replica, b: Replica, slack: ThreadedFakeSlack, env: dict[str, str]) -> None:
        self.a, self.b, self.fake, self.env = a, b, slack, env

    def slack_messages(self, request_id: str, headline: str) -> list[dict[str, Any]]:
        return [m for m in list(self.fake.slack.messages)
                if m["text"].startswith(f"{request_id}: ") and m["text"].endswith(headline)]

    def press(self, replica: Replica, action: str, request_id: str, slack_user: str
              ) -> tuple[int, str]:
        """``slack_user`` presses a button of the message about ``request_id``; Slack posts to ``replica``."""
        url = self.fake.slack.response_url()
        body = click(action, request_id, slack_user, url)
        return post_slack_interaction(replica.api_port, body, signed_headers(body, time.time())), url

    def audit(self) -> list[dict[str, Any]]:
        status, body = self.a.api("GET", "/audit?limit=1000")
        assert status == 200, body
        return list(body["events"])

    def verify_audit(self) -> subprocess.CompletedProcess[str]:
        return audit_verify(self.a.config, self.env)


def _write_config(tmp_path: Path, pg: PgServer, name: str) -> tuple[Path, int, int]:
    port, api_port = free_port(), free_port()
    extra = (
        f"policies: {tmp_path / 'policies'}\n"
        "store_env: PGV_TEST_STORE\n"
        f"hold: {{wait_timeout: {WAIT_TIMEOUT}s, heartbeat: 60s, poll_interval: {POLL_INTERVAL}s, "
        "sweep_interval: 1s}\n"
        "preview: {enabled: false}\n"
        "limits: {drain_timeout: 1s}\n"
        "notify:\n"
        "  slack: {webhook_url_env: PGV_TEST_SLACK_URL, signing_secret_env: PGV_TEST_SLACK_SECRET,\n"
        "          channel: '#dba', response_url_hosts: [127.0.0.1]}\n"
    )
    text = add_user_fields(config_yaml(pg, port=port, api_port=api_port, extra=extra), {
        user: [f"api_token_sha256: {token_hash(token)}", f"slack_id: {SLACK_IDS[user]}"]
        for user, token in TOKENS.items()})
    return replica_config(tmp_path, name, text, port, api_port)


@pytest.fixture
def cluster(pg: PgServer, tmp_path: Path) -> Iterator[Cluster]:
    write_policies(tmp_path / "policies", POLICY)
    schema = f"pgvouch_d{uuid.uuid4().hex[:12]}"
    fake = ThreadedFakeSlack()
    env = dict(os.environ, PGV_TEST_STORE=f"{pg_dsn(pg)}?schema={schema}",
               PGV_TEST_SLACK_URL=fake.slack.webhook_url, PGV_TEST_SLACK_SECRET=SIGNING_SECRET)
    with replica_pair(pg, schema, lambda name: _write_config(tmp_path, pg, name), env,
                      TOKENS) as (a, b):
        yield Cluster(a, b, fake, env)


@pytest.fixture
def session(cluster: Cluster) -> Iterator[PsqlSession]:
    opened = PsqlSession(cluster.a)
    try:
        yield opened
    finally:
        opened.close()


_balance = balance


def _request_grant(cluster: Cluster, session: PsqlSession, duration: str, reason: str) -> str:
    """alice asks from her psql on A; the grant's one 'created' Slack message has the buttons."""
    answer = session.run(f"SELECT pgvouch.request_access('write', '{duration}', '{reason}')")
    assert len(answer.out) == 1, answer
    grant_id, status, progress, _ = answer.out[0].split("|", 3)
    assert status == "pending" and grant_id in progress, answer
    [created] = _wait_for(lambda: cluster.slack_messages(grant_id, "needs approval"), timeout=20)
    buttons = {e["action_id"]: e["value"] for b in created["blocks"] if b["type"] == "actions"
               for e in b["elements"]}
    assert buttons == {"pgvouch_approve": grant_id, "pgvouch_deny": grant_id}
    assert f"*Reason:* {reason}" in _text(created) and "may approve: bob" in _text(created)
    return grant_id


def _text(message: dict[str, Any]) -> str:
    """Every mrkdwn text of a Block Kit message, one per line."""
    texts: list[str] = []
    for block in message["blocks"]:
        parts = [block.get("text") or {}, *block.get("fields", ()), *block.get("elements", ())]
        texts += [part["text"] for part in parts if isinstance(part.get("text"), str)]
    return "\n".join(texts)


def _approve_from_slack(cluster: Cluster, grant_id: str) -> dict[str, Any]:
    """bob presses Approve; Slack posts the click to replica B; the message is replaced."""
    status, url = cluster.press(cluster.b, "pgvouch_approve", grant_id, SLACK_IDS["bob"])
    assert status == 200
    [answer] = cluster.fake.slack.wait_answers_sync(url, timeout=20)
    shown = _text(answer)
    assert answer["replace_original"] is True and "bob approved via Slack" in shown, answer
    assert "*Status:*\napproved" in shown and "Step 1/1 *DBA review*: 1/1 approvals (by bob)" in shown
    assert "Open until " in shown, answer
    assert not any(b["type"] == "actions" for b in answer["blocks"])  # final: no more buttons
    status, grant = cluster.a.api("GET", f"/requests/{grant_id}", user="alice")
    assert status == 200 and grant["status"] == "approved", grant
    return dict(grant)


def _held(answer: Answer) -> bool:
    err = "\n".join(answer.err)
    return "held for approval as request" in err and "PV002" in err


def test_a_one_hour_window_approved_from_slack_lets_alices_session_write(
    cluster: Cluster, session: PsqlSession, pg: PgServer
) -> None:
    pg.psql("UPDATE accounts SET balance = 500 WHERE id = 51")
    grant_id = _request_grant(cluster, session, "1h", "incident 4711")
    time.sleep(2.5)  # both delivery workers poll every second: a second 'created' post would be here
    assert len(cluster.slack_messages(grant_id, "needs approval")) == 1

    grant = _approve_from_slack(cluster, grant_id)
    assert grant["kind"] == "grant" and grant["requester"] == "alice"
    assert grant["subject"]["kinds"] == ["write"] and grant["subject"]["duration"] == 3600
    assert grant["approved_until"] - grant["decided_at"] == pytest.approx(3600, abs=0.01)
    assert grant["approved_until"] > time.time() + 3500  # the clock started at the approval
    _wait_for(lambda: cluster.slack_messages(grant_id, "was approved"), timeout=20)

    # the same psql session on A: no prompt, no hold, the rows change in PostgreSQL
    updates = 4
    for n in range(1, updates + 1):
        answer = session.run("UPDATE accounts SET balance = balance + 1 WHERE id = 51")
        assert answer.out == ["UPDATE 1"], answer
        assert not any("held" in line or "NOTICE" in line for line in answer.err), answer
        assert answer.seconds < PROMPT, answer
        assert _balance(pg, 51) == str(500 + n)
    assert session.run("SELECT balance FROM accounts WHERE id = 51").out == [str(500 + updates)]

    # every step in the shared audit log (read through A), in order
    events = [e for e in cluster.audit() if e["request_id"] == grant_id]
    steps = [(e["type"], e["actor"]) for e in events]
    assert steps == [("request.created", "alice"), ("request.voted", "bob"),
                     ("request.step_completed", "bob"), ("request.approved", "bob"),
                     *[("statement.allowed", "alice")] * updates], steps
    created, voted, _, approved = (e["data"] for e in events[:4])
    assert created["subject_kind"] == "grant" and created["subject"]["reason"] == "incident 4711"
    assert created["event"]["eligible"] == ["bob", "carol"], created
    assert voted["event"].get("via") == "slack" and voted["event"]["decision"] == "approve", voted
    assert approved["event"]["approved_until"] == grant["approved_until"], approved
    under_grant = [e["data"] for e in events[4:]]
    assert all(d["grant"] == grant_id and d["reason"] == f"covered by grant {grant_id}"
               and d["statements"] == ["UPDATE accounts SET balance = balance + 1 WHERE id = 51;"]
               for d in under_grant), under_grant
    assert len({d["session"] for d in under_grant}) == 1  # all from alice's one session
    status, pending = cluster.b.api("GET", "/requests?status=pending")
    assert status == 200 and pending["requests"] == []  # no statement was ever put up for review
    # each Slack message was sent once, by one of the two delivery workers
    time.sleep(1.5)
    assert len(cluster.slack_messages(grant_id, "needs approval")) == 1
    assert len(cluster.slack_messages(grant_id, "was approved")) == 1
    status, queue = cluster.b.api("GET", "/deliveries?limit=100")
    assert status == 200, queue
    sent = sorted((d["event"], d["status"], d["attempts"]) for d in queue["deliveries"]
                  if d["channel"] == "slack" and d["request_id"] == grant_id)
    assert sent == [("request.approved", "delivered", 1), ("request.created", "delivered", 1)], sent
    assert all(d["target"] == "#dba" for d in queue["deliveries"])  # never the webhook URL (a secret)
    verified = cluster.verify_audit()
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_when_the_window_ends_the_same_session_is_held_again(
    cluster: Cluster, session: PsqlSession, pg: PgServer
) -> None:
    pg.psql("UPDATE accounts SET balance = 520 WHERE id = 52")
    grant_id = _request_grant(cluster, session, "6s", "quick fix")
    grant = _approve_from_slack(cluster, grant_id)
    assert grant["approved_until"] - grant["decided_at"] == pytest.approx(6, abs=0.01)

    answer = session.run("UPDATE accounts SET balance = 521 WHERE id = 52")
    assert answer.out == ["UPDATE 1"] and not any("held" in line for line in answer.err), answer
    assert time.time() < grant["approved_until"]  # it ran inside the window
    assert _balance(pg, 52) == "521"
    assert [g["id"] for g in cluster.b.api("GET", "/grants?active=true")[1]["grants"]] == [grant_id]

    time.sleep(max(0.0, grant["approved_until"] - time.time()) + 0.5)  # the window ends
    assert cluster.b.api("GET", "/grants?active=true")[1]["grants"] == []
    answer = session.run("UPDATE accounts SET balance = 522 WHERE id = 52")
    assert _held(answer), answer
    assert answer.seconds >= WAIT_TIMEOUT - 0.5  # it waited for a review that did not come
    assert _balance(pg, 52) == "521"
    status, pending = cluster.b.api("GET", "/requests?status=pending")
    assert status == 200
    [held] = pending["requests"]
    assert held["kind"] == "statement" and held["requester"] == "alice"
    assert held["subject"]["sql"] == "UPDATE accounts SET balance = 522 WHERE id = 52;"
    assert f"held for approval as request {held['id']}" in "\n".join(answer.err)
    assert session.run("SELECT 'still open'").out == ["still open"]  # the session itself lives on

    steps = [(e["type"], e["request_id"]) for e in cluster.audit()
             if e["type"] in ("request.approved", "statement.allowed", "request.created")]
    assert steps == [("request.created", grant_id), ("request.approved", grant_id),
                     ("statement.allowed", grant_id),  # the UPDATE in the window, under the grant
                     ("request.created", held["id"])], steps  # the one after it: reviewed again
    verified = cluster.verify_audit()
    assert verified.returncode == 0, verified.stdout + verified.stderr
