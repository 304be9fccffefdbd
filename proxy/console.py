"""The admin console: a virtual ``pgvouch`` database the proxy answers itself.

pgbouncer's precedent: operators manage the proxy with the tool they already
have open. ``psql "... dbname=pgvouch"`` (authenticated like any session)
reaches this module instead of an upstream server. ``SHOW REQUESTS``,
``APPROVE 'R-7KQ2X' NOTE '...'`` and the other commands come back as
ordinary row sets, and refusals as ErrorResponses with SQLSTATEs, so psql
formats them and scripts match on codes.

Owns: the console's small language (a tokenizer for words, standard SQL
string literals and semicolons; nothing is evaluated and nothing is passed
on as SQL), the commands and how their results are shown, the SQLSTATE of
each of the workflow's refusal codes (:data:`WORKFLOW_SQLSTATE`), and the
protocol a console session speaks once authenticated: simple Query only;
the extended protocol is refused and skipped up to Sync, as PostgreSQL
skips after an error.

Must not: decide who may vote, cancel or revoke (every change is an
:class:`~approvals.service.ApprovalService` call, so four-eyes and the other
rules are the workflow's, as for the REST API and the web page), or touch
sockets: :meth:`Console.receive` turns one client message into response
bytes and the session (``proxy.client``) moves them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from approvals import workflow
from approvals.api import MAX_NOTE
from approvals.model import Request, Status, SubjectKind, normalize_request_id
from approvals.service import ApprovalService
from approvals.store import NotFound, StoreError
from approvals.workflow import Code, WorkflowError, format_duration, is_usable
from config.settings import Settings
from proxy import sqlstate, wire
from proxy.approval_hold import StatementHold
from proxy.policy_decider import LivePolicies, PolicyDecider
from proxy.worker_link import LinkLost

if TYPE_CHECKING:
    from proxy.server import ProxyServer

log = logging.getLogger("pgvouch.console")

CONSOLE_DATABASE = "pgvouch"
SERVER_VERSION = "16.0 (pgvouch console)"
OWNER_ROLE = "owner"
LIST_LIMIT = 500  # rows of SHOW REQUESTS / SHOW GRANTS; a NOTICE says when there are more
SUMMARY_WIDTH = 80  # characters of a statement in a list

# client message types
_QUERY, _SYNC, _FLUSH, _TERMINATE, _FUNCTION_CALL = b"QSHXF"
_EXTENDED = frozenset(b"PBDEC")  # Parse, Bind, Describe, Execute, Close
_COPY = frozenset(b"dcf")  # outside COPY, PostgreSQL ignores these too

READY = wire.ready_for_query(b"I")
EMPTY_QUERY = wire.message(b"I")

# The SQLSTATE of every refusal the workflow can give (a test checks it is complete).
WORKFLOW_SQLSTATE: Mapping[Code, str] = {
    Code.CANNOT_SELF_APPROVE: sqlstate.INSUFFICIENT_PRIVILEGE,
    Code.NOT_ELIGIBLE: sqlstate.INSUFFICIENT_PRIVILEGE,
    Code.NOT_REQUESTER: sqlstate.INSUFFICIENT_PRIVILEGE,
    Code.WOULD_STRAND: sqlstate.INSUFFICIENT_PRIVILEGE,
    Code.GRANT_NOT_ALLOWED: sqlstate.INSUFFICIENT_PRIVILEGE,
    Code.ALREADY_REVIEWED: sqlstate.WRONG_STATE,
    Code.EXPIRED: sqlstate.WRONG_STATE,
    Code.NOT_PENDING: sqlstate.WRONG_STATE,
    Code.NOT_APPROVED: sqlstate.WRONG_STATE,
    Code.NOT_EXECUTING: sqlstate.WRONG_STATE,
    Code.NOT_DUE: sqlstate.WRONG_STATE,
    Code.UNREACHABLE: sqlstate.WRONG_STATE,
    Code.WRONG_SUBJECT: sqlstate.WRONG_OBJECT_TYPE,
    Code.INVALID_DECISION: sqlstate.INVALID_PARAMETER_VALUE,
    Code.DURATION_TOO_LONG: sqlstate.INVALID_PARAMETER_VALUE,
}

HELP: tuple[tuple[str, str], ...] = (
    ("SHOW REQUESTS [PENDING|APPROVED|...]", "requests, newest first (any status, or one)"),
    ("SHOW REQUEST 'R-7KQ2X'", "one request: statement, parameters, steps, votes, time left"),
    ("APPROVE 'R-7KQ2X' [NOTE '...']", "approve the current step of a request"),
    ("DENY 'R-7KQ2X' NOTE '...'", "deny a request; the requester sees the note"),
    ("CANCEL 'R-7KQ2X' [NOTE '...']", "withdraw your own pending request"),
    ("SHOW GRANTS", "pending and active access grants"),
    ("REVOKE GRANT 'R-7KQ2X' [NOTE '...']", "end an active grant early"),
    ("SHOW POLICIES", "the policies in force"),
    ("SHOW SESSIONS", "client sessions of this proxy"),
    ("RELOAD", "reload the policies from disk (owners only)"),
    ("SHOW HELP", "this list"),
)
_HINT = "SHOW HELP lists the console's commands."


def wants_console(settings: Settings, params: Mapping[str, str]) -> bool:
    """``dbname=pgvouch`` (read as ``proxy.startup`` reads it), unless a resource has that name."""
    dbname = params.get("database") or params.get("user", "")
    return dbname == CONSOLE_DATABASE and CONSOLE_DATABASE not in settings.resources


class ConsoleError(Exception):
    """A command refused: sent as an ErrorResponse; the session goes on."""

    def __init__(self, code: str, message: str, *, detail: str | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail
        self.hint = hint

    def response(self) -> bytes:
        return wire.error_response(self.code, self.message, detail=self.detail, hint=self.hint)


def _syntax(message: str, hint: str | None = _HINT) -> ConsoleError:
    return ConsoleError(sqlstate.SYNTAX_ERROR, message, hint=hint)


# -- tokens ---------------------------------------------------------------------------

WORD, STRING, SEMICOLON, OTHER = "word", "string", "semicolon", "other"


@dataclass(frozen=True)
class Token:
    kind: str  # WORD, STRING, SEMICOLON or OTHER
    text: str  # as written (for error messages)
    value: str  # WORD: upper-cased; STRING: the literal's value; else the text


def tokenize(sql: str) -> list[Token]:
    """Words, standard string literals (``'it''s'``), semicolons; comments are skipped.

    Anything else becomes an OTHER token, which no command accepts: the
    parser then reports a syntax error at it.
    """
    tokens: list[Token] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch.isspace():
            i += 1
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
        elif sql.startswith("/*", i):
            i = _after_comment(sql, i)
        elif ch == "'":
            value, end = _string_literal(sql, i)
            tokens.append(Token(STRING, sql[i:end], value))
            i = end
        elif ch == ";":
            tokens.append(Token(SEMICOLON, ";", ";"))
            i += 1
        elif ch.isalpha() or ch == "_":
            end = i + 1
            while end < n and (sql[end].isalnum() or sql[end] in "_$"):
                end += 1
            tokens.append(Token(WORD, sql[i:end], sql[i:end].upper()))
            i = end
        else:
            end = i + 1
            while end < n and not sql[end].isspace() and sql[end] not in "';":
                end += 1
            tokens.append(Token(OTHER, sql[i:end], sql[i:end]))
            i = end
    return tokens


def _string_literal(sql: str, start: int) -> tuple[str, int]:
    """The value of the literal at ``sql[start]`` (a quote) and the index after it."""
    parts: list[str] = []
    i = start + 1
    while True:
        end = sql.find("'", i)
        if end < 0:
            raise _syntax(f"unterminated quoted string at or near {_excerpt(sql[start:])}", None)
        parts.append(sql[i:end])
        if sql.startswith("''", end):
            parts.append("'")
            i = end + 2
            continue
        return "".join(parts), end + 1


def _after_comment(sql: str, start: int) -> int:
    """The index after the (possibly nested, as in PostgreSQL) block comment at ``start``."""
    depth, i = 0, start
    while i < len(sql):
        if sql.startswith("/*", i):
            depth += 1
            i += 2
        elif sql.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    raise _syntax(f"unterminated /* comment at or near {_excerpt(sql[start:])}", None)


def _excerpt(text: str, width: int = 40) -> str:
    return '"' + (text if len(text) <= width else text[:width] + "...") + '"'


# -- commands -----------------------------------------------------------------------


@dataclass(frozen=True)
class ShowRequests:
    status: Status | None


@dataclass(frozen=True)
class ShowRequest:
    request_id: str


@dataclass(frozen=True)
class Vote:
    request_id: str
    decision: str  # approve | deny
    note: str | None


@dataclass(frozen=True)
class Cancel:
    request_id: str
    note: str | None


@dataclass(frozen=True)
class RevokeGrant:
    request_id: str
    note: str | None


@dataclass(frozen=True)
class Show:
    what: str  # GRANTS | POLICIES | SESSIONS | HELP


@dataclass(frozen=True)
class Reload:
    pass


Command = ShowRequests | ShowRequest | Vote | Cancel | RevokeGrant | Show | Reload


class _Cursor:
    def __init__(self, tokens: Sequence[Token]) -> None:
        self.tokens = tokens
        self.pos = 0

    def _error_here(self, hint: str | None = _HINT) -> ConsoleError:
        if self.pos >= len(self.tokens):
            return _syntax("syntax error at end of input", hint)
        return _syntax(f'syntax error at or near "{self.tokens[self.pos].text}"', hint)

    def peek_word(self) -> str | None:
        if self.pos < len(self.tokens) and self.tokens[self.pos].kind == WORD:
            return self.tokens[self.pos].value
        return None

    def word(self, *choices: str) -> str:
        found = self.peek_word()
        if found is None or found not in choices:
            raise self._error_here()
        self.pos += 1
        return found

    def string(self, hint: str) -> str:
        if self.pos >= len(self.tokens) or self.tokens[self.pos].kind != STRING:
            raise self._error_here(hint)
        self.pos += 1
        return self.tokens[self.pos - 1].value

    def request_id(self, command: str) -> str:
        text = self.string(f"Put the request id in single quotes: {command} 'R-7KQ2X'")
        try:
            return normalize_request_id(text)
        except ValueError as exc:
            raise ConsoleError(sqlstate.INVALID_PARAMETER_VALUE, str(exc)) from None

    def note(self, command: str, *, required: bool = False) -> str | None:
        if self.peek_word() != "NOTE":
            if required:
                raise _syntax(f"{command} needs a note: {command} 'R-7KQ2X' NOTE 'why'", None)
            return None
        self.pos += 1
        text = self.string("Write the note as a string literal: NOTE 'it''s fine'").strip()
        if len(text) > MAX_NOTE:
            raise ConsoleError(sqlstate.INVALID_PARAMETER_VALUE,
                               f"a note may be at most {MAX_NOTE} characters")
        if required and not text:
            raise ConsoleError(sqlstate.INVALID_PARAMETER_VALUE, f"{command} needs a non-empty note")
        return text or None

    def end(self) -> None:
        if self.pos < len(self.tokens):
            raise self._error_here()


_STATUSES = {str(status).upper(): status for status in Status}


def parse_command(tokens: Sequence[Token]) -> Command:
    """One statement's tokens (no semicolons) as a command, or a ConsoleError."""
    cursor = _Cursor(tokens)
    verb = cursor.word("SHOW", "APPROVE", "DENY", "CANCEL", "REVOKE", "RELOAD")
    command: Command
    if verb == "SHOW":
        what = cursor.word("REQUESTS", "REQUEST", "GRANTS", "POLICIES", "SESSIONS", "HELP")
        if what == "REQUESTS":
            status = _STATUSES.get(cursor.peek_word() or "")
            if status is not None:
                cursor.pos += 1
            command = ShowRequests(status)
        elif what == "REQUEST":
            command = ShowRequest(cursor.request_id("SHOW REQUEST"))
        else:
            command = Show(what)
    elif verb in ("APPROVE", "DENY"):
        request_id = cursor.request_id(verb)
        command = Vote(request_id, verb.lower(), cursor.note(verb, required=verb == "DENY"))
    elif verb == "CANCEL":
        command = Cancel(cursor.request_id(verb), cursor.note(verb))
    elif verb == "REVOKE":
        cursor.word("GRANT")
        command = RevokeGrant(cursor.request_id("REVOKE GRANT"), cursor.note("REVOKE GRANT"))
    else:
        command = Reload()
    cursor.end()
    return command


