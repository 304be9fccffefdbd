"""From startup parameters to (user, resource, account, upstream parameters).

PostgreSQL's own behaviour is the reference: ``pg_split_opts`` splits the
``options`` string on ASCII whitespace with backslash escapes, and every
startup parameter other than user/database/options/replication/_pq_.* is a
setting applied at connection time. A faithful model of both lives below, so
the tests can check what the upstream server will really do with the
parameters pgvouch forwards.
"""

from __future__ import annotations

import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config.settings import Settings, settings_from_node
from config.yamlnodes import load_text
from proxy import sqlstate
from proxy.startup import StartupRefused, Target, may_use, parse_options, resolve, split_options

CONFIG = textwrap.dedent("""\
    resources:
      - name: app
        host: 127.0.0.1
        database: appdb
        default_account: readonly
        accounts:
          - name: readonly
            user: app_ro
          - name: admin
            user: app_admin
            allow: ["group:dba", "alice"]
          - name: nobody
            user: app_none
            allow: []
      - name: other
        host: 127.0.0.1
        database: otherdb
        accounts:
          - name: first
            user: u1
          - name: second
            user: u2
    users:
      - name: alice
        groups: [developers]
      - name: bob
        groups: [dba]
      - name: carol
        groups: [dba, security]
      - name: dave
""")


@pytest.fixture(scope="module")
def cfg() -> Settings:
    return settings_from_node(load_text(CONFIG, "test.yaml"))


def refused(cfg: Settings, params: dict[str, str]) -> StartupRefused:
    with pytest.raises(StartupRefused) as info:
        resolve(cfg, params)
    return info.value


# --------------------------------------------------------------------------
# a model of what PostgreSQL does with the options string
# --------------------------------------------------------------------------
C_SPACE = " \t\n\v\f\r"  # isspace() in the C locale, on bytes


def pg_split_opts(options: str) -> list[str]:
    """src/backend/utils/init/postinit.c: pg_split_opts."""
    words: list[str] = []
    i, n = 0, len(options)
    while i < n:
        while i < n and options[i] in C_SPACE:
            i += 1
        if i >= n:
            break
        word: list[str] = []
        escaped = False
        while i < n:
            ch = options[i]
            if ch in C_SPACE and not escaped:
                break
            if not escaped and ch == "\\":
                escaped = True
            else:
                escaped = False
                word.append(ch)
            i += 1
        words.append("".join(word))
    return words


def pg_settings(options: str) -> list[tuple[str, str]]:
    """The (name, value) pairs a backend applies from ``-c``/``--`` switches, in order."""
    words = pg_split_opts(options)
    applied: list[tuple[str, str]] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c":
            i += 1
            arg = words[i] if i < len(words) else ""
        elif word.startswith(("-c", "--")):
            arg = word[2:]
        else:
            raise ValueError(f"invalid command-line argument {word!r}")
        name, sep, value = arg.partition("=")
        if not sep:
            raise ValueError(f"-c {arg} requires a value")
        applied.append((name.replace("-", "_"), value))
        i += 1
    return applied


def upstream_options(target: Target) -> list[tuple[str, str]]:
    """What the upstream backend makes of the forwarded options (or a test failure)."""
    try:
        return pg_settings(target.upstream_params.get("options", ""))
    except ValueError as exc:
        pytest.fail(f"the upstream server would refuse the forwarded options: {exc}")


def upstream_settings(target: Target) -> dict[str, str]:
    """Every setting the upstream backend will apply at connection time."""
    found = {k.lower(): v for k, v in target.upstream_params.items() if k != "options"}
    found.update((k.lower(), v) for k, v in pg_settings(target.upstream_params.get("options", "")))
    return found


# --------------------------------------------------------------------------
# split_options / parse_options
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "words"),
    [
        ("", []),
        ("   ", []),
        ("-c a=b", ["-c", "a=b"]),
        ("  -c   a=b\t-c\nc=d  ", ["-c", "a=b", "-c", "c=d"]),
        ("-c search_path=a\\ b", ["-c", "search_path=a b"]),
        ("a\\\\b", ["a\\b"]),
        ("a\\\\ b", ["a\\", "b"]),
        ("a\\", ["a"]),
        ("\\", [""]),
        ("\\ ", [" "]),
        ("x\\\ty", ["x\ty"]),
        ("\\a\\b", ["ab"]),
    ],
)
def test_split_options_like_pg_split_opts(options: str, words: list[str]) -> None:
    assert pg_split_opts(options) == words  # the model agrees with the table
    assert split_options(options) == words


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=" \t\n\r\v\f\\ab=-c", max_size=40))
def test_split_options_matches_the_model(options: str) -> None:
    assert split_options(options) == pg_split_opts(options)


