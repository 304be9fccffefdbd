"""Impact previews: ``EXPLAIN (FORMAT JSON)`` of a held statement, on the side.

Owns: making the preview of a statement request and attaching it through
the workflow (``request.previewed``): a separate upstream connection as the
request's account, opened by ``proxy.upstream`` (the same TLS and
authentication as a session), and on it, per explainable statement,
``BEGIN READ ONLY``, one extended-protocol Parse/Bind/Execute of
``EXPLAIN (FORMAT JSON) <statement>`` with the client's parameters bound as
the client sent them (type oids, text or binary formats), then ``ROLLBACK``.
Previews run as tasks once a request is created, so the held session's
NOTICE never waits for one; before an approval is accepted on a missing or
stale preview, :meth:`PreviewRunner.refresh` makes a new one and waits for
it (``ApprovalService.before_approve``).

Security: only EXPLAIN without ANALYZE ever runs. Each text sent is checked
with PostgreSQL's own parser to be one EXPLAIN whose only option is FORMAT
JSON, of one statement of an explainable type (``approvals.preview``);
Parse itself refuses several commands in one prepared statement; the
transaction is read-only and rolled back; ``statement_timeout`` bounds the
work and the size of a plan is capped. The account's password is read by
``proxy.upstream`` and never logged.

Must not: decide whether a statement runs, delay a held session, or send
anything but the fixed statements above.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pglast import ast
from pglast import parser as pg_parser

from approvals import preview, workflow
from approvals.model import JSONObject, Request, Status, SubjectKind
from approvals.service import ApprovalService
from approvals.store import StoreError
from approvals.workflow import Event, EventType, WorkflowError
from config.settings import Settings
from proxy import wire
from proxy.upstream import Upstream, UpstreamError, connect

log = logging.getLogger("pgvouch.preview")

EXPLAIN_PREFIX = "EXPLAIN (FORMAT JSON) "
APPLICATION_NAME = "pgvouch impact preview"
MAX_CONCURRENT = 4  # upstream connections used for previews at once, per process
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")


class PreviewError(Exception):
    """EXPLAIN could not give a plan; the message is shown to reviewers."""


# -- what to explain ---------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One statement of a request: explained, or the reason it is not."""

    sql: str
    params: tuple[Mapping[str, Any], ...] = ()
    skip: str | None = None  # EXPLAIN does not apply: why
    error: str | None = None  # cannot be explained: why


def jobs_for(subject: Mapping[str, Any]) -> list[Job]:
    """The statements of a statement subject, each with its own bound parameters.

    The proxy records which parameters belong to which statement of the unit
    (``subject["statements"]``); a simple Query holding several statements
    is split with PostgreSQL's parser. Requests made before that record
    existed fall back to the whole text and every parameter.
    """
    params: list[Mapping[str, Any]] = list(subject.get("params") or ())
    entries = subject.get("statements")
    if not isinstance(entries, list):
        entries = [{"sql": subject.get("sql"), "param_indexes": list(range(len(params)))}]
    jobs: list[Job] = []
    for entry in entries:
        sql = entry.get("sql") if isinstance(entry, Mapping) else None
        if not isinstance(sql, str):
            jobs.append(Job("", skip="the proxy could not read this statement (a FunctionCall or "
                                     "an Execute of a portal it never saw)"))
            continue
        indexes = entry.get("param_indexes") or []
        if any(not isinstance(i, int) or not 0 <= i < len(params) for i in indexes):
            jobs.append(Job(sql, error="the request's parameters do not match its statements"))
            continue
        bound = tuple(params[i] for i in indexes)
        try:
            texts, raws = pg_parser.split(sql), pg_parser.parse_sql(sql)
        except pg_parser.ParseError as exc:
            jobs.append(Job(sql, error=f"cannot parse the statement: {exc}"))
            continue
        if len(texts) != len(raws) or (bound and len(texts) != 1):
            jobs.append(Job(sql, error="cannot tell the statements of this text apart"))
            continue
        for text, raw in zip(texts, raws, strict=True):
            node = type(raw.stmt).__name__
            if node in preview.EXPLAINABLE:
                jobs.append(Job(text, bound))
            else:
                jobs.append(Job(text, skip=f"EXPLAIN does not apply to this statement ({node})"))
    return jobs


