"""From a client's StartupMessage to (user, resource, account, upstream params).

Owns: reading ``dbname`` as ``RESOURCE`` or ``RESOURCE/ACCOUNT``, the
``options`` string (``-c name=value`` / ``--name=value``, with PostgreSQL's
backslash escapes), the ``pgvouch.*`` settings it may carry, and the list of
startup parameters that are forwarded upstream.

Security: startup parameters are a way around statement classification
(``options=-c role=admin`` is a SET ROLE nobody sees), so only ordinary
settings pass; ``role``, ``session_authorization`` and replication are
refused outright.

Must not: authenticate or do I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from config.settings import Account, Resource, Settings
from proxy import sqlstate

# Startup parameters that are never forwarded as-is.
_HANDLED: Final = {"user", "database", "options", "replication"}
# Settings that change who the session is: a privilege change in disguise.
# role and session_authorization change who runs statements; the read-only pair is
# pgvouch's to set (a session whose policies never allow a write is read-only): a
# client may only ask for default_transaction_read_only on
REFUSED_SETTINGS: Final = frozenset({"role", "session_authorization", "transaction_read_only"})
_ON: Final = frozenset({"on", "true", "yes", "1"})
PGVOUCH_SETTINGS: Final = frozenset({"pgvouch.account", "pgvouch.hold"})
# PostgreSQL splits options on C isspace() in the C locale, nothing wider.
_C_SPACE: Final = " \t\n\v\f\r"
# A setting name as PostgreSQL accepts it (custom settings have one dot or more).
_NAME_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.")


# Client encodings whose multibyte characters may end in an ASCII byte (a
# backslash, say): the server would read the bytes differently from the UTF-8
# the proxy decodes, so what the decider sees is not what runs.
_UNSAFE_ENCODINGS: Final = frozenset({
    "sjis", "shiftjis", "mskanji", "win932", "windows932", "shiftjis2004",
    "big5", "win950", "windows950", "gbk", "win936", "windows936", "cp936",
    "uhc", "win949", "windows949", "gb18030", "johab",
})
_LEXING_WORDS: Final = re.compile(r"encoding|conforming|backslash_quote|set_config|u&", re.IGNORECASE)


def lexing_setting_is_safe(name: str, value: str) -> bool:
    """Whether a setting leaves SQL lexed the way the proxy reads it."""
    name = name.lower()
    if name == "client_encoding":
        return "".join(ch for ch in value.lower() if ch.isalnum()) not in _UNSAFE_ENCODINGS
    if name == "standard_conforming_strings":
        return value.lower() in ("on", "true", "yes", "1")
    return True


def changes_lexing(sql: str) -> bool:
    """Whether a statement might change how the server lexes later statements.

    Cheap and deliberately broad (a substring test): such a statement is a
    barrier, so the proxy learns the server's new settings before it decides
    on anything sent after it.
    """
    if sql.isascii():
        # the same test without the (slow) case-insensitive regex; for ASCII
        # text, lower() and IGNORECASE agree exactly
        low = sql.lower()
        return ("encoding" in low or "conforming" in low or "backslash_quote" in low
                or "set_config" in low or "u&" in low)
    return _LEXING_WORDS.search(sql) is not None


class StartupRefused(Exception):
    def __init__(self, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.hint = hint


@dataclass(frozen=True)
class Target:
    user: str
    resource: Resource
    account: Account
    upstream_params: dict[str, str]
    pgvouch: dict[str, str] = field(default_factory=dict)


def split_options(options: str) -> list[str]:
    """Split like PostgreSQL's pg_split_opts: whitespace separates, backslash escapes."""
    words: list[str] = []
    current: list[str] = []
    escaped = False
    in_word = False
    for ch in options:
        if escaped:
            current.append(ch)
            escaped = False
            in_word = True
        elif ch == "\\":
            escaped = True
            in_word = True
        elif ch in _C_SPACE:
            if in_word:
                words.append("".join(current))
                current = []
                in_word = False
        else:
            current.append(ch)
            in_word = True
    if in_word:
        words.append("".join(current))
    return words


def parse_options(options: str) -> dict[str, str]:
    """``-c a=b -c c=d --e=f`` → ``{"a": "b", "c": "d", "e": "f"}`` (names lowercased)."""
    settings: dict[str, str] = {}
    words = split_options(options)
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c":
            i += 1
            if i >= len(words):
                raise StartupRefused(sqlstate.PROTOCOL_VIOLATION, "options: -c needs name=value")
            assignment = words[i]
        elif word.startswith("-c") or word.startswith("--"):
            assignment = word[2:]
        else:
            raise StartupRefused(
                sqlstate.NOT_AUTHORIZED,
                f"options: unsupported switch {word!r} (only -c name=value is accepted)",
            )
        name, sep, value = assignment.partition("=")
        if not sep or not name:
            raise StartupRefused(sqlstate.PROTOCOL_VIOLATION, f"options: {assignment!r} is not name=value")
        key = name.lower().replace("-", "_")
        if not set(key) <= _NAME_CHARS:
            raise StartupRefused(sqlstate.NOT_AUTHORIZED, f"options: invalid setting name {name!r}")
        settings[key] = value
        i += 1
    return settings


