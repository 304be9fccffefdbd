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
from proxy.wire import bind_values


class Statement:
    """One thing that will run upstream.

    ``sql`` is None when the proxy cannot tell what runs (an Execute of a
    portal it never saw bound, a FunctionCall): deciders must treat that as
    the strictest case.

    ``params`` and ``param_formats`` (the values and formats of a Bind) are
    decoded only when someone reads them: the relay keeps the Bind's raw bytes
    (already validated), and most statements are decided without them.
    """

    __slots__ = ("_bind", "_param_formats", "_params", "param_types", "sql", "via")
    __match_args__ = ("sql", "via", "params", "param_formats", "param_types")
    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaces

    sql: str | None
    via: Literal["query", "execute", "function-call"]
    param_types: tuple[int, ...]

    def __init__(self, sql: str | None, via: Literal["query", "execute", "function-call"] = "query",
                 params: tuple[bytes | None, ...] = (), param_formats: tuple[int, ...] = (),
                 param_types: tuple[int, ...] = ()) -> None:
        self.sql = sql
        self.via = via
        self._params = params
        self._param_formats = param_formats
        self.param_types = param_types
        self._bind: bytes | None = None

    @staticmethod
    def bound(sql: str, bind_tail: bytes, param_types: tuple[int, ...]) -> Statement:
        """An Execute of ``sql``, its parameters still in ``bind_tail`` (a validated
        Bind's bytes after its two names; see :func:`proxy.wire.bind_values`)."""
        statement = Statement(sql, "execute", (), (), param_types)
        statement._bind = bind_tail
        return statement

    def _decode(self) -> None:
        tail = self._bind
        if tail is not None:
            self._param_formats, self._params = bind_values(tail)
            self._bind = None

    @property
    def params(self) -> tuple[bytes | None, ...]:
        if self._bind is not None:
            self._decode()
        return self._params

    @params.setter
    def params(self, value: tuple[bytes | None, ...]) -> None:
        self._decode()
        self._params = value

    @property
    def param_formats(self) -> tuple[int, ...]:
        if self._bind is not None:
            self._decode()
        return self._param_formats

    @param_formats.setter
    def param_formats(self, value: tuple[int, ...]) -> None:
        self._decode()
        self._param_formats = value

    def _fields(self) -> tuple[object, ...]:
        return (self.sql, self.via, self.params, self.param_formats, self.param_types)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Statement)
        return self._fields() == other._fields()

    def __repr__(self) -> str:
        return (f"Statement(sql={self.sql!r}, via={self.via!r}, params={self.params!r}, "
                f"param_formats={self.param_formats!r}, param_types={self.param_types!r})")


class Unit:
    """What one ``decide()`` call is about: a simple Query or FunctionCall (one
    statement), or an extended-protocol batch up to Sync/Flush (``extended``).

    A plain class rather than a dataclass: the relay builds one per statement,
    and compiled (mypyc) this constructor is a native call.
    """

    __slots__ = ("extended", "statements")
    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaces

    def __init__(self, statements: tuple[Statement, ...], extended: bool = False) -> None:
        self.statements = statements
        self.extended = extended

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Unit)
        return self.statements == other.statements and self.extended == other.extended

    def __repr__(self) -> str:
        return f"Unit(statements={self.statements!r}, extended={self.extended!r})"


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
    # allow only, from a hold of a simple Query: forward this Query message instead of the
    # held one (the proxy answers a command of its own, e.g. pgvouch.request_access, through
    # the server, so the client gets native rows and an exact transaction status)
    replacement: bytes | None = None


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
