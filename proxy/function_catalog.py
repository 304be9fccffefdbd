"""Each resource's functions and their volatility, read from the catalog for the classifier.

Owns: reading, on a separate upstream connection as the session's account,
every function of a resource (name, whether a call may write, whether it is
a system function) and the relations whose reading runs one of ours (views
that call one, directly or through other views, and tables whose row-level
security policies do); keeping that per resource, read again every
``functions.refresh``; and what the classifier gets for a session
(``view``). With it, a read is a write when it calls a volatile function
outside ``pg_catalog``/``information_schema`` (``functions.user: all``:
any function there), an aggregate whose support functions are volatile, a
function the last read did not see, or reads such a relation.

Fail closed: a resource's functions are read before its first session is
let in (``ensure``); when that read fails the session is refused, since
function calls could not be told apart. A failed refresh keeps the names
read before and is retried. After a statement that may change functions
(DDL, or something the classifier cannot read, such as DO or CALL) is let
through or has run, no function call is vouched for and every view or
table with row-level security of ours counts as running one, on that
resource, until a read that started ``SETTLE`` after the last such event
has finished; the session that sent it stays that strict for good, and
every later statement of it counts as such an event (its changes reach the
catalog's connection only when its transaction commits).

Known limits: a function reached only through an operator, a cast, a
domain's CHECK, attribute notation (``t.f``) or a default argument is not
seen; a cursor declared before a change runs the function as it is when
fetched; another pgvouch replica learns of a change at its next refresh.
PostgreSQL lets a STABLE function call a VOLATILE one: ``functions.user:
all`` counts every function of ours.

Must not: classify (``policies.classify`` does), decide, or send anything
but the fixed catalog queries below.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from config.settings import Account, FunctionSettings, Resource
from proxy import wire
from proxy.upstream import Upstream, UpstreamError, connect

log = logging.getLogger("pgvouch.functions")

APPLICATION_NAME = "pgvouch function catalog"
_SYSTEM = "('pg_catalog', 'information_schema')"
# Every function: schema, name (as stored: lowercased here the way the classifier
# lowercases identifiers), whether a call may write, whether it is a system function.
# An aggregate counts as volatile when one of its support functions is (PostgreSQL
# stores aggregates as immutable whatever their step functions do).
FUNCTIONS_SQL = f"""
SELECT n.nspname, p.proname,
       (p.provolatile = 'v' OR EXISTS (
          SELECT 1 FROM pg_catalog.pg_aggregate a
          JOIN pg_catalog.pg_proc s ON s.oid IN (a.aggtransfn, a.aggfinalfn, a.aggcombinefn,
               a.aggserialfn, a.aggdeserialfn, a.aggmtransfn, a.aggminvtransfn, a.aggmfinalfn)
          WHERE a.aggfnoid = p.oid AND s.provolatile = 'v'))::text,
       (n.nspname IN {_SYSTEM})::text
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
"""
# Relations whose reading runs a function of our own: views (through their rewrite
# rules, transitively through other views) and tables whose row-level security
# policies call one. {calls} selects the functions that count (volatile ones, or all).
RELATIONS_SQL = """
WITH RECURSIVE counted AS (
  SELECT p.oid FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
  WHERE n.nspname NOT IN {system} AND {calls}
), rel(oid) AS (
  SELECT r.ev_class FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
  WHERE d.classid = 'pg_catalog.pg_rewrite'::regclass
    AND d.refclassid = 'pg_catalog.pg_proc'::regclass AND d.refobjid IN (SELECT oid FROM counted)
  UNION
  SELECT pol.polrelid FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_policy pol ON pol.oid = d.objid
  WHERE d.classid = 'pg_catalog.pg_policy'::regclass
    AND d.refclassid = 'pg_catalog.pg_proc'::regclass AND d.refobjid IN (SELECT oid FROM counted)
  UNION
  SELECT r.ev_class FROM rel
  JOIN pg_catalog.pg_depend d ON d.refclassid = 'pg_catalog.pg_class'::regclass
   AND d.refobjid = rel.oid AND d.classid = 'pg_catalog.pg_rewrite'::regclass
  JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
)
SELECT n.nspname, c.relname, 'runs' FROM rel
JOIN pg_catalog.pg_class c ON c.oid = rel.oid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
UNION ALL
SELECT n.nspname, c.relname, 'may' FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname NOT IN {system} AND (c.relkind = 'v' OR c.relrowsecurity)
"""
STATEMENT_TIMEOUT = 10.0  # seconds each catalog query may run
RETRY_AFTER = 5.0  # seconds between attempts when a refresh fails
SETTLE = 1.0  # seconds after the last change before a read can end the strict window
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")


class CatalogError(Exception):
    """A resource's functions could not be read; the message names the resource and why."""