@pytest.mark.parametrize("char", ["\x1c", "\x85", "\u00a0"])
def test_split_options_splits_only_on_ascii_whitespace(char: str) -> None:
    # pg_split_opts uses isspace() on bytes: only " \t\n\v\f\r" separate words.
    assert split_options(f"-c application_name=a{char}b") == ["-c", f"application_name=a{char}b"]


def test_parse_options_forms() -> None:
    assert parse_options("-c a=b -cc=d --e-f=g -c H=i=j") == {
        "a": "b", "c": "d", "e_f": "g", "h": "i=j",
    }
    assert parse_options("-c application_name=my\\ app") == {"application_name": "my app"}
    assert parse_options("-c empty=") == {"empty": ""}


@pytest.mark.parametrize(
    ("options", "code"),
    [
        ("-c", sqlstate.PROTOCOL_VIOLATION),
        ("-c novalue", sqlstate.PROTOCOL_VIOLATION),
        ("-c =x", sqlstate.PROTOCOL_VIOLATION),
        ("--novalue", sqlstate.PROTOCOL_VIOLATION),
        ("-d 5", sqlstate.NOT_AUTHORIZED),  # other postgres switches are refused
        ("-B 100", sqlstate.NOT_AUTHORIZED),
        ("stray", sqlstate.NOT_AUTHORIZED),
    ],
)
def test_parse_options_refuses(options: str, code: str) -> None:
    with pytest.raises(StartupRefused) as info:
        parse_options(options)
    assert info.value.code == code


# --------------------------------------------------------------------------
# settings that change who the session is
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        "-c role=admin",
        "-crole=admin",
        "-c ROLE=admin",
        "--role=admin",
        "-c session_authorization=postgres",
        "--session_authorization=postgres",
        "--session-authorization=postgres",
        "-c application_name=x -c role=admin",
    ],
)
def test_role_changes_in_options_are_refused(cfg: Settings, options: str) -> None:
    exc = refused(cfg, {"user": "alice", "database": "app", "options": options})
    assert exc.code == sqlstate.NOT_AUTHORIZED == "28000"
    assert exc.hint and "RESOURCE/ACCOUNT" in exc.hint


def test_read_only_may_be_asked_for_at_login_but_not_turned_off(cfg: Settings) -> None:
    on = resolve(cfg, {"user": "alice", "database": "app", "default_transaction_read_only": "on"})
    assert on.upstream_params["default_transaction_read_only"] == "on"
    for value in ("off", "0", "false"):
        for params in ({"default_transaction_read_only": value},
                       {"options": f"-c default_transaction_read_only={value}"}):
            exc = refused(cfg, {"user": "alice", "database": "app", **params})
            assert exc.code == sqlstate.NOT_AUTHORIZED


@pytest.mark.parametrize("name", ["role", "ROLE", "session_authorization",
                                  "default_transaction_read_only", "transaction_read_only"])
def test_role_changes_as_startup_parameters_are_refused(cfg: Settings, name: str) -> None:
    # Any startup parameter that is not user/database/options/replication is a
    # setting PostgreSQL applies at connection time: role=admin here is the very
    # same hidden SET ROLE as options=-c role=admin.
    exc = refused(cfg, {"user": "alice", "database": "app", name: "admin"})
    assert exc.code == sqlstate.NOT_AUTHORIZED


@pytest.mark.parametrize(
    "options",
    [
        "-c application_name=x\\\t-c\\\trole=admin",
        "-c application_name=x\\\n-c\\\nrole=admin",
        "-c search_path=x\\\f--session_authorization=postgres",
    ],
)
def test_escaped_whitespace_in_a_value_cannot_smuggle_a_setting_upstream(
    cfg: Settings, options: str
) -> None:
    # The client's escaped whitespace keeps the value in one word here; the
    # re-encoded options must keep it in one word upstream too.
    try:
        target = resolve(cfg, {"user": "alice", "database": "app", "options": options})
    except StartupRefused:
        return
    applied = upstream_settings(target)
    assert "role" not in applied and "session_authorization" not in applied


