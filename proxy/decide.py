"""The one interception point: every client statement passes ``decide()``.

Owns: what the session layer hands to a decider (a :class:`Unit`: one simple
Query, or one extended-protocol batch up to Sync/Flush, or a FunctionCall)
and what comes back (a :class:`Decision`). The session forwards a unit only
after ``decide`` returned ``allow``; anything else, including an exception in
the decider, means the unit is not forwarded (fail closed).

Must not: parse SQL or do I/O. Policy evaluation plugs in here.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from proxy import sqlstate


@dataclass(slots=True)
class Statement:
    """One thing that will run upstream.

    ``sql`` is None when the proxy cannot tell what runs (an Execute of a
    portal it never saw bound, a FunctionCall): deciders must treat that as
    the strictest case.
    """

    sql: str | None
    via: Literal["query", "execute", "function-call"] = "query"
    params: tuple[bytes | None, ...] = ()
    param_formats: tuple[int, ...] = ()
    param_types: tuple[int, ...] = ()


@dataclass(slots=True)
class Unit:
    statements: tuple[Statement, ...]
    extended: bool = False


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """Who is asking, and where: fixed for the life of a client session."""

    session_id: str
    user: str
    groups: tuple[str, ...]
    resource: str
    account: str
    application_name: str = ""
    client_addr: str = ""
    options: dict[str, str] = field(default_factory=dict)
    # per-session memory for deciders (e.g. SQL-level PREPAREd statements)
    state: dict[str, object] = field(default_factory=dict, compare=False)
    # the server's current ParameterStatus values (search_path, session_authorization, ...)
    server_params: dict[str, str] = field(default_factory=dict, compare=False)


class Hold(Protocol):
    """A unit waiting for people to decide; the session keeps it out of upstream.

    The session awaits ``start()``: a Decision ends the hold at once (an
    approval already granted, retry mode, a store failure); a string is the
    NOTICE to send while waiting. It then sends ``heartbeat()`` every
    ``heartbeat_interval`` seconds, forwards the unit only if ``outcome``
    resolves to an ``allow`` Decision, and reports what happened with
    ``finished``. ``cancel`` is called when the client cancels (Ctrl-C) or
    goes away; ``outcome`` must then resolve promptly.
    """

    heartbeat_interval: float

    def start(self) -> Awaitable[Decision | str]: ...
    def outcome(self) -> Awaitable[Decision]: ...
    def heartbeat(self) -> str | None: ...
    def cancel(self, reason: str) -> None: ...
    def finished(self, ok: bool, error: str | None) -> None: ...


@dataclass(frozen=True, slots=True)
class Decision:
    action: Literal["allow", "deny", "hold"]
    sqlstate: str = ""
    message: str = ""
    detail: str | None = None
    hint: str | None = None
    policy: str | None = None
    hold: Hold | None = None


ALLOW = Decision("allow")


def deny(message: str, *, code: str = sqlstate.POLICY_DENIED, detail: str | None = None,
         hint: str | None = None, policy: str | None = None) -> Decision:
    return Decision("deny", code, message, detail, hint, policy)


class Decider(Protocol):
    def decide(self, session: SessionInfo, unit: Unit) -> Decision: ...


class AllowAll:
    """The foundation's decider: allows everything (statements are still counted)."""

    def decide(self, session: SessionInfo, unit: Unit) -> Decision:
        return ALLOW