@dataclass(frozen=True)
class Functions:
    """One read of a resource's functions and relations (names lowercased, bare and qualified)."""

    volatile: frozenset[str]  # calls that make a read a write (outside the system schemas)
    user: frozenset[str]  # every function outside the system schemas
    known: frozenset[str]  # every function
    runs: frozenset[str]  # relations whose reading runs a counted function
    may_run: frozenset[str]  # every view and every table with row-level security (ours)
    started_at: float  # when the read began (monotonic clock)


def _names(schema: str, name: str) -> tuple[str, str]:
    # the classifier lowercases identifiers with str.lower(); so must the catalog
    # (PostgreSQL's lower() on type name only folds ASCII)
    return name.lower(), f"{schema.lower()}.{name.lower()}"


def functions_from_rows(rows: Iterable[tuple[str, str, str, str]],
                        relations: Iterable[tuple[str, str, str]] = (), *,
                        started_at: float, count_all: bool = False) -> Functions:
    """Rows as :data:`FUNCTIONS_SQL` and :data:`RELATIONS_SQL` return them.

    ``count_all``: every function outside the system schemas counts as one that
    may write (``functions.user: all``), not only volatile ones.
    """
    volatile: set[str] = set()
    user: set[str] = set()
    known: set[str] = set()
    for schema, name, writes, system in rows:
        names = _names(schema, name)
        known.update(names)
        if system == "true":
            continue
        user.update(names)
        if count_all or writes == "true":
            volatile.update(names)
    runs: set[str] = set()
    may_run: set[str] = set()
    for schema, name, what in relations:
        names = _names(schema, name)
        may_run.update(names)
        if what == "runs":
            runs.update(names)
    return Functions(frozenset(volatile), frozenset(user), frozenset(known), frozenset(runs),
                     frozenset(may_run), started_at)


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


async def _rows(upstream: Upstream, sql: str, width: int, budget: float) -> list[tuple[str, ...]]:
    upstream.protocol.write(wire.query(sql))
    rows: list[tuple[str, ...]] = []
    error: str | None = None
    async with asyncio.timeout(budget):
        while True:
            kind, body = await upstream.protocol.inbox.read_message()
            if kind == ord("Z"):
                break
            if kind == ord("D"):
                values = _columns(body)
                if len(values) != width or any(v is None for v in values):
                    raise ValueError("unexpected row from the catalog query")
                rows.append(tuple(v for v in values if v is not None))
            elif kind == ord("E") and error is None:
                error = _error_text(body)
    if error is not None:
        raise CatalogError(f"reading pg_proc failed: {error}")
    return rows


async def read_functions(resource: Resource, account: Account, started_at: float,
                         count_all: bool = False) -> Functions:
    """Run the catalog queries on a fresh upstream connection as ``account``."""
    params = {"application_name": APPLICATION_NAME,
              "statement_timeout": str(int(STATEMENT_TIMEOUT * 1000))}
    try:
        upstream = await connect(resource, account, params)
    except UpstreamError as exc:
        raise CatalogError(str(exc)) from None
    calls = "true" if count_all else "p.provolatile = 'v'"
    budget = STATEMENT_TIMEOUT + resource.connect_timeout
    try:
        functions = await _rows(upstream, FUNCTIONS_SQL, 4, budget)
        relations = await _rows(upstream, RELATIONS_SQL.format(system=_SYSTEM, calls=calls), 3,
                                budget)
    except (OSError, TimeoutError, wire.ProtocolError, ValueError, struct.error) as exc:
        why = "no answer in time" if isinstance(exc, TimeoutError) else str(exc) or "lost"
        raise CatalogError(f"reading pg_proc failed: {why}") from None
    finally:
        upstream.protocol.close()
    return functions_from_rows(
        [(r[0], r[1], r[2], r[3]) for r in functions], [(r[0], r[1], r[2]) for r in relations],
        started_at=started_at, count_all=count_all,
    )


Reader = Callable[[Resource, Account, float, bool], Awaitable[Functions]]
# What the classifier gets: (volatile functions, known functions, relations that run them)
View = tuple[frozenset[str], frozenset[str], frozenset[str]]
_EVERY_CALL: frozenset[str] = frozenset()  # as "known": no function is vouched for


def _retrieve(task: asyncio.Task[Functions]) -> None:
    if not task.cancelled():
        task.exception()


