"""``SELECT pgvouch.request_access('write', '1h', 'incident 4711')`` from psql.

Owns: recognising the one command the proxy answers inside a database
session (:func:`read_command`), refusing every other use of a ``pgvouch.``
function (fail closed: such SQL is never forwarded), and answering the
command: the grant request is made through :class:`~approvals.grants.GrantDesk`
and the client gets a one-row result (request id, status, progress, what
happens next). The result comes from the server itself: the held Query is
replaced by a ``SELECT`` of quoted literals (``Decision.replacement``), so
row format, command tag and transaction status are PostgreSQL's own.

Must not: decide policies or workflow rules (the desk and the workflow do),
or speak the protocol beyond building that one Query message.

The command is exactly: one ``SELECT`` with a single target, the function
``pgvouch.request_access`` called with three or four string constants —
kinds (comma-separated), duration (``1h``, ``30m``), reason, and optionally
table globs (comma-separated). Only the simple query protocol: over the
extended protocol (drivers' prepared statements) it is refused with a hint.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable
from dataclasses import dataclass

from pglast import ast, parse_sql
from pglast.parser import ParseError
from pglast.visitors import Visitor

from approvals import workflow
from approvals.grants import (
    GrantAsk,
    GrantDesk,
    GrantError,
    parse_grant_duration,
    parse_kinds,
    parse_reason,
    parse_tables,
)
from approvals.model import Request
from approvals.store import StoreError
from approvals.workflow import WorkflowError, format_duration
from proxy import sqlstate, wire
from proxy.decide import Decision, SessionInfo, Unit, deny

log = logging.getLogger("pgvouch.grants")

SCHEMA = "pgvouch"
FUNCTION = "request_access"
USAGE = ("SELECT pgvouch.request_access('write', '1h', 'incident 4711'); optional 4th argument: "
         "table globs, e.g. 'public.orders, public.refunds*'")
# Cheap first look at every statement: only SQL naming pgvouch (or using U& identifiers,
# which could spell it) is parsed again here.
_MENTION = re.compile(r"pgvouch|u&", re.IGNORECASE)
_UNSAFE = re.compile(r"[^\w .,:;/()\[\]@#%+*=<>!?'\"-]")
MAX_LITERAL = 500
_SELECT_FIELDS = tuple(ast.SelectStmt.__slots__)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class AccessCall:
    kinds: str
    duration: str
    reason: str
    tables: str | None


class Refusal(str):
    """Why SQL naming a pgvouch function is refused (the usage hint goes with it)."""

    __slots__ = ()


class _PgvouchCalls(Visitor):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def visit_FuncCall(self, ancestors: object, node: ast.FuncCall) -> None:
        names = [str(getattr(part, "sval", "")) for part in node.funcname or ()]
        if any(name.lower() == SCHEMA for name in names[:-1]):
            self.found.append(".".join(names))


def mentions_pgvouch(sql: str) -> bool:
    return _MENTION.search(sql) is not None


def read_command(sql: str) -> AccessCall | Refusal | None:
    """The command in ``sql``; a Refusal if ``sql`` uses a pgvouch function otherwise; None if neither."""
    if not mentions_pgvouch(sql):
        return None
    try:
        statements = parse_sql(sql)
    except ParseError as exc:
        return Refusal(f"pgvouch could not read this statement, which names pgvouch ({exc})")
    visitor = _PgvouchCalls()
    visitor(statements)
    if not visitor.found:
        return None
    call = _exact_call(statements)
    if call is None:
        used = ", ".join(sorted(set(visitor.found)))
        return Refusal(f"the pgvouch schema belongs to the proxy, which answers only "
                       f"pgvouch.request_access with 3 or 4 string constants as a statement of "
                       f"its own; this statement uses {used}")
    return call


def _exact_call(statements: tuple[ast.RawStmt, ...]) -> AccessCall | None:
    if len(statements) != 1 or not isinstance(statements[0].stmt, ast.SelectStmt):
        return None
    select = statements[0].stmt
    if any(getattr(select, name) for name in _SELECT_FIELDS if name != "targetList"):
        return None
    targets = select.targetList or ()
    if len(targets) != 1:
        return None
    target = targets[0]
    call = target.val
    if target.indirection or not isinstance(call, ast.FuncCall):
        return None
    names = [getattr(part, "sval", None) for part in call.funcname or ()]
    if names != [SCHEMA, FUNCTION]:
        return None
    if (call.agg_order or call.agg_filter or call.over or call.agg_within_group or call.agg_star
            or call.agg_distinct or call.func_variadic):
        return None
    args = call.args or ()
    if not 3 <= len(args) <= 4:
        return None
    values: list[str] = []
    for arg in args:
        if not isinstance(arg, ast.A_Const) or arg.isnull or not isinstance(arg.val, ast.String) \
                or arg.val.sval is None:
            return None
        values.append(arg.val.sval)
    return AccessCall(values[0], values[1], values[2], values[3] if len(values) == 4 else None)


def literal(text: str) -> str:
    """``text`` as a SQL string literal (standard_conforming_strings is always on in sessions)."""
    safe = _UNSAFE.sub("?", text)[:MAX_LITERAL]
    return "'" + safe.replace("'", "''") + "'"


def answer_query(grant: Request, now: float) -> bytes:
    """The Query whose result tells the user what became of their grant request."""
    progress = workflow.progress(grant, now)
    who = ", ".join(progress.may_vote) or "an approver"
    kinds = ", ".join(grant.subject.get("kinds") or ())
    duration = format_duration(float(grant.subject["duration"]))
    following = (f"{who} may approve it (POST /api/v1/requests/{grant.id}/approve, the Activity "
                 f"Queue, or APPROVE '{grant.id}' on the console); then your {kinds} statements "
                 f"here run without review for {duration} from the approval")
    columns = (("request_id", grant.id), ("status", str(grant.status)),
               ("progress", progress.summary()), ("next", following))
    sql = "SELECT " + ", ".join(f"{literal(value)}::text AS {name}" for name, value in columns)
    return wire.query(sql)


class RequestAccess:
    """The hold that answers one ``pgvouch.request_access`` call (decided in ``start``)."""

    heartbeat_interval = 60.0

    def __init__(self, desk: GrantDesk, session: SessionInfo, call: AccessCall) -> None:
        self.desk = desk
        self.session = session
        self.call = call

    async def start(self) -> Decision | str:
        s, call = self.session, self.call
        try:
            ask = GrantAsk(
                user=s.user, resource=s.resource, account=s.account, kinds=parse_kinds(call.kinds),
                tables=parse_tables(call.tables), duration=parse_grant_duration(call.duration),
                reason=parse_reason(call.reason),
            )
            grant = await self.desk.request(ask)
        except GrantError as exc:
            code = sqlstate.SYNTAX_ERROR if exc.code == "invalid_grant" else sqlstate.GRANT_REFUSED
            return deny(f"pgvouch: grant refused: {exc.message}", code=code, hint=USAGE)
        except WorkflowError as exc:
            return deny(f"pgvouch: grant refused: {exc.message}", code=sqlstate.GRANT_REFUSED)
        except StoreError as exc:
            log.error("approvals store unavailable, grant request refused: %s", exc)
            return deny("pgvouch: the approvals store is unavailable; the grant was not requested",
                        code=sqlstate.STORE_UNAVAILABLE)
        log.info("%s: grant %s requested from psql", s.session_id, grant.id)
        return Decision("allow", replacement=answer_query(grant, self.desk.service.clock()))

    def outcome(self) -> Awaitable[Decision]:
        raise AssertionError("a grant request is answered in start()")

    def heartbeat(self) -> str | None:
        return None

    def cancel(self, reason: str) -> None:
        return None

    def finished(self, ok: bool, error: str | None) -> None:
        return None


class GrantCommands:
    """The policy decider's first look at a unit: is it (or does it misuse) the pgvouch command?"""

    def __init__(self, desk: GrantDesk | None) -> None:
        self.desk = desk

    def intercept(self, session: SessionInfo, unit: Unit) -> Decision | None:
        """None for ordinary SQL; else the decision for the command or the refusal."""
        for statement in unit.statements:
            sql = statement.sql
            if sql is None or _MENTION.search(sql) is None:
                continue
            found = read_command(sql)
            if found is None:
                continue
            if unit.extended or statement.via != "query":
                return deny("pgvouch: pgvouch.request_access works only as a simple query "
                            "(psql's default), not over the extended protocol",
                            code=sqlstate.FEATURE_NOT_SUPPORTED,
                            hint="Send it as a plain query without parameters, e.g. from psql or "
                                 "with asyncpg's conn.execute(sql).")
            if isinstance(found, Refusal):
                return deny(f"pgvouch: {found}", code=sqlstate.SYNTAX_ERROR, hint=USAGE)
            if self.desk is None:
                return deny("pgvouch: grants need policies and an approvals store, and this proxy "
                            "has none", code=sqlstate.GRANT_REFUSED)
            return Decision("hold", hold=RequestAccess(self.desk, session, found))
        return None