def explain_text(sql: str) -> str:
    """``EXPLAIN (FORMAT JSON) sql``, after checking that this is all it is; else PreviewError."""
    text = EXPLAIN_PREFIX + sql
    try:
        raws = pg_parser.parse_sql(text)
    except pg_parser.ParseError as exc:
        raise PreviewError(f"cannot parse the statement: {exc}") from None
    if len(raws) != 1 or not isinstance(raws[0].stmt, ast.ExplainStmt):
        raise PreviewError("the statement is not a single statement EXPLAIN can take")
    explain = raws[0].stmt
    options = [(o.defname, getattr(o.arg, "sval", None)) for o in explain.options or ()]
    if options != [("format", "json")] or type(explain.query).__name__ not in preview.EXPLAINABLE:
        raise PreviewError("the statement is not a single statement EXPLAIN can take")
    return text


# -- the protocol exchange ---------------------------------------------------------------


def _parse(text: str, type_oids: Sequence[int]) -> bytes:
    body = wire.cstr("") + wire.cstr(text) + _I16.pack(len(type_oids))
    body += b"".join(_U32.pack(oid & 0xFFFFFFFF) for oid in type_oids)
    return wire.message(b"P", body)


def _bind(formats: Sequence[int], values: Sequence[bytes | None]) -> bytes:
    body = wire.cstr("") + wire.cstr("") + _I16.pack(len(formats))
    body += b"".join(_I16.pack(code) for code in formats) + _I16.pack(len(values))
    for value in values:
        body += _I32.pack(-1) if value is None else _I32.pack(len(value)) + value
    return wire.message(b"B", body + _I16.pack(0))  # results in text


_EXECUTE = wire.message(b"E", wire.cstr("") + _I32.pack(0))


def _param_bytes(param: Mapping[str, Any]) -> bytes | None:
    """A bound value as the client sent it (``approvals.model.bound_param`` in reverse)."""
    value = param.get("value")
    if value is None:
        return None
    if param.get("format") == "binary" or param.get("hex"):
        return bytes.fromhex(str(value))
    return str(value).encode("utf-8")


def _error_text(body: bytes) -> str:
    fields = wire.decode_error_fields(b"E\0\0\0\0" + body, 0, len(body) + 5)
    message = fields.get("M", "unknown error")
    return f"{message} (SQLSTATE {fields['C']})" if "C" in fields else message


def _first_column(body: bytes) -> bytes | None:
    (count,) = _I16.unpack_from(body, 0)
    if count < 1:
        return None
    (length,) = _I32.unpack_from(body, 2)
    return None if length < 0 else body[6 : 6 + length]


async def _until_ready(upstream: Upstream) -> tuple[list[bytes], str | None]:
    """Read to ReadyForQuery: the first column of each DataRow and the first error."""
    rows: list[bytes] = []
    error: str | None = None
    inbox = upstream.protocol.inbox
    while True:
        kind, body = await inbox.read_message()
        if kind == ord("Z"):
            return rows, error
        if kind == ord("D"):
            value = _first_column(body)
            if value is not None:
                rows.append(value)
        elif kind == ord("E") and error is None:
            error = _error_text(body)


async def _simple(upstream: Upstream, sql: str) -> None:
    upstream.protocol.write(wire.query(sql))
    _, error = await _until_ready(upstream)
    if error is not None:
        raise PreviewError(f"{sql} failed: {error}")


async def explain_one(upstream: Upstream, job: Job, budget: int = preview.MAX_PLAN_CHARS) -> JSONObject:
    """The plan of one statement as a preview entry; PreviewError if EXPLAIN refused it."""
    text = explain_text(job.sql)
    await _simple(upstream, "BEGIN READ ONLY")
    try:
        upstream.protocol.write(
            _parse(text, [int(p.get("type_oid") or 0) for p in job.params])
            + _bind([1 if p.get("format") == "binary" else 0 for p in job.params],
                    [_param_bytes(p) for p in job.params])
            + _EXECUTE + wire.SYNC
        )
        rows, error = await _until_ready(upstream)
    finally:
        await _simple(upstream, "ROLLBACK")
    if error is not None:
        raise PreviewError(error)
    try:
        plan = json.loads(rows[0])[0]["Plan"]
    except (IndexError, KeyError, TypeError, ValueError):
        raise PreviewError("EXPLAIN answered without a plan") from None
    return preview.explained(job.sql, plan, budget)


