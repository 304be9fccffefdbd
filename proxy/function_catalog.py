"""Each resource's functions and their volatility, read from ``pg_proc`` for the classifier.

Owns: reading every function name of a resource with its volatility and
whether it lives in a system schema (``pg_catalog``, ``information_schema``),
on a separate upstream connection as the session's account; keeping the
result per resource, read again every ``functions.refresh``; and what the
classifier gets for a session (``view``): the names of volatile functions
outside the system schemas, and every known name. A read that calls a
volatile non-built-in function, or one the last read did not see (created
since), is then a write.

Fail closed: a resource's functions are read before its first session is
let in (``ensure``); when that read fails the session is refused, since
function calls could not be told apart. A failed refresh keeps the names
read before and is retried. After a statement that may change functions
(DDL, or something the classifier cannot read, such as DO or CALL) is
let through or has run, every function outside the system schemas counts
as volatile on that resource until a read that started ``refresh`` seconds
later has finished: ``ALTER FUNCTION f() VOLATILE`` cannot make ``SELECT
f()`` pass as a read in between. A DDL whose transaction commits later than
that is seen by the next periodic read.

Must not: classify (``policies.classify`` does), decide, or send anything
but the fixed catalog query below.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from config.settings import Account, FunctionSettings, Resource
from proxy import wire
from proxy.upstream import UpstreamError, connect

log = logging.getLogger("pgvouch.functions")

APPLICATION_NAME = "pgvouch function catalog"
SYSTEM_SCHEMAS = ("pg_catalog", "information_schema")
LOOKUP_SQL = (
    "SELECT lower(n.nspname), lower(p.proname), p.provolatile::text "
    "FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace"
)
STATEMENT_TIMEOUT = 10.0  # seconds the catalog query may run
RETRY_AFTER = 5.0  # seconds between attempts when a refresh fails
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")


class CatalogError(Exception):
    """A resource's functions could not be read; the message names the resource and why."""


@dataclass(frozen=True)
class Functions:
    """One read of a resource's functions (names lowercased, bare and schema-qualified)."""

    volatile: frozenset[str]  # volatile, outside the system schemas
    user: frozenset[str]  # every function outside the system schemas
    known: frozenset[str]  # every function
    started_at: float  # when the read began (monotonic clock)


def functions_from_rows(rows: Iterable[tuple[str, str, str]], started_at: float) -> Functions:
    """``rows`` of (schema, name, provolatile) as :data:`LOOKUP_SQL` returns them."""
    volatile: set[str] = set()
    user: set[str] = set()
    known: set[str] = set()
    for schema, name, volatility in rows:
        names = (name, f"{schema}.{name}")
        known.update(names)
        if schema in SYSTEM_SCHEMAS:
            continue
        user.update(names)
        if volatility == "v":
            volatile.update(names)
    return Functions(frozenset(volatile), frozenset(user), frozenset(known), started_at)


def _columns(body: bytes) -> list[str | None]:
    (count,) = _I16.unpack_from(body, 0)
    pos = 2
    values: list[str | None] = []
    for _ in range(count):
        (length,) = _I32.unpack_from(body, pos)
        pos += 4
        if length < 0:
            values.append(None)
            continue
        values.append(body[pos : pos + length].decode("utf-8"))
        pos += length
    return values


def _error_text(body: bytes) -> str:
    fields = wire.decode_error_fields(b"E\0\0\0\0" + body, 0, len(body) + 5)
    return fields.get("M", "unknown error")


async def read_functions(resource: Resource, account: Account, started_at: float) -> Functions:
    """Run :data:`LOOKUP_SQL` on a fresh upstream connection as ``account``."""
    params = {"application_name": APPLICATION_NAME,
              "statement_timeout": str(int(STATEMENT_TIMEOUT * 1000))}
    try:
        upstream = await connect(resource, account, params)
    except UpstreamError as exc:
        raise CatalogError(str(exc)) from None
    rows: list[tuple[str, str, str]] = []
    error: str | None = None
    try:
        upstream.protocol.write(wire.query(LOOKUP_SQL))
        async with asyncio.timeout(STATEMENT_TIMEOUT + resource.connect_timeout):
            while True:
                kind, body = await upstream.protocol.inbox.read_message()
                if kind == ord("Z"):
                    break
                if kind == ord("D"):
                    schema, name, volatility = _columns(body)
                    if schema is not None and name is not None and volatility is not None:
                        rows.append((schema, name, volatility))
                elif kind == ord("E") and error is None:
                    error = _error_text(body)
    except (OSError, TimeoutError, wire.ProtocolError, ValueError, struct.error) as exc:
        why = "no answer in time" if isinstance(exc, TimeoutError) else str(exc) or "lost"
        raise CatalogError(f"reading pg_proc failed: {why}") from None
    finally:
        upstream.protocol.close()
    if error is not None:
        raise CatalogError(f"reading pg_proc failed: {error}")
    return functions_from_rows(rows, started_at)