def parse_script(sql: str) -> list[Command]:
    """Every command of a Query string, in order; empty statements are skipped.

    The whole string is parsed before anything runs (as PostgreSQL does), so
    a syntax error anywhere means nothing ran.
    """
    commands: list[Command] = []
    current: list[Token] = []
    for token in [*tokenize(sql), Token(SEMICOLON, ";", ";")]:
        if token.kind == SEMICOLON:
            if current:
                commands.append(parse_command(current))
            current = []
        else:
            current.append(token)
    return commands


# -- the console --------------------------------------------------------------------------


class Console:
    """One authenticated console session: client messages in, response bytes out."""

    def __init__(self, server: ProxyServer, user: str, application_name: str = "") -> None:
        self.server = server
        self.user = user
        self.application_name = application_name
        self._skipping = False  # refused an extended-protocol message: skip to Sync

    def greeting(self, key_pid: int, key_secret: bytes) -> bytes:
        """What follows authentication: AuthenticationOk, settings, cancel key, ReadyForQuery."""
        settings = (
            ("server_version", SERVER_VERSION),
            ("server_encoding", "UTF8"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("TimeZone", "UTC"),
            ("integer_datetimes", "on"),
            ("standard_conforming_strings", "on"),
            ("application_name", self.application_name),
        )
        return b"".join([
            wire.auth_ok(),
            *(wire.parameter_status(name, value) for name, value in settings),
            wire.backend_key_data(key_pid, key_secret),
            READY,
        ])

    async def receive(self, kind: int, body: bytes) -> bytes | None:
        """The answer to one client message; None: close the connection.

        Raises :class:`~proxy.wire.ProtocolError` for a message no frontend
        may send here.
        """
        if kind == _TERMINATE:
            return None
        if self._skipping:
            if kind == _SYNC:
                self._skipping = False
                return READY
            return b""
        if kind == _QUERY:
            reader = wire.Reader(body)
            sql = reader.cstring()
            reader.done()
            return await self.run(sql)
        if kind in _EXTENDED:
            self._skipping = True
            return _not_simple("the pgvouch console speaks the simple query protocol")
        if kind == _FUNCTION_CALL:
            return _not_simple("the pgvouch console has no functions to call") + READY
        if kind == _SYNC:
            return READY
        if kind == _FLUSH or kind in _COPY:
            return b""
        raise wire.ProtocolError(f"invalid frontend message type {chr(kind)!r}")

    async def run(self, sql: str) -> bytes:
        """The whole answer to a simple Query, ReadyForQuery included.

        Commands run in order; like PostgreSQL, the first error ends the
        Query string (commands before it took effect: there are no
        transactions here).
        """
        try:
            commands = parse_script(sql)
        except ConsoleError as exc:
            return exc.response() + READY
        if not commands:
            return EMPTY_QUERY + READY
        out: list[bytes] = []
        for command in commands:
            try:
                out.append(await self.execute(command))
            except ConsoleError as exc:
                out.append(exc.response())
                break
        out.append(READY)
        return b"".join(out)

    async def execute(self, command: Command) -> bytes:
        """One command's row set and CommandComplete, or a ConsoleError."""
        try:
            return await self._execute(command)
        except ConsoleError:
            raise
        except WorkflowError as exc:
            raise ConsoleError(WORKFLOW_SQLSTATE.get(exc.code, sqlstate.WRONG_STATE), exc.message,
                               detail=f"workflow code: {exc.code}") from None
        except NotFound as exc:
            raise _no_request(str(exc)) from None
        except StoreError as exc:
            log.warning("console command failed, store unavailable: %s", exc)
            raise ConsoleError(sqlstate.STORE_UNAVAILABLE,
                               "the approvals store is unavailable; try again shortly") from None
        except Exception:
            log.exception("console command %r of %s failed", command, self.user)
            raise ConsoleError(sqlstate.INTERNAL_ERROR,
                               "the console command failed; see the pgvouch log") from None

    async def _execute(self, command: Command) -> bytes:
        match command:
            case Show("HELP"):
                return _rows("SHOW", ["command", "description"], HELP)
            case Show("SESSIONS"):
                return await self._sessions()
            case Show("POLICIES"):
                return self._policies()
            case Reload():
                return self._reload()
            case Show("GRANTS"):
                return await self._grants()
            case ShowRequests(status):
                return await self._requests(status)
            case ShowRequest(request_id):
                service = self._service()
                found = await service.store.get(request_id)
                if found is None:
                    raise _no_request(request_id)
                return _rows("SHOW", ["field", "value"], request_fields(found, service.clock()))
            case Vote(request_id, decision, note):
                service = self._service(changing=True)
                updated = await service.vote(request_id, self.user, decision, note)
                return self._changed(decision, updated)
            case Cancel(request_id, note):
                service = self._service(changing=True)
                return self._changed("cancel", await service.cancel(request_id, self.user, note))
            case RevokeGrant(request_id, note):
                service = self._service(changing=True)
                return self._changed("revoke", await service.revoke(request_id, self.user, note))
        raise AssertionError(f"unhandled console command {command!r}")

    # -- approvals ----------------------------------------------------------------------

    def _service(self, *, changing: bool = False) -> ApprovalService:
        service = self.server.approvals
        if service is None:
            raise ConsoleError(sqlstate.WRONG_STATE, "approvals are not configured on this proxy",
                               hint="Configure policies: (and store:) to hold statements for review.")
        if changing and self.server.settings.client_auth == "trust":
            # with trust anyone can claim any name: four-eyes would mean nothing
            raise ConsoleError(sqlstate.NOT_AUTHORIZED,
                               "the console does not change requests under client_auth: trust",
                               hint="Use client_auth: scram, or the API with tokens.")
        return service

    def _changed(self, action: str, request: Request) -> bytes:
        service = self._service()
        log.info("console: %s %s by %s; now %s", action, request.id, self.user, request.status)
        # as of the change this command made (an approval is "usable for 1h", not 59m59s)
        at = request.decided_at if request.decided_at is not None else service.clock()
        summary = workflow.progress(request, at).summary()
        return _rows(action.upper(), ["id", "status", "summary"],
                     [(request.id, str(request.status), summary)])

    async def _requests(self, status: Status | None) -> bytes:
        service = self._service()
        found = await service.store.list(status=status, resource_glob=None, limit=LIST_LIMIT)
        now = service.clock()
        columns = ["id", "status", "progress", "requester", "resource", "account", "statement",
                   "submitted", "time_left", "may_vote"]
        rows = [request_row(r, now) for r in found]
        return _more_notice(len(found)) + _rows("SHOW", columns, rows)

    async def _grants(self) -> bytes:
        service = self._service()
        store, now = service.store, service.clock()
        pending = await store.list(status=Status.PENDING, limit=LIST_LIMIT)
        approved = await store.list(status=Status.APPROVED, limit=LIST_LIMIT)
        grants = [r for r in [*pending, *approved] if r.subject_kind is SubjectKind.GRANT
                  and (r.status is Status.PENDING or is_usable(r, now))]
        columns = ["id", "status", "progress", "requester", "resource", "account", "kinds",
                   "tables", "duration", "reason", "time_left", "may_vote"]
        rows = []
        for grant in grants:
            subject, progress = grant.subject, workflow.progress(grant, now)
            rows.append((grant.id, str(grant.status), _progress(progress), grant.requester,
                         grant.resource, grant.account, ", ".join(subject.get("kinds") or []),
                         ", ".join(subject.get("tables") or []) or None,
                         format_duration(float(subject.get("duration") or 0)),
                         subject.get("reason"), _left(progress), _may_vote(progress)))
        notice = _more_notice(max(len(pending), len(approved)))
        return notice + _rows("SHOW", columns, rows)

    # -- the proxy itself ---------------------------------------------------------------

    async def _sessions(self) -> bytes:
        columns = ["id", "user", "resource", "account", "client", "phase", "application_name",
                   "connected_since", "held_request"]
        rows = session_rows(self.server)
        notice = b""
        link = self.server.link
        if link is not None:  # one of several workers: theirs too
            try:
                answers = await link.ask("sessions")
            except (LinkLost, TimeoutError):
                answers = []
            for answer in answers:
                rows += [(float(opened), tuple(row)) for opened, row in answer or ()]
            missing = self.server.settings.workers - 1 - len(answers)
            if missing > 0:
                notice = wire.notice_response(
                    f"{missing} worker(s) did not answer: their sessions are not listed",
                    severity="WARNING")
        rows.sort(key=lambda pair: pair[0])
        return notice + _rows("SHOW", columns, [row for _opened, row in rows])

    def _live_policies(self) -> LivePolicies:
        decider = self.server.decider
        if not isinstance(decider, PolicyDecider):
            raise ConsoleError(sqlstate.WRONG_STATE, "no policies are configured on this proxy",
                               hint="Point policies: at a directory of policy files.")
        return decider.policies

    def _policies(self) -> bytes:
        live = self._live_policies()
        notice = b""
        if live.last_error:
            notice = wire.notice_response(
                f"the last policy reload failed; these policies stay in force: {live.last_error}",
                severity="WARNING")
        columns = ["name", "source", "resources", "accounts", "users", "rules", "description"]
        rows = [(p.name, p.source, _globs(p.match.resources), _globs(p.match.accounts),
                 _globs(p.match.users), str(len(p.rules)), p.description)
                for p in live.current.policies]
        return notice + _rows("SHOW", columns, rows)

    def _reload(self) -> bytes:
        entry = self.server.settings.users.get(self.user)
        if entry is None or OWNER_ROLE not in entry.roles:
            raise ConsoleError(sqlstate.INSUFFICIENT_PRIVILEGE,
                               f"permission denied: RELOAD needs the {OWNER_ROLE} role",
                               hint=f"Owners are users with roles: [{OWNER_ROLE}] in the configuration.")
        live = self._live_policies()
        if not live.reload():
            raise ConsoleError(sqlstate.CONFIG_FILE_ERROR,
                               "the policies did not load; the previous policies stay in force",
                               detail=live.last_error)
        log.info("console: policies reloaded by %s", self.user)
        if self.server.link is not None:
            self.server.link.note("reload")
        policies = live.current
        return _rows("RELOAD", ["policies", "files"],
                     [(str(len(policies.policies)), str(len(policies.files)))])


def session_rows(server: ProxyServer) -> list[tuple[float, tuple[str | None, ...]]]:
    """SHOW SESSIONS's rows of this process, each with when it opened (to sort by)."""
    rows: list[tuple[float, tuple[str | None, ...]]] = []
    for session in server.sessions:
        user = resource = account = application = None
        if session.info is not None:
            info = session.info
            user, resource, account = info.user, info.resource, info.account
            application = info.application_name
        elif session.console is not None:
            user, resource = session.console.user, CONSOLE_DATABASE
            application = session.console.application_name
        held = session.held
        request = held.request if isinstance(held, StatementHold) else None
        rows.append((session.opened, (session.id, user, resource, account, session.peer,
                                      str(session.phase), application, _when(session.opened),
                                      request.id if request else None)))
    return rows


# -- rendering -------------------------------------------------------------------------------


def _rows(tag: str, columns: list[str], rows: Iterable[Sequence[str | None]]) -> bytes:
    out = [wire.row_description(columns)]
    out += [wire.data_row(list(row)) for row in rows]
    out.append(wire.command_complete(tag))
    return b"".join(out)


def _no_request(request_id: str) -> ConsoleError:
    return ConsoleError(sqlstate.UNDEFINED_OBJECT, f'request "{request_id}" does not exist',
                        hint="SHOW REQUESTS lists them.")


def _not_simple(message: str) -> bytes:
    return wire.error_response(
        sqlstate.FEATURE_NOT_SUPPORTED, message,
        hint="Send commands as simple Query messages: psql does; with asyncpg, "
             "Connection.execute() without arguments.",
    )


def _more_notice(count: int) -> bytes:
    if count < LIST_LIMIT:
        return b""
    return wire.notice_response(f"showing the newest {LIST_LIMIT} only")


def _when(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _globs(globs: tuple[str, ...] | None) -> str:
    return "*" if globs is None else ", ".join(globs)


def _progress(progress: workflow.Progress) -> str | None:
    """The current step's approvals, ``1/2`` (``step 2/3: 1/2`` with several steps)."""
    if progress.current_step is None:
        return None
    step = progress.steps[progress.current_step]
    if len(progress.steps) == 1:
        return step.count
    return f"step {step.index + 1}/{len(progress.steps)}: {step.count}"


def _left(progress: workflow.Progress) -> str | None:
    return None if progress.time_left is None else format_duration(progress.time_left)


def _may_vote(progress: workflow.Progress) -> str | None:
    return ", ".join(progress.may_vote) or None


def _one_line(text: str, width: int = SUMMARY_WIDTH) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _what(request: Request) -> str:
    subject = request.subject
    if request.subject_kind is SubjectKind.STATEMENT:
        return _one_line(str(subject.get("sql", "")))
    duration = format_duration(float(subject.get("duration") or 0))
    return _one_line(f"grant {', '.join(subject.get('kinds') or [])} for {duration}: "
                     f"{subject.get('reason') or ''}")


def request_row(request: Request, now: float) -> tuple[str | None, ...]:
    """One line of SHOW REQUESTS."""
    progress = workflow.progress(request, now)
    return (request.id, str(request.status), _progress(progress), request.requester,
            request.resource, request.account, _what(request),
            format_duration(now - request.created_at) + " ago", _left(progress),
            _may_vote(progress))


def _parameter(param: Mapping[str, Any]) -> str:
    value = param.get("value")
    kind = f"{param.get('format', 'text')}, type oid {param.get('type_oid', 0)}"
    if value is None:
        return f"NULL ({kind})"
    if param.get("format") == "binary" or param.get("hex"):
        return f"\\x{value} ({kind})"
    return "'" + str(value).replace("'", "''") + f"' ({kind})"


def request_fields(request: Request, now: float) -> list[tuple[str, str | None]]:
    """SHOW REQUEST: one (field, value) row per fact, steps and votes in order."""
    progress = workflow.progress(request, now)
    subject = request.subject
    fields: list[tuple[str, str | None]] = [
        ("id", request.id),
        ("status", str(request.status)),
        ("kind", str(request.subject_kind)),
        ("requester", request.requester),
        ("resource", request.resource),
        ("account", request.account),
        ("policies", ", ".join(request.policies)),
    ]
    if request.subject_kind is SubjectKind.STATEMENT:
        fields.append(("statement", str(subject.get("sql", ""))))
        for index, param in enumerate(subject.get("params") or [], start=1):
            fields.append((f"parameter ${index}", _parameter(param)))
        session = subject.get("session") or {}
        for key in ("database", "search_path", "role"):
            if session.get(key):
                fields.append((key, str(session[key])))
    else:
        fields.append(("duration", format_duration(float(subject.get("duration") or 0))))
        fields.append(("reason", subject.get("reason")))
    fields.append(("kinds", ", ".join(subject.get("kinds") or [])))
    fields.append(("tables", ", ".join(subject.get("tables") or []) or None))
    fields.append(("submitted", f"{_when(request.created_at)} "
                                f"({format_duration(now - request.created_at)} ago)"))
    if request.status is Status.PENDING:
        fields.append(("expires", f"{_when(request.expires_at)} ({_left(progress)} left)"))
    if request.approved_until is not None:
        lapse = f" ({_left(progress)} left)" if progress.time_left is not None else ""
        fields.append(("approved until", f"{_when(request.approved_until)}{lapse}"))
    for step in progress.steps:
        snapshot = request.steps[step.index]
        state = "current" if step.current else ("done" if step.done else "waiting")
        approved = f" by {', '.join(step.approved_by)}" if step.approved_by else ""
        fields.append((f"step {step.index + 1}/{len(progress.steps)}",
                       f"{step.name}: {step.count} approvals{approved} ({state}); "
                       f"approvers: {', '.join(snapshot.approvers)}"))
    for vote in request.votes:
        verb = "approved" if vote.decision == "approve" else "denied"
        note = f": {vote.note}" if vote.note else ""
        fields.append(("vote", f"{vote.user} {verb} step {vote.step_index + 1} "
                               f"at {_when(vote.at)}{note}"))
    if request.note:
        fields.append(("note", request.note))
    if request.error:
        fields.append(("error", request.error))
    if request.status is Status.PENDING:
        fields.append(("may vote", _may_vote(progress)))
    fields.append(("summary", progress.summary()))
    return fields