async def make_preview(settings: Settings, request: Request, clock: Callable[[], float]) -> JSONObject:
    """The preview document of ``request`` (never raises for what EXPLAIN or the upstream say)."""
    at = clock()
    jobs = jobs_for(request.subject)
    omitted = max(0, len(jobs) - preview.MAX_STATEMENTS)
    jobs = jobs[: preview.MAX_STATEMENTS]
    entries: list[JSONObject | None] = [
        preview.not_applicable(job.sql, job.skip) if job.skip is not None
        else preview.failed(job.sql, job.error) if job.error is not None else None
        for job in jobs
    ]
    todo = [index for index, entry in enumerate(entries) if entry is None]
    if todo:
        for index, entry in zip(todo, await _explain_all(settings, request, [jobs[i] for i in todo]),
                                strict=True):
            entries[index] = entry
    done = [entry for entry in entries if entry is not None]
    return preview.make_preview(done, at=at, stale_after=settings.preview.stale_after, omitted=omitted)


async def _explain_all(settings: Settings, request: Request, jobs: list[Job]) -> list[JSONObject]:
    resource = settings.resources.get(request.resource)
    account = None if resource is None else resource.accounts.get(request.account)
    if resource is None or account is None:
        why = f"resource {request.resource!r} / account {request.account!r} is no longer configured"
        return [preview.failed(job.sql, why) for job in jobs]
    timeout = settings.preview.timeout
    params = {"application_name": APPLICATION_NAME, "statement_timeout": f"{int(timeout * 1000)}"}
    search_path = (request.subject.get("session") or {}).get("search_path")
    if isinstance(search_path, str) and search_path:
        params["search_path"] = search_path
    try:
        upstream = await connect(resource, account, params)
    except UpstreamError as exc:
        return [preview.failed(job.sql, str(exc)) for job in jobs]
    entries: list[JSONObject] = []
    budget = preview.plan_budget(len(jobs))
    try:
        for job in jobs:
            try:
                async with asyncio.timeout(timeout + resource.connect_timeout):
                    entries.append(await explain_one(upstream, job, budget))
            except PreviewError as exc:
                entries.append(preview.failed(job.sql, str(exc)))
            except (OSError, TimeoutError, wire.ProtocolError) as exc:
                why = "no answer in time" if isinstance(exc, TimeoutError) else str(exc) or "lost"
                entries.append(preview.failed(job.sql, f"the preview connection failed: {why}"))
                break  # the connection is in an unknown state: the rest fail alike
    finally:
        upstream.protocol.close()
    for job in jobs[len(entries):]:
        entries.append(preview.failed(job.sql, "not explained: an earlier statement's preview failed"))
    return entries


# -- running previews for the approvals service ----------------------------------------------


class PreviewRunner:
    """Makes and attaches previews: after submit (a task) and before an approval (awaited)."""

    def __init__(self, service: ApprovalService, settings: Settings) -> None:
        self.service = service
        self.settings = settings
        self._running: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)

    def install(self) -> None:
        """Preview every new statement request, and refresh stale ones before approvals."""
        self.service.listeners.append(self.on_change)
        self.service.before_approve = self.refresh

    def on_change(self, request: Request, events: Sequence[Event]) -> None:
        if (request.subject_kind is SubjectKind.STATEMENT and request.status is Status.PENDING
                and any(event.type is EventType.CREATED for event in events)):
            self._start(request, "created", None)

    async def refresh(self, request: Request, user: str) -> None:
        """Make a new preview for ``user``'s approval and wait until it is stored."""
        running = self._running.get(request.id)
        if running is not None and not running.done():
            await asyncio.shield(running)  # the one made after submit is on its way
            current = await self.service.store.get(request.id)
            if current is None or not preview.needs_refresh(current.preview, self.service.clock()):
                return
            request = current
        await asyncio.shield(self._start(request, "approve", user))

    def _start(self, request: Request, trigger: str, user: str | None) -> asyncio.Task[None]:
        task = self._running.get(request.id)
        if task is not None and not task.done():
            return task
        task = asyncio.get_running_loop().create_task(self._run(request, trigger, user))
        self._running[request.id] = task
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[None]) -> None:
        for request_id, running in list(self._running.items()):
            if running is task:
                del self._running[request_id]

    async def _run(self, request: Request, trigger: str, user: str | None) -> None:
        try:
            async with self._slots:
                doc = await make_preview(self.settings, request, self.service.clock)
            await self.service.apply(
                request.id,
                lambda current, now: workflow.attach_preview(current, doc, now, trigger=trigger,
                                                             requested_by=user),
            )
            log.info("impact preview of %s: %s", request.id, preview.summary(doc))
        except WorkflowError as exc:
            log.info("impact preview of %s not kept: %s", request.id, exc.message)
        except StoreError as exc:
            log.warning("impact preview of %s not kept: the approvals store failed: %s",
                        request.id, exc)
        except Exception:
            log.exception("impact preview of %s failed", request.id)

    async def close(self) -> None:
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
