"""Slack and email through the real `pgvouch serve`: alice's psql is held, the DBAs
get a Slack message and a mail, bob presses Approve in (a local fake of) Slack,
the statement runs, and alice is mailed that it was approved.

Everything is real and on 127.0.0.1: PostgreSQL, the proxy process with its
delivery worker, a fake Slack (incoming webhook and response URLs) and an
aiosmtpd SMTP server that captures the mail. The click is signed with the
signing secret exactly as Slack signs it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.approvals.fake_slack import SIGNING_SECRET, ThreadedFakeSlack, click, signed_headers
from tests.approvals.test_email import Inbox, smtp_server
from tests.conftest import PASSWORDS, config_yaml, free_port
from tests.e2e.helpers import (
    ALLOW_READS,
    add_user_fields,
    policy,
    post_slack_interaction,
    psql_popen,
    review,
    serve_extra,
    serving,
    write_policies,
)
from tests.e2e.helpers import wait_for as _wait_for

POLICY = policy(ALLOW_READS, review(), name="prod-writes")
SLACK_IDS = {"alice": "U0ALICE", "bob": "U0BOB", "carol": "U0CAROL"}


@pytest.fixture
def served(pg: Any, tmp_path: Path) -> Iterator[tuple[int, int, ThreadedFakeSlack, Inbox]]:
    policies = write_policies(tmp_path / "policies", POLICY)
    fake = ThreadedFakeSlack()
    smtp_port = free_port()
    with smtp_server(smtp_port) as inbox:
        port, api_port = free_port(), free_port()
        extra = (
            serve_extra(policies, f"sqlite:///{tmp_path}/approvals.db", "wait_timeout: 30s, heartbeat: 2s")
            + "notify:\n"
            "  slack: {webhook_url_env: PGV_TEST_SLACK_URL, signing_secret_env: PGV_TEST_SLACK_SECRET,\n"
            "          channel: '#dba', response_url_hosts: [127.0.0.1]}\n"
            f"  email: {{smtp_host: 127.0.0.1, smtp_port: {smtp_port}, starttls: false,\n"
            "          from: pgvouch@example.com}\n"
        )
        text = config_yaml(pg, port=port, api_port=api_port, extra=extra)
        text = text.replace(f"api: {{host: 127.0.0.1, port: {api_port}}}",
                            f"api: {{host: 127.0.0.1, port: {api_port}, "
                            "public_url: 'https://pgvouch.example.com'}")
        text = add_user_fields(text, {
            user: [f"email: {user}@example.com",
                   *([f"slack_id: {SLACK_IDS[user]}"] if user in SLACK_IDS else [])]
            for user in PASSWORDS})
        cfg = tmp_path / "pgvouch.yaml"
        cfg.write_text(text)
        env = dict(os.environ, PGV_TEST_SLACK_URL=fake.slack.webhook_url,
                   PGV_TEST_SLACK_SECRET=SIGNING_SECRET)
        with serving(cfg, (port,), env=env):
            yield port, api_port, fake, inbox


_press = post_slack_interaction


def test_a_slack_approval_releases_the_held_psql_statement(served: Any, pg: Any) -> None:
    port, api_port, fake, inbox = served
    pg.psql("UPDATE accounts SET balance = 40 WHERE id = 94")
    psql = psql_popen(port, "UPDATE accounts SET balance = 0 WHERE id = 94")
    try:
        message = _wait_for(lambda: fake.slack.messages)[0]
        buttons = {e["action_id"]: e["value"] for b in message["blocks"] if b["type"] == "actions"
                   for e in b["elements"]}
        request_id = buttons["pgvouch_approve"]
        assert "UPDATE accounts SET balance = 0 WHERE id = 94" in json.dumps(message["blocks"])
        # the DBAs were mailed (never alice), with a link to the Activity Queue
        _wait_for(lambda: len(inbox.mails) >= 2)
        assert inbox.recipients() == ["bob@example.com", "carol@example.com"]
        mail = inbox.to("bob@example.com")[0]
        assert f"https://pgvouch.example.com/requests/{request_id}" in mail.get_body(("plain",)).get_content()

        # alice presses Approve on her own request: four-eyes, nothing happens
        own = fake.slack.response_url()
        body = click("pgvouch_approve", request_id, "U0ALICE", own)
        assert _press(api_port, body, signed_headers(body, time.time())) == 200
        assert "four-eyes" in fake.slack.wait_answers_sync(own)[0]["text"]
        assert pg.psql("SELECT balance FROM accounts WHERE id = 94").strip() == "40"
        # a forged click is refused
        forged = click("pgvouch_approve", request_id, "U0BOB", fake.slack.response_url())
        assert _press(api_port, forged, signed_headers(forged, time.time(), "not-the-secret")) == 401

        # bob approves from Slack: the held statement runs
        url = fake.slack.response_url()
        body = click("pgvouch_approve", request_id, "U0BOB", url)
        assert _press(api_port, body, signed_headers(body, time.time())) == 200
        _, err = psql.communicate(timeout=30)
        assert f"held for approval as request {request_id}" in err
        assert pg.psql("SELECT balance FROM accounts WHERE id = 94").strip() == "0"
        [answer] = fake.slack.wait_answers_sync(url)
        assert answer["replace_original"] is True and "bob approved via Slack" in json.dumps(answer)
        # alice hears it by mail; the channel gets the approved message
        _wait_for(lambda: inbox.to("alice@example.com"))
        assert "approved" in str(inbox.to("alice@example.com")[0]["Subject"])
        _wait_for(lambda: any("was approved" in m["text"] for m in fake.slack.messages))
    finally:
        if psql.poll() is None:
            psql.kill()