names_strategy = st.sampled_from(["application_name", "search_path", "statement_timeout",
                                  "datestyle", "my.custom"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(names_strategy, st.text(alphabet=" \t\n\r\\ab=-c", max_size=12),
                       max_size=4))
def test_forwarded_options_mean_the_same_upstream(cfg: Settings, values: dict[str, str]) -> None:
    def esc(text: str) -> str:
        return "".join("\\" + ch if ch in C_SPACE + "\\" else ch for ch in text)

    options = " ".join(f"-c {name}={esc(value)}" for name, value in values.items())
    target = resolve(cfg, {"user": "alice", "database": "app", "options": options})
    assert dict(upstream_options(target)) == values


def test_option_names_with_whitespace_are_refused_or_kept_whole(cfg: Settings) -> None:
    try:
        target = resolve(cfg, {"user": "alice", "database": "app",
                               "options": "-c my\\ name=1"})
    except StartupRefused:
        return
    assert upstream_options(target) == [("my name", "1")]


# --------------------------------------------------------------------------
# replication
# --------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["database", "true", "on", "1", "yes", "TRUE", "Database"])
def test_replication_is_refused(cfg: Settings, value: str) -> None:
    exc = refused(cfg, {"user": "alice", "database": "app", "replication": value})
    assert exc.code == sqlstate.FEATURE_NOT_SUPPORTED == "0A000"


@pytest.mark.parametrize("value", ["false", "off", "0", "no", "FALSE"])
def test_replication_off_is_fine_and_not_forwarded(cfg: Settings, value: str) -> None:
    target = resolve(cfg, {"user": "alice", "database": "app", "replication": value})
    assert "replication" not in target.upstream_params


def test_replication_in_options_is_refused(cfg: Settings) -> None:
    exc = refused(cfg, {"user": "alice", "database": "app",
                        "options": "-c replication=database"})
    assert exc.code == sqlstate.NOT_AUTHORIZED


@pytest.mark.parametrize("name", ["user", "database", "options"])
def test_handled_parameters_in_options_are_refused(cfg: Settings, name: str) -> None:
    exc = refused(cfg, {"user": "alice", "database": "app", "options": f"-c {name}=x"})
    assert exc.code == sqlstate.NOT_AUTHORIZED


# --------------------------------------------------------------------------
# resource and account selection
# --------------------------------------------------------------------------
def test_dbname_resource_uses_default_account(cfg: Settings) -> None:
    target = resolve(cfg, {"user": "alice", "database": "app"})
    assert (target.user, target.resource.name, target.account.name) == ("alice", "app", "readonly")
    assert target.resource.database == "appdb"


def test_default_account_is_the_first_when_not_configured(cfg: Settings) -> None:
    assert resolve(cfg, {"user": "alice", "database": "other"}).account.name == "first"


def test_dbname_resource_slash_account(cfg: Settings) -> None:
    assert resolve(cfg, {"user": "alice", "database": "other/second"}).account.user == "u2"
    assert resolve(cfg, {"user": "alice", "database": "app/admin"}).account.name == "admin"


def test_empty_account_after_slash_means_default(cfg: Settings) -> None:
    assert resolve(cfg, {"user": "alice", "database": "app/"}).account.name == "readonly"


def test_dbname_defaults_to_the_user_name(cfg: Settings) -> None:
    exc = refused(cfg, {"user": "alice"})
    assert exc.code == sqlstate.UNKNOWN_RESOURCE and '"alice"' in str(exc)
    settings_ = settings_from_node(load_text(CONFIG.replace("name: other", "name: dave"), "t.yaml"))
    assert resolve(settings_, {"user": "dave"}).resource.name == "dave"
    assert resolve(settings_, {"user": "dave", "database": ""}).resource.name == "dave"


def test_pgvouch_account_option_selects_the_account(cfg: Settings) -> None:
    target = resolve(cfg, {"user": "alice", "database": "app",
                           "options": "-c pgvouch.account=admin"})
    assert target.account.name == "admin"
    assert target.pgvouch == {"pgvouch.account": "admin"}
    target = resolve(cfg, {"user": "alice", "database": "app/admin",
                           "options": "--pgvouch.account=admin"})
    assert target.account.name == "admin"


def test_pgvouch_account_conflicting_with_dbname_is_refused(cfg: Settings) -> None:
    exc = refused(cfg, {"user": "alice", "database": "app/readonly",
                        "options": "-c pgvouch.account=admin"})
    assert exc.code == sqlstate.NOT_AUTHORIZED


def test_pgvouch_hold(cfg: Settings) -> None:
    for value in ("wait", "retry"):
        target = resolve(cfg, {"user": "alice", "database": "app",
                               "options": f"-c pgvouch.hold={value}"})
        assert target.pgvouch == {"pgvouch.hold": value}
    assert refused(cfg, {"user": "alice", "database": "app",
                         "options": "-c pgvouch.hold=forever"}).code == sqlstate.NOT_AUTHORIZED


def test_unknown_pgvouch_setting_is_refused(cfg: Settings) -> None:
    exc = refused(cfg, {"user": "alice", "database": "app", "options": "-c pgvouch.bogus=1"})
    assert exc.code == sqlstate.NOT_AUTHORIZED and "pgvouch.bogus" in str(exc)


@pytest.mark.parametrize("dbname", ["nope", "nope/readonly", "App", "app /readonly"])
def test_unknown_resource(cfg: Settings, dbname: str) -> None:
    exc = refused(cfg, {"user": "alice", "database": dbname})
    assert exc.code == sqlstate.UNKNOWN_RESOURCE == "3D000"
    assert exc.hint and "RESOURCE/ACCOUNT" in exc.hint


@pytest.mark.parametrize("dbname", ["app/nope", "app/admin/x", "other/readonly"])
def test_unknown_account(cfg: Settings, dbname: str) -> None:
    exc = refused(cfg, {"user": "alice", "database": dbname})
    assert exc.code == sqlstate.UNKNOWN_ACCOUNT == "3D000"
    assert "does not exist" in str(exc)


def test_unknown_account_via_option(cfg: Settings) -> None:
    exc = refused(cfg, {"user": "alice", "database": "app", "options": "-c pgvouch.account=x"})
    assert exc.code == sqlstate.UNKNOWN_ACCOUNT


def test_missing_user_is_refused(cfg: Settings) -> None:
    assert refused(cfg, {"database": "app"}).code == sqlstate.NOT_AUTHORIZED
    assert refused(cfg, {"user": "", "database": "app"}).code == sqlstate.NOT_AUTHORIZED


# --------------------------------------------------------------------------
# allow lists
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("user", "allowed"),
    [("alice", True), ("bob", True), ("carol", True), ("dave", False), ("mallory", False),
     ("group:dba", False)],
)
def test_allow_list_users_and_groups(cfg: Settings, user: str, allowed: bool) -> None:
    params = {"user": user, "database": "app/admin"}
    account = cfg.resources["app"].accounts["admin"]
    assert may_use(cfg, user, account) is allowed
    if allowed:
        assert resolve(cfg, params).account.name == "admin"
    else:
        exc = refused(cfg, params)
        assert exc.code == sqlstate.NOT_AUTHORIZED
        assert user in str(exc) and "admin" in str(exc)


