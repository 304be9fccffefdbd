"""``notify.slack``, ``notify.email``, ``api.public_url`` and ``users[].email`` / ``slack_id``."""

from __future__ import annotations

import textwrap

import pytest

from config.settings import Settings, settings_from_node
from config.yamlnodes import ConfigError, load_text

BASE = textwrap.dedent("""\
    resources:
      - {name: db, host: h, database: d, accounts: [{name: app, user: app}]}
    """)


def load(extra: str) -> Settings:
    return settings_from_node(load_text(BASE + textwrap.dedent(extra), "pgvouch.yaml"))


def test_slack_email_and_links_are_read() -> None:
    settings = load("""\
        api: {host: 0.0.0.0, port: 8433, public_url: "https://pgvouch.example.com/"}
        users:
          - {name: bob, email: bob@example.com, slack_id: U0BOB}
          - {name: frank, roles: [owner]}
        notify:
          slack: {webhook_url_env: SLACK_URL, signing_secret_env: SLACK_SECRET, channel: "#dba"}
          email:
            smtp_host: smtp.example.com
            username_env: SMTP_USER
            password_env: SMTP_PASSWORD
            from: pgvouch@example.com
            announce_to: [group:dba]
        """)
    assert settings.api.base_url() == "https://pgvouch.example.com"
    assert (settings.users["bob"].email, settings.users["bob"].slack_id) == ("bob@example.com", "U0BOB")
    assert settings.slack is not None and settings.slack.response_url_hosts == ("hooks.slack.com",)
    assert settings.slack.channel == "#dba"
    assert settings.email is not None
    assert (settings.email.smtp_port, settings.email.starttls, settings.email.sender) == (
        587, True, "pgvouch@example.com")
    assert settings.email.announce_to == ("group:dba",)
    assert load("api: {port: 9000}\n").api.base_url() == "http://127.0.0.1:9000"
    assert load("").slack is None and load("").email is None


def test_secrets_come_from_the_environment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load("""\
        notify:
          slack: {webhook_url_env: PGV_T_SLACK_URL, signing_secret_env: PGV_T_SLACK_SECRET}
          email: {smtp_host: smtp, from: p@example.com, username_env: PGV_T_U, password_env: PGV_T_P}
        """)
    assert settings.slack is not None and settings.email is not None
    monkeypatch.delenv("PGV_T_SLACK_URL", raising=False)
    with pytest.raises(ConfigError, match="PGV_T_SLACK_URL is not set"):
        settings.slack.webhook_url()
    monkeypatch.setenv("PGV_T_SLACK_URL", "https://hooks.slack.com/services/T/B/sekrit")
    monkeypatch.setenv("PGV_T_U", "u")
    monkeypatch.setenv("PGV_T_P", "sekrit-pass")
    assert settings.slack.webhook_url().endswith("/sekrit")
    assert settings.email.credentials() == ("u", "sekrit-pass")
    assert "sekrit" not in repr(settings)


def test_clear_text_smtp_login_only_to_this_host() -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        settings = load(f"notify:\n  email: {{smtp_host: '{host}', from: x@y.z, starttls: false, "
                        "username_env: U, password_env: P}\n")
        assert settings.email is not None and not settings.email.starttls
    settings = load("notify:\n  email: {smtp_host: smtp.example.com, from: x@y.z, starttls: false}\n")
    assert settings.email is not None  # no credentials: nothing secret goes in clear


@pytest.mark.parametrize(
    ("extra", "line", "message"),
    [
        ("notify:\n  slack: {webhook_url_env: A, signing_secret_env: B, token: x}\n", 4,
         "unknown key 'token'"),
        ("notify:\n  slack: {webhook_url_env: A}\n", 4, "missing required key 'signing_secret_env'"),
        ("notify:\n  slack: {webhook_url_env: A, signing_secret_env: B, response_url_hosts: []}\n", 4,
         "at least one host"),
        ("notify:\n  email: {smtp_host: h, from: x@y.z, password: p}\n", 4, "unknown key 'password'"),
        ("notify:\n  email: {smtp_host: h, from: x@y.z, username_env: U}\n", 4, "both username_env"),
        ("notify:\n  email: {smtp_host: h, from: nobody}\n", 4, "from must be an address"),
        ("notify:\n  email: {smtp_host: smtp.example.com, from: x@y.z, starttls: false,\n"
         "          username_env: U, password_env: P}\n", 4, "in clear text"),
        ("notify:\n  pager: {}\n", 4, "unknown key 'pager'"),
        ("users:\n  - {name: bob, email: 'bob@example.com\\nBcc: x@y.z'}\n", 4, "not an email address"),
        ("users:\n  - {name: bob, slack_id: bob}\n", 4, "Slack member id"),
        ("users:\n  - {name: bob, slack_id: U0B}\n  - {name: carol, slack_id: U0B}\n", 5,
         "slack_id U0B is already bob's"),
        ("api: {port: 1, public_url: pgvouch.example.com}\n", 3, "public_url must start with http"),
    ],
)
def test_mistakes_are_reported_with_file_and_line(extra: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(extra)
    assert str(caught.value).startswith(f"pgvouch.yaml:{line}: ")
    assert message in str(caught.value)
