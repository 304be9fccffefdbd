"""Configuration loading: the schema, defaults, and ``file:line`` errors."""

from __future__ import annotations

import logging
import math
import textwrap
from pathlib import Path

import pytest

from config.settings import Settings, load_settings, settings_from_node
from config.yamlnodes import ConfigError, load_text, parse_duration
from proxy import scram

VERIFIER = scram.make_verifier("alice-pw", iterations=16).encode()

FULL = textwrap.dedent(f"""\
    listen: {{host: 0.0.0.0, port: 6433}}
    api: {{host: 127.0.0.2, port: 8433}}
    tls: {{cert_file: server.crt, key_file: server.key}}
    client_auth: scram
    log: {{format: json, level: DEBUG}}
    limits:
      max_client_connections: 50
      auth_timeout: 10s
      drain_timeout: 1m
      max_message_size: 1048576
    resources:
      - name: prod-db
        host: db.internal
        port: 5433
        database: app
        sslmode: verify-full
        ca_file: /etc/ca.pem
        connect_timeout: 1h30m
        default_account: readonly
        accounts:
          - name: readonly
            user: app_ro
            password_env: PROD_RO_PASSWORD
          - name: app-admin
            user: app_admin
            password_file: /run/secrets/prod_admin
            allow: ["group:dba", "alice"]
      - name: dev
        host: 127.0.0.1
        database: dev
        accounts:
          - name: dev
            user: dev
    users:
      - name: alice
        groups: [developers]
        password_verifier: "{VERIFIER}"
      - name: bob
        groups: [dba]
        api_token_sha256: {"ab" * 32}
""")

MINIMAL = textwrap.dedent("""\
    resources:
      - name: app
        host: 127.0.0.1
        database: app
        accounts:
          - name: ro
            user: app_ro
""")


def load(text: str, name: str = "pgvouch.yaml") -> Settings:
    return settings_from_node(load_text(text, name))


def line_of(text: str, marker: str, nth: int = 1) -> int:
    """1-based line number of the ``nth`` line containing ``marker``."""
    hits = [i + 1 for i, line in enumerate(text.splitlines()) if marker in line]
    return hits[nth - 1]