class FunctionCatalog:
    """The functions of every resource sessions use, kept fresh; see the module doc.

    ``view`` is on every statement's path, so it is one dictionary lookup: the
    view of each resource is recomputed when a read finishes or a change is
    noted, and timers (not ``view``) start the periodic and post-change reads.
    """

    def __init__(self, settings: FunctionSettings, reader: Reader = read_functions,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.refresh = settings.refresh
        self.count_all = settings.user == "all"
        self._reader = reader
        self._clock = clock
        self._functions: dict[str, Functions] = {}
        self._views: dict[str, View] = {}
        self._login: dict[str, tuple[Resource, Account]] = {}  # how to read a resource again
        self._loading: dict[str, asyncio.Task[Functions]] = {}
        self._changed_at: dict[str, float] = {}  # resource → last statement that may change functions
        self._timers: dict[str, asyncio.TimerHandle] = {}
        # tells the other workers of a change (workers: above 1), see ``note_change``
        self.on_change: Callable[[str], None] | None = None

    async def ensure(self, resource: Resource, account: Account) -> None:
        """Return once ``resource``'s functions are known; :class:`CatalogError` if they cannot be."""
        self._login.setdefault(resource.name, (resource, account))
        if resource.name in self._functions:
            return
        task = self._loading.get(resource.name) or self._start(resource.name)
        try:
            await asyncio.shield(task)
        except CatalogError as exc:
            raise CatalogError(
                f"pgvouch could not read the functions of resource {resource.name!r}, which it "
                f"needs to classify function calls: {exc}"
            ) from None

    def view(self, resource: str) -> View | None:
        """What the classifier gets for a session on ``resource``; None when never read.

        Normally the volatile functions, every known function and the relations
        that run a volatile one. While a change may be in flight (see the module
        doc), no function call is vouched for and every view or table with
        row-level security of ours counts as running one.
        """
        return self._views.get(resource)

    def strict(self, resource: str) -> View:
        """The view while a change may be in flight, whatever the catalog says (a session
        that changed functions itself, see ``proxy.policy_decider``)."""
        functions = self._functions.get(resource)
        if functions is None:
            return frozenset(), _EVERY_CALL, frozenset()
        return _strict(functions)

    def note_change(self, resource: str, shared: bool = True) -> None:
        """A statement that may create or change functions was let through or has run
        (``shared``: in this process, so the other workers are told; not: in another worker)."""
        if shared and self.on_change is not None:
            self.on_change(resource)
        self._changed_at[resource] = self._clock()
        functions = self._functions.get(resource)
        if functions is not None:
            self._views[resource] = _strict(functions)
        self._schedule(resource, SETTLE)

    # -- reading ------------------------------------------------------------------------
    def _schedule(self, resource: str, delay: float) -> None:
        """(Re)arm the read of ``resource`` ``delay`` seconds from now."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (tests): ensure() reads when one runs
            return
        timer = self._timers.pop(resource, None)
        if timer is not None:
            timer.cancel()
        self._timers[resource] = loop.call_later(delay, self._due, resource)

    def _due(self, resource: str) -> None:
        self._timers.pop(resource, None)
        if resource in self._loading:  # the read under way may predate a change: look again
            self._schedule(resource, SETTLE)
        elif resource in self._login:
            self._start(resource)

    def _start(self, name: str) -> asyncio.Task[Functions]:
        task = asyncio.get_running_loop().create_task(self._read(name))
        self._loading[name] = task
        task.add_done_callback(_retrieve)  # a failed background refresh is logged, not raised
        return task

    async def _read(self, name: str) -> Functions:
        resource, account = self._login[name]
        started = self._clock()
        try:
            try:
                functions = await self._reader(resource, account, started, self.count_all)
            except CatalogError:
                raise
            except Exception as exc:  # e.g. the account's password is not configured
                raise CatalogError(str(exc) or type(exc).__name__) from None
        except CatalogError as exc:
            if name in self._functions:
                log.warning("functions of resource %s not read again (the last read stays): %s",
                            name, exc)
                self._schedule(name, RETRY_AFTER)
            else:
                log.error("functions of resource %s cannot be read: %s", name, exc)
            raise
        finally:
            self._loading.pop(name, None)
        self._functions[name] = functions
        changed = self._changed_at.get(name)
        if changed is not None and started < changed + SETTLE:
            self._views[name] = _strict(functions)  # a change may postdate what was read
            self._schedule(name, max(0.0, changed + SETTLE - self._clock()))
        else:
            self._views[name] = (functions.volatile, functions.known, functions.runs)
            self._schedule(name, self.refresh)
        log.info("functions of resource %s read: %d names, %d that may write, %d relations "
                 "that call them", name, len(functions.known), len(functions.volatile),
                 len(functions.runs))
        return functions


def _strict(functions: Functions) -> View:
    return functions.volatile, _EVERY_CALL, functions.may_run | functions.runs