def test_allow_list_applies_to_the_option_too(cfg: Settings) -> None:
    exc = refused(cfg, {"user": "dave", "database": "app", "options": "-c pgvouch.account=admin"})
    assert exc.code == sqlstate.NOT_AUTHORIZED


def test_empty_allow_list_admits_nobody(cfg: Settings) -> None:
    for user in ("alice", "bob", "carol"):
        assert refused(cfg, {"user": user, "database": "app/nobody"}).code == "28000"


def test_no_allow_list_admits_anyone(cfg: Settings) -> None:
    for user in ("alice", "dave", "someone-unknown"):
        assert resolve(cfg, {"user": user, "database": "app"}).account.name == "readonly"


# --------------------------------------------------------------------------
# what goes upstream
# --------------------------------------------------------------------------
def test_forwarded_parameters(cfg: Settings) -> None:
    target = resolve(cfg, {
        "user": "alice", "database": "app/admin", "replication": "false",
        "options": "-c pgvouch.account=admin -c statement_timeout=5s -c pgvouch.hold=wait",
        "application_name": "psql", "client_encoding": "UTF8", "_pq_.something": "on",
    })
    assert target.upstream_params == {
        "application_name": "psql",
        "client_encoding": "UTF8",
        "options": "-c statement_timeout=5s",
    }
    assert target.pgvouch == {"pgvouch.account": "admin", "pgvouch.hold": "wait"}


def test_only_pgvouch_options_leave_no_options_upstream(cfg: Settings) -> None:
    target = resolve(cfg, {"user": "alice", "database": "app",
                           "options": "-c pgvouch.account=readonly"})
    assert target.upstream_params == {}


def test_forwarded_value_with_space_and_backslash(cfg: Settings) -> None:
    target = resolve(cfg, {"user": "alice", "database": "app",
                           "options": "-c application_name=a\\ b\\\\c"})
    assert target.upstream_params["options"] == "-c application_name=a\\ b\\\\c"
    assert pg_settings(target.upstream_params["options"]) == [("application_name", "a b\\c")]