def error(text: str, name: str = "pgvouch.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        load(text, name)
    return str(info.value)


def edit(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


# --------------------------------------------------------------------------
# valid configurations
# --------------------------------------------------------------------------
def test_full_config_loads() -> None:
    s = load(FULL)
    assert (s.listen.host, s.listen.port) == ("0.0.0.0", 6433)
    assert (s.api.host, s.api.port, s.api.enabled) == ("127.0.0.2", 8433, True)
    assert s.tls is not None and s.tls.cert_file == "server.crt" and s.tls.key_file == "server.key"
    assert s.client_auth == "scram"
    assert (s.log_format, s.log_level) == ("json", "DEBUG")
    assert s.limits.max_client_connections == 50
    assert (s.limits.auth_timeout, s.limits.drain_timeout) == (10.0, 60.0)
    assert s.limits.max_message_size == 1048576
    prod = s.resources["prod-db"]
    assert (prod.host, prod.port, prod.database) == ("db.internal", 5433, "app")
    assert (prod.sslmode, prod.ca_file, prod.connect_timeout) == ("verify-full", "/etc/ca.pem", 5400)
    assert prod.default_account == "readonly"
    assert list(prod.accounts) == ["readonly", "app-admin"]
    admin = prod.accounts["app-admin"]
    assert admin.allow == ("group:dba", "alice")
    assert admin.password_file == "/run/secrets/prod_admin" and admin.password_env is None
    assert prod.accounts["readonly"].allow is None
    assert s.users["alice"].password_verifier == VERIFIER
    assert s.users["bob"].api_token_sha256 == "ab" * 32
    assert s.groups_of("bob") == ("dba",) and s.groups_of("nobody") == ()


def test_defaults() -> None:
    s = load(MINIMAL)
    assert (s.listen.host, s.listen.port) == ("127.0.0.1", 6432)
    assert (s.api.host, s.api.port, s.api.enabled) == ("127.0.0.1", 8432, True)
    assert s.tls is None and s.client_auth == "scram" and s.users == {}
    app = s.resources["app"]
    assert (app.port, app.sslmode, app.ca_file, app.connect_timeout) == (5432, "disable", None, 10)
    assert app.default_account == "ro"  # the first account
    assert s.limits.max_message_size == 64 * 1024 * 1024


def test_load_settings_from_file(tmp_path: Path) -> None:
    path = tmp_path / "pgvouch.yaml"
    path.write_text(MINIMAL + "policies: policies\n")
    s = load_settings(path)
    assert s.source == str(path)
    assert s.policies == str((tmp_path / "policies").resolve())


def test_trust_warns(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(MINIMAL + "client_auth: trust\n")
    with caplog.at_level(logging.WARNING, logger="pgvouch.config"):
        assert load_settings(path).client_auth == "trust"
    assert "trust" in caplog.text and "WITHOUT a password" in caplog.text


def test_api_can_be_disabled() -> None:
    assert load(MINIMAL + "api: false\n").api.enabled is False


def test_null_sections_mean_defaults() -> None:
    s = load(MINIMAL + "listen:\ntls:\nusers:\nlimits:\n")
    assert s.listen.port == 6432 and s.tls is None and s.users == {}


def test_account_password_from_env_and_file(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "secret"
    secret.write_text("file-pw\n")
    text = edit(MINIMAL, "user: app_ro", "user: app_ro\n        password_env: PGV_TEST_PW")
    text += f"      - name: f\n        user: f\n        password_file: {secret}\n"
    s = load(text)
    ro, f = s.resources["app"].accounts["ro"], s.resources["app"].accounts["f"]
    monkeypatch.setenv("PGV_TEST_PW", "env-pw")
    assert ro.password() == "env-pw"
    assert f.password() == "file-pw"
    monkeypatch.delenv("PGV_TEST_PW")
    with pytest.raises(ConfigError, match="PGV_TEST_PW"):
        ro.password()
    secret.unlink()
    with pytest.raises(ConfigError, match="password_file"):
        f.password()
    assert "env-pw" not in repr(s) and "file-pw" not in repr(s)


def test_verifier_not_in_repr() -> None:
    assert VERIFIER not in repr(load(FULL))


# --------------------------------------------------------------------------
# unknown keys, with the right line
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("old", "new", "marker"),
    [
        ("client_auth: scram", "client_auth: scram\nbogus_top: 1", "bogus_top"),
        ("listen: {host: 0.0.0.0, port: 6433}", "listen: {host: 0.0.0.0, prot: 6433}", "prot"),
        ("  auth_timeout: 10s", "  auth_timeout: 10s\n  idle_timeout: 5s", "idle_timeout"),
        ("    port: 5433", "    port: 5433\n    hots: x", "hots"),
        ("        password_env: PROD_RO_PASSWORD",
         "        password_env: PROD_RO_PASSWORD\n        pasword: hunter2", "pasword"),
        ("    groups: [dba]", "    groups: [dba]\n    group: [x]", "group: [x]"),
        ("log: {format: json, level: DEBUG}", "log: {format: json, lvl: DEBUG}", "lvl"),
    ],
)
def test_unknown_key_reports_file_and_line(old: str, new: str, marker: str) -> None:
    text = edit(FULL, old, new)
    message = error(text, "/etc/pgvouch/pgvouch.yaml")
    assert message.startswith(f"/etc/pgvouch/pgvouch.yaml:{line_of(text, marker)}: ")
    assert "unknown key" in message


def test_unknown_key_lists_the_expected_ones() -> None:
    text = edit(MINIMAL, "    host: 127.0.0.1", "    host: 127.0.0.1\n    sslmod: require")
    message = error(text)
    assert "'sslmod'" in message and "sslmode" in message


def test_duplicate_mapping_key() -> None:
    text = edit(MINIMAL, "    host: 127.0.0.1", "    host: 127.0.0.1\n    host: 127.0.0.2")
    assert error(text).startswith(f"pgvouch.yaml:{line_of(text, 'host', 2)}: duplicate key")


# --------------------------------------------------------------------------
# semantic errors
# --------------------------------------------------------------------------
def test_duplicate_resource() -> None:
    text = FULL.replace("  - name: dev\n", "  - name: prod-db\n")
    message = error(text)
    assert message.startswith(f"pgvouch.yaml:{line_of(text, '- name: prod-db', 2)}: ")
    assert "duplicate resource 'prod-db'" in message


def test_duplicate_account() -> None:
    text = FULL.replace("- name: app-admin", "- name: readonly")
    message = error(text)
    assert message.startswith(f"pgvouch.yaml:{line_of(text, '- name: readonly', 2)}: ")
    assert "duplicate account" in message


def test_duplicate_user() -> None:
    text = FULL.replace("- name: bob", "- name: alice")
    assert error(text).startswith(f"pgvouch.yaml:{line_of(text, '- name: alice', 2)}: duplicate")


def test_default_account_missing() -> None:
    text = FULL.replace("default_account: readonly", "default_account: readwrite")
    message = error(text)
    assert message.startswith(f"pgvouch.yaml:{line_of(text, 'default_account')}: ")
    assert "readwrite" in message


def test_resource_without_accounts() -> None:
    text = MINIMAL.split("    accounts:")[0] + "    accounts: []\n"
    assert error(text).startswith(f"pgvouch.yaml:{line_of(text, 'accounts')}: ")


def test_no_resources() -> None:
    assert "resources" in error("listen: {port: 1}\n")
    assert error("resources: []\n").startswith("pgvouch.yaml:1: ")


@pytest.mark.parametrize("key", ["name", "host", "database", "accounts"])
def test_missing_required_resource_key(key: str) -> None:
    fields = {"name": "app", "host": "127.0.0.1", "database": "app", "port": "5432"}
    fields.pop(key, None)
    body = "".join(f"    {k}: {v}\n" for k, v in fields.items())
    if key != "accounts":
        body += "    accounts:\n      - {name: ro, user: app_ro}\n"
    text = "resources:\n  -\n" + body
    message = error(text)
    assert f"missing required key '{key}'" in message
    assert message.startswith(f"pgvouch.yaml:{line_of(text, '    ')}: ")


def test_resource_name_with_slash() -> None:
    text = edit(MINIMAL, "- name: app", "- name: app/x")
    assert error(text).startswith(f"pgvouch.yaml:{line_of(text, 'app/x')}: ")


def test_sslmode_verify_full_needs_ca_file() -> None:
    text = FULL.replace("    ca_file: /etc/ca.pem\n", "")
    message = error(text)
    assert message.startswith(f"pgvouch.yaml:{line_of(text, '- name: prod-db')}: ")
    assert "ca_file" in message


def test_bad_sslmode() -> None:
    text = FULL.replace("sslmode: verify-full", "sslmode: prefer")
    message = error(text)
    assert message.startswith(f"pgvouch.yaml:{line_of(text, 'sslmode')}: ")
    assert "disable, require, verify-full" in message


def test_password_env_and_file_together() -> None:
    text = edit(FULL, "password_file: /run/secrets/prod_admin",
                "password_file: /run/secrets/prod_admin\n        password_env: X")
    message = error(text)
    assert message.startswith(f"pgvouch.yaml:{line_of(text, '- name: app-admin')}: ")


@pytest.mark.parametrize(
    ("old", "new", "marker"),
    [
        ("client_auth: scram", "client_auth: md5", "client_auth"),
        ("    port: 5433", "    port: 70000", "port: 70000"),
        ("    port: 5433", "    port: 0", "port: 0"),
        ("    port: 5433", '    port: "5433"', "port: \"5433\""),
        ("    port: 5433", "    port: true", "port: true"),
        ("  max_client_connections: 50", "  max_client_connections: 0", "max_client"),
        ("  max_message_size: 1048576", "  max_message_size: 10", "max_message_size"),
        ("    groups: [dba]", "    groups: dba", "groups: dba"),
        ("allow: [\"group:dba\", \"alice\"]", "allow: [[x]]", "allow"),
        ("    host: db.internal", "    host: ''", "host: ''"),
        (f"api_token_sha256: {'ab' * 32}", "api_token_sha256: ABC", "api_token"),
        ("log: {format: json, level: DEBUG}", "log: {format: xml}", "log:"),
    ],
)
def test_bad_values_report_their_line(old: str, new: str, marker: str) -> None:
    text = edit(FULL, old, new)
    assert error(text).startswith(f"pgvouch.yaml:{line_of(text, marker)}: ")


@pytest.mark.parametrize("value", ["05432", "1:30"])
def test_yaml_integer_spellings_python_rejects_are_config_errors(value: str) -> None:
    # YAML 1.1 resolves these as integers (octal, sexagesimal), Python's int(x, 0)
    # does not accept them: that must still be a ConfigError with the line.
    text = edit(FULL, "    port: 5433", f"    port: {value}")
    assert error(text).startswith(f"pgvouch.yaml:{line_of(text, f'port: {value}')}: ")


@pytest.mark.parametrize(
    "verifier",
    [
        "md5c5e2e4b6e2d4d8d5d9b0a7d1c1e0f1a2",
        "plaintext-password",
    ],
)
def test_non_scram_verifier(verifier: str) -> None:
    text = FULL.replace(VERIFIER, verifier)
    message = error(text)
    assert message.startswith(f"pgvouch.yaml:{line_of(text, 'password_verifier')}: ")
    assert "pgvouch user hash" in message


@pytest.mark.parametrize(
    "verifier",
    [
        "SCRAM-SHA-256$garbage",
        "SCRAM-SHA-256$4096:c2FsdA==$short:short",
    ],
)
def test_malformed_scram_verifier_is_refused_at_load(verifier: str) -> None:
    # The proxy can never log anyone in with these (parse_verifier refuses them
    # and the user silently gets the mock exchange), so `pgvouch config check`
    # has to say so, with the line.
    with pytest.raises(scram.ScramError):
        scram.parse_verifier(verifier)
    text = FULL.replace(VERIFIER, verifier)
    assert error(text).startswith(f"pgvouch.yaml:{line_of(text, 'password_verifier')}: ")


# --------------------------------------------------------------------------
# YAML itself
# --------------------------------------------------------------------------
def test_yaml_syntax_error_has_a_line() -> None:
    text = MINIMAL + "  - name: [unclosed\n"
    message = error(text)
    assert message.startswith("pgvouch.yaml:")
    assert "invalid YAML" in message


def test_empty_file() -> None:
    assert error("") == "pgvouch.yaml:1: the file is empty"
    assert error("# only a comment\n") == "pgvouch.yaml:1: the file is empty"


def test_not_a_mapping() -> None:
    assert error("- a\n- b\n").startswith("pgvouch.yaml:1: expected a mapping")


def test_two_documents_are_refused() -> None:
    assert error(MINIMAL + "---\n" + MINIMAL).startswith("pgvouch.yaml:")


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=f"^{missing}: cannot read"):
        load_settings(missing)


# --------------------------------------------------------------------------
# durations
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 30.0), ("1.5", 1.5), ("0", 0.0), ("30s", 30.0), ("10m", 600.0), ("8h", 28800.0),
        ("2d", 172800.0), ("1h30m", 5400.0), ("250ms", 0.25), ("1m30s", 90.0),
        (" 5s ", 5.0), ("0.5s", 0.5), ("1d2h3m4s5ms", 93784.005),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "  ", "-1", "-5s", "5 s", "1h 30m", "5x", "s", "5ss", "1.s", "h1", "5sm!"],
)
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("text", ["nan", "inf"])
def test_parse_duration_refuses_non_finite(text: str) -> None:
    # float() accepts these; a timeout of NaN or forever is a typo, not a setting
    try:
        seconds = parse_duration(text)
    except ValueError:
        return
    assert math.isfinite(seconds), f"{text!r} parsed as {seconds}"


def test_duration_in_config() -> None:
    text = edit(FULL, "connect_timeout: 1h30m", "connect_timeout: 90")
    assert load(text).resources["prod-db"].connect_timeout == 90.0
    text = edit(FULL, "connect_timeout: 1h30m", "connect_timeout: soon")
    message = error(text)
    assert message.startswith(f"pgvouch.yaml:{line_of(text, 'connect_timeout')}: ")
    assert "invalid duration" in message
    text = edit(FULL, "  auth_timeout: 10s", "  auth_timeout: [10s]")
    assert error(text).startswith(f"pgvouch.yaml:{line_of(text, 'auth_timeout')}: ")