Reader = Callable[[Resource, Account, float], Awaitable[Functions]]


def _retrieve(task: asyncio.Task[Functions]) -> None:
    if not task.cancelled():
        task.exception()


class FunctionCatalog:
    """The functions of every resource sessions use, kept fresh; see the module doc."""

    def __init__(self, settings: FunctionSettings, reader: Reader = read_functions,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.refresh = settings.refresh
        self._reader = reader
        self._clock = clock
        self._functions: dict[str, Functions] = {}
        self._login: dict[str, tuple[Resource, Account]] = {}  # how to read a resource again
        self._loading: dict[str, asyncio.Task[Functions]] = {}
        self._changed_at: dict[str, float] = {}  # resource → last statement that may change functions
        self._failed_at: dict[str, float] = {}

    async def ensure(self, resource: Resource, account: Account) -> None:
        """Return once ``resource``'s functions are known; :class:`CatalogError` if they cannot be."""
        self._login.setdefault(resource.name, (resource, account))
        if resource.name in self._functions:
            return
        task = self._loading.get(resource.name) or self._start(resource.name, (resource, account))
        try:
            await asyncio.shield(task)
        except CatalogError as exc:
            raise CatalogError(
                f"pgvouch could not read the functions of resource {resource.name!r}, which it "
                f"needs to classify function calls: {exc}"
            ) from None

    def view(self, resource: str) -> tuple[frozenset[str], frozenset[str]] | None:
        """(volatile, known) names for the classifier, or None when never read."""
        functions = self._functions.get(resource)
        if functions is None:
            return None
        now = self._clock()
        if now - functions.started_at >= self.refresh:
            self._refresh_soon(resource, now)
        changed = self._changed_at.get(resource)
        if changed is not None and functions.started_at < changed + self.refresh:
            if now >= changed + self.refresh:
                self._refresh_soon(resource, now)
            return functions.user, functions.known  # every user function may be volatile now
        return functions.volatile, functions.known

    def note_change(self, resource: str) -> None:
        """A statement that may create or change functions was let through or has run."""
        self._changed_at[resource] = self._clock()

    # -- reading ------------------------------------------------------------------------
    def _refresh_soon(self, resource: str, now: float) -> None:
        login = self._login.get(resource)
        if login is None or resource in self._loading:
            return
        if now - self._failed_at.get(resource, -RETRY_AFTER) < RETRY_AFTER:
            return
        with contextlib.suppress(RuntimeError):  # no running loop: the next view() retries
            self._start(resource, login)

    def _start(self, name: str, login: tuple[Resource, Account]) -> asyncio.Task[Functions]:
        task = asyncio.get_running_loop().create_task(self._read(name, login))
        self._loading[name] = task
        task.add_done_callback(_retrieve)  # a failed background refresh is logged, not raised
        return task

    async def _read(self, name: str, login: tuple[Resource, Account]) -> Functions:
        started = self._clock()
        try:
            try:
                functions = await self._reader(login[0], login[1], started)
            except CatalogError:
                raise
            except Exception as exc:  # e.g. the account's password is not configured
                raise CatalogError(str(exc) or type(exc).__name__) from None
        except CatalogError as exc:
            self._failed_at[name] = self._clock()
            if name in self._functions:
                log.warning("functions of resource %s not read again (the last read stays): %s",
                            name, exc)
            else:
                log.error("functions of resource %s cannot be read: %s", name, exc)
            raise
        finally:
            self._loading.pop(name, None)
        self._functions[name] = functions
        log.info("functions of resource %s read: %d names, %d volatile outside the system schemas",
                 name, len(functions.known), len(functions.volatile))
        return functions