def _escape(value: str) -> str:
    """Backslash-escape what pg_split_opts would split on, so a value stays one word."""
    return "".join("\\" + ch if ch in _C_SPACE or ch == "\\" else ch for ch in value)


def resolve(settings: Settings, params: dict[str, str]) -> Target:
    """Validate a startup packet's parameters against the configuration."""
    user = params.get("user", "")
    if not user:
        raise StartupRefused(sqlstate.NOT_AUTHORIZED, "no user name given in the startup packet")
    if params.get("replication", "false").lower() not in ("false", "0", "off", "no"):
        raise StartupRefused(
            sqlstate.FEATURE_NOT_SUPPORTED,
            "replication connections are not supported through pgvouch",
        )
    options = parse_options(params.get("options", ""))
    # Every other startup parameter is a setting PostgreSQL applies at login,
    # exactly like -c name=value: the same rules apply to both.
    top_level: dict[str, str] = {}
    for name, value in params.items():
        key = name.lower()
        if key in _HANDLED or key.startswith("_pq_."):
            continue
        if not set(key) <= _NAME_CHARS:
            raise StartupRefused(sqlstate.NOT_AUTHORIZED, f"invalid startup parameter {name!r}")
        if key in options:
            raise StartupRefused(sqlstate.NOT_AUTHORIZED, f"setting {name!r} is given twice")
        top_level[key] = value
    for key, value in top_level.items():
        if key.startswith("pgvouch."):
            options[key] = value
    pgvouch = {k: v for k, v in options.items() if k.startswith("pgvouch.")}
    for name in pgvouch:
        if name not in PGVOUCH_SETTINGS:
            raise StartupRefused(sqlstate.NOT_AUTHORIZED, f"unknown pgvouch setting {name!r}")
    for name in [*options, *top_level]:
        if name in REFUSED_SETTINGS:
            raise StartupRefused(
                sqlstate.NOT_AUTHORIZED,
                f"setting {name!r} at connection time is not allowed through pgvouch",
                hint="Choose a different account (dbname=RESOURCE/ACCOUNT) instead.",
            )
        if name in _HANDLED:
            raise StartupRefused(sqlstate.NOT_AUTHORIZED, f"setting {name!r} is not allowed in options")
    for name, value in [*options.items(), *top_level.items()]:
        if name == "default_transaction_read_only" and value.strip().lower() not in _ON:
            raise StartupRefused(
                sqlstate.NOT_AUTHORIZED,
                "default_transaction_read_only may only be turned on at connection time "
                "through pgvouch",
            )
        if not lexing_setting_is_safe(name, value):
            raise StartupRefused(
                sqlstate.FEATURE_NOT_SUPPORTED,
                f"{name}={value} is not supported through pgvouch: the proxy could not read "
                "statements the way the server does",
                hint="Use client_encoding UTF8 and standard_conforming_strings on.",
            )
    if "pgvouch.hold" in pgvouch and pgvouch["pgvouch.hold"] not in ("wait", "retry"):
        raise StartupRefused(sqlstate.NOT_AUTHORIZED, "pgvouch.hold must be wait or retry")

    dbname = params.get("database") or user
    resource_name, _, account_name = dbname.partition("/")
    resource = settings.resources.get(resource_name)
    if resource is None:
        raise StartupRefused(
            sqlstate.UNKNOWN_RESOURCE, f'resource "{resource_name}" does not exist',
            hint="dbname must be RESOURCE or RESOURCE/ACCOUNT; ask your DBA for the names.",
        )
    if "pgvouch.account" in pgvouch:
        if account_name and account_name != pgvouch["pgvouch.account"]:
            raise StartupRefused(
                sqlstate.NOT_AUTHORIZED, "dbname and pgvouch.account name different accounts"
            )
        account_name = pgvouch["pgvouch.account"]
    account = resource.accounts.get(account_name or resource.default_account)
    if account is None:
        raise StartupRefused(
            sqlstate.UNKNOWN_ACCOUNT,
            f'account "{account_name}" does not exist on resource "{resource.name}"',
        )
    if account.allow is not None and not may_use(settings, user, account):
        raise StartupRefused(
            sqlstate.NOT_AUTHORIZED,
            f'user "{user}" may not use account "{account.name}" on resource "{resource.name}"',
        )
    upstream = {
        k: v for k, v in params.items()
        if k.lower() in top_level and not k.lower().startswith("pgvouch.")
    }
    forwarded = {k: v for k, v in options.items() if not k.startswith("pgvouch.")}
    if forwarded:
        upstream["options"] = " ".join(f"-c {k}={_escape(v)}" for k, v in forwarded.items())
    return Target(user, resource, account, upstream, pgvouch)


def may_use(settings: Settings, user: str, account: Account) -> bool:
    if account.allow is None:
        return True
    groups = settings.groups_of(user)
    for entry in account.allow:
        if entry.startswith("group:"):
            if entry[6:] in groups:
                return True
        elif entry == user:
            return True
    return False
