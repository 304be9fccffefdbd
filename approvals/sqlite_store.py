"""The embedded store: one SQLite file, zero setup (``store: sqlite:///path``).

Owns: the SQLite schema and its versioned migrations, and the
:class:`~approvals.store.Store` contract on top of stdlib ``sqlite3``.

Must not: block the event loop (every call runs on the store's single
worker thread), decide transitions (``workflow``) or define the audit format
(``audit``).

Durability and concurrency
    WAL journal with ``synchronous=FULL``: each commit fsyncs the WAL before
    the call returns, so an approval that was reported stored survives a
    crash or power loss (``NORMAL`` would only promise that in WAL mode the
    database stays consistent, possibly losing the last commits: not good
    enough for "forwarded only after approved is durable"). One connection
    on one dedicated thread is the one writer; every write transaction is
    ``BEGIN IMMEDIATE``, so another process opening the same file (a second
    store, ``pgvouch audit verify``) waits for the write lock instead of
    failing halfway, and compare-and-swap and the audit chain head stay
    serialized across them. Any SQLite or OS error becomes
    :class:`~approvals.store.StoreUnavailable`; the connection is dropped and
    reopened on the next call.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, TypeVar

from approvals.audit import (
    AuditEvent,
    ChainHead,
    ChainVerifier,
    NewAuditEvent,
    Verification,
    data_text,
    from_stored,
    parse_event,
    seal,
)
from approvals.model import Request, Status, canonical_json
from approvals.request_queries import RequestQueries
from approvals.store import (
    ID_ATTEMPTS,
    ApprovalMode,
    Conflict,
    Delivery,
    DeliveryStatus,
    Effects,
    NotFound,
    StoreError,
    StoreUnavailable,
    delivery_status,
    request_doc,
    request_from_doc,
    retry_id,
)

T = TypeVar("T")

GENESIS = "0" * 64
MIGRATIONS: list[str] = [
    f"""
    CREATE TABLE requests (
        id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        subject_kind TEXT NOT NULL,
        requester TEXT NOT NULL,
        resource TEXT NOT NULL,
        account TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        approved_until REAL,
        version INTEGER NOT NULL,
        doc TEXT NOT NULL
    );
    CREATE INDEX requests_created ON requests (created_at);
    CREATE INDEX requests_status_created ON requests (status, created_at);
    CREATE INDEX requests_fingerprint ON requests (fingerprint);
    CREATE INDEX requests_pending_expiry ON requests (expires_at) WHERE status = 'pending';
    CREATE INDEX requests_grants ON requests (requester, resource, account)
        WHERE subject_kind = 'grant' AND status = 'approved';

    CREATE TABLE audit_events (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        type TEXT NOT NULL,
        actor TEXT NOT NULL,
        request_id TEXT,
        data TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE INDEX audit_events_at ON audit_events (at);
    CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
        BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
    CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
        BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
    CREATE TABLE audit_head (
        singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
        last_id INTEGER NOT NULL,
        last_hash TEXT NOT NULL
    );
    INSERT INTO audit_head VALUES (1, 0, '{GENESIS}');

    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        channel TEXT NOT NULL,
        target TEXT NOT NULL,
        payload TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        next_attempt_at REAL NOT NULL,
        lease_until REAL,
        last_error TEXT,
        delivered_at REAL
    );
    CREATE INDEX deliveries_due ON deliveries (status, next_attempt_at);
    """,
    """
    CREATE TABLE approval_modes (
        glob TEXT PRIMARY KEY,
        enabled INTEGER NOT NULL,
        reason TEXT,
        actor TEXT NOT NULL,
        changed_at REAL NOT NULL
    );
    """,
]

_REQUEST_COLUMNS = (
    "status, subject_kind, requester, resource, account, fingerprint, created_at, expires_at, "
    "approved_until, version, doc"
)
_DELIVERY_COLUMNS = (
    "id, channel, target, payload, status, attempts, created_at, next_attempt_at, lease_until, "
    "last_error, delivered_at"
)


def split_statements(script: str) -> list[str]:
    """A migration script as single statements (trigger bodies keep their semicolons)."""
    statements: list[str] = []
    current = ""
    for piece in script.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            if current.strip(" \n\t;"):
                statements.append(current.strip())
            current = ""
    return statements


class SqliteStore(RequestQueries):
    """:class:`~approvals.store.Store` on a SQLite file."""

    def __init__(self, path: str | Path, *, busy_timeout: float = 10.0) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgvouch-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    # -- plumbing --------------------------------------------------------------

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StoreUnavailable(f"the SQLite store {self.path} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, work)

    def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return work(self._connection())
        except (sqlite3.Error, OSError) as exc:
            self._drop_connection()
            raise StoreUnavailable(f"SQLite store {self.path}: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            # Switching a new file to WAL and the first migration can report
            # "locked" without waiting for the busy handler when several
            # processes open the same file at once: retry within busy_timeout.
            deadline = time.monotonic() + self._busy_timeout
            while True:
                try:
                    self._conn = self._open()
                    break
                except sqlite3.OperationalError as exc:
                    transient = "locked" in str(exc) or "busy" in str(exc)
                    if not transient or time.monotonic() >= deadline:
                        raise
                    time.sleep(0.05)
        return self._conn

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreUnavailable(f"SQLite store {self.path}: cannot use WAL (journal mode {mode})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.create_function("fnmatch", 2, fnmatchcase, deterministic=True)
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    @staticmethod
    @contextmanager
    def _write(conn: sqlite3.Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @staticmethod
    @contextmanager
    def _read(conn: sqlite3.Connection) -> Iterator[None]:
        """One snapshot for several reads."""
        conn.execute("BEGIN")
        try:
            yield
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        if self._schema_version(conn) == len(MIGRATIONS):
            return  # reconnecting must not need the write lock
        with self._write(conn):
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            newest = max(applied, default=0)
            if newest > len(MIGRATIONS):
                raise StoreUnavailable(
                    f"SQLite store {self.path} has schema version {newest}; this pgvouch knows "
                    f"{len(MIGRATIONS)} (upgrade pgvouch)"
                )
            for version, script in enumerate(MIGRATIONS, start=1):
                if version in applied:
                    continue
                for statement in split_statements(script):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, time.time()))

    @staticmethod
    def _schema_version(conn: sqlite3.Connection) -> int:
        known = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_migrations'").fetchone()
        if known is None:
            return 0
        return int(conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0])

    async def start(self) -> None:
        await self._run(lambda conn: None)

    async def close(self) -> None:
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._drop_connection)
        self._closed = True
        self._executor.shutdown(wait=True)

    # -- requests ----------------------------------------------------------------

    async def create(
        self, request: Request, *, effects: Callable[[Request], Effects] | None = None
    ) -> Request:
        stored = replace(request, version=0)

        def work(conn: sqlite3.Connection) -> Request:
            candidate = stored
            with self._write(conn):
                for attempt in range(1, ID_ATTEMPTS + 1):
                    if (
                        conn.execute("SELECT 1 FROM requests WHERE id = ?", (candidate.id,)).fetchone()
                        is None
                    ):
                        break
                    candidate = replace(stored, id=retry_id(attempt))
                else:
                    raise StoreError(f"no free request id after {ID_ATTEMPTS} attempts")
                conn.execute(
                    f"INSERT INTO requests (id, {_REQUEST_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (candidate.id, *_request_values(candidate)),
                )
                if effects is not None:
                    self._apply(conn, effects(candidate))
            return candidate

        return await self._run(work)

    async def get(self, request_id: str) -> Request | None:
        def work(conn: sqlite3.Connection) -> Request | None:
            row = conn.execute("SELECT doc, version FROM requests WHERE id = ?", (request_id,)).fetchone()
            return None if row is None else request_from_doc(row[0], row[1])

        return await self._run(work)

    async def list(
        self, status: Status | str | None = None, resource_glob: str | None = None, limit: int = 100
    ) -> builtins.list[Request]:
        where, args = ["1 = 1"], builtins.list[Any]()
        if status is not None:
            where.append("status = ?")
            args.append(str(Status(status)))
        if resource_glob is not None:
            where.append("fnmatch(resource, ?)")
            args.append(resource_glob)
        return await self._requests(
            f"WHERE {' AND '.join(where)} ORDER BY created_at DESC, id DESC LIMIT ?", (*args, limit)
        )

    async def count_pending(self) -> int:
        def work(conn: sqlite3.Connection) -> int:
            return int(conn.execute(
                "SELECT count(*) FROM requests WHERE status = ?", (str(Status.PENDING),)
            ).fetchone()[0])

        return await self._run(work)

    async def _select(self, tail: str, args: Sequence[Any]) -> builtins.list[Request]:
        return await self._requests(tail, args)

    async def _requests(self, tail: str, args: Sequence[Any]) -> builtins.list[Request]:
        def work(conn: sqlite3.Connection) -> builtins.list[Request]:
            rows = conn.execute(f"SELECT doc, version FROM requests {tail}", tuple(args)).fetchall()
            return [request_from_doc(doc, version) for doc, version in rows]

        return await self._run(work)

    async def update(
        self, request: Request, expected_version: int, *, effects: Effects | None = None
    ) -> Request:
        stored = replace(request, version=expected_version + 1)

        def work(conn: sqlite3.Connection) -> Request:
            with self._write(conn):
                cursor = conn.execute(
                    "UPDATE requests SET status = ?, subject_kind = ?, requester = ?, resource = ?, "
                    "account = ?, fingerprint = ?, created_at = ?, expires_at = ?, approved_until = ?, "
                    "version = ?, doc = ? WHERE id = ? AND version = ?",
                    (*_request_values(stored), stored.id, expected_version),
                )
                if cursor.rowcount != 1:
                    if conn.execute("SELECT 1 FROM requests WHERE id = ?", (stored.id,)).fetchone() is None:
                        raise NotFound(f"no request {stored.id}")
                    raise Conflict(stored.id, expected_version)
                if effects is not None:
                    self._apply(conn, effects)
            return stored

        return await self._run(work)

    def _apply(self, conn: sqlite3.Connection, effects: Effects) -> None:
        now = time.time()
        if effects.audit:
            self._append(conn, [parse_event(event, now) for event in effects.audit])
        for outbound in effects.deliveries:
            self._enqueue(conn, outbound.channel, outbound.target, outbound.payload, now)

    # -- audit -------------------------------------------------------------------

    async def append_audit(self, event: Mapping[str, Any]) -> AuditEvent:
        return (await self.append_audit_many([event]))[0]

    async def append_audit_many(self, events: Sequence[Mapping[str, Any]]) -> builtins.list[AuditEvent]:
        now = time.time()
        parsed = [parse_event(event, now) for event in events]

        def work(conn: sqlite3.Connection) -> builtins.list[AuditEvent]:
            with self._write(conn):
                return self._append(conn, parsed)

        return await self._run(work)

    @staticmethod
    def _append(conn: sqlite3.Connection, events: Sequence[NewAuditEvent]) -> builtins.list[AuditEvent]:
        last_id, last_hash = conn.execute("SELECT last_id, last_hash FROM audit_head").fetchone()
        sealed: builtins.list[AuditEvent] = []
        for new in events:
            event = seal(new, last_id + 1, last_hash)
            conn.execute(
                "INSERT INTO audit_events (id, at, type, actor, request_id, data, prev_hash, hash) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    event.id,
                    event.at,
                    event.type,
                    event.actor,
                    event.request_id,
                    data_text(event.data),
                    event.prev_hash,
                    event.hash,
                ),
            )
            sealed.append(event)
            last_id, last_hash = event.id, event.hash
        conn.execute("UPDATE audit_head SET last_id = ?, last_hash = ?", (last_id, last_hash))
        return sealed

    async def audit(
        self, since: float | None = None, limit: int = 1000, *, after_id: int = 0
    ) -> builtins.list[AuditEvent]:
        def work(conn: sqlite3.Connection) -> builtins.list[AuditEvent]:
            rows = conn.execute(
                "SELECT id, at, type, actor, request_id, data, prev_hash, hash FROM audit_events "
                "WHERE id > ? AND at >= ? ORDER BY id LIMIT ?",
                (after_id, float("-inf") if since is None else since, limit),
            ).fetchall()
            return [_audit_event(row) for row in rows]

        return await self._run(work)

    async def verify_audit(self) -> Verification:
        def work(conn: sqlite3.Connection) -> Verification:
            verifier = ChainVerifier()
            with self._read(conn):
                head_row = conn.execute("SELECT last_id, last_hash FROM audit_head").fetchone()
                cursor = conn.execute(
                    "SELECT id, at, type, actor, request_id, data, prev_hash, hash FROM audit_events "
                    "ORDER BY id"
                )
                for row in cursor:
                    verifier.feed(_audit_event(row))
                    if verifier.broken:
                        break
            return verifier.finish(None if head_row is None else ChainHead(*head_row))

        return await self._run(work)

    # -- deliveries --------------------------------------------------------------

    async def enqueue_delivery(
        self, channel: str, target: str, payload: Mapping[str, Any], *, now: float | None = None
    ) -> Delivery:
        at = time.time() if now is None else now

        def work(conn: sqlite3.Connection) -> Delivery:
            with self._write(conn):
                delivery_id = self._enqueue(conn, channel, target, payload, at)
            return self._delivery(conn, delivery_id)

        return await self._run(work)

    @staticmethod
    def _enqueue(
        conn: sqlite3.Connection, channel: str, target: str, payload: Mapping[str, Any], now: float
    ) -> int:
        cursor = conn.execute(
            "INSERT INTO deliveries (channel, target, payload, status, created_at, next_attempt_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (channel, target, canonical_json(dict(payload)), str(DeliveryStatus.PENDING), now, now),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    @staticmethod
    def _delivery(conn: sqlite3.Connection, delivery_id: int) -> Delivery:
        row = conn.execute(
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE id = ?", (delivery_id,)
        ).fetchone()
        return _delivery(row)

    async def claim_due_deliveries(
        self, now: float, limit: int = 10, lease_seconds: float = 60.0
    ) -> builtins.list[Delivery]:
        def work(conn: sqlite3.Connection) -> builtins.list[Delivery]:
            with self._write(conn):
                ids = [
                    row[0]
                    for row in conn.execute(
                        "SELECT id FROM deliveries WHERE (status = 'pending' AND next_attempt_at <= ?) "
                        "OR (status = 'claimed' AND lease_until <= ?) ORDER BY next_attempt_at, id LIMIT ?",
                        (now, now, limit),
                    )
                ]
                for delivery_id in ids:
                    conn.execute(
                        "UPDATE deliveries SET status = 'claimed', attempts = attempts + 1, lease_until = ? "
                        "WHERE id = ?",
                        (now + lease_seconds, delivery_id),
                    )
                return [self._delivery(conn, delivery_id) for delivery_id in ids]

        return await self._run(work)

    async def finish_delivery(
        self,
        delivery_id: int,
        ok: bool,
        error: str | None = None,
        next_attempt_at: float | None = None,
        *,
        now: float | None = None,
        attempt: int | None = None,
    ) -> bool:
        at = time.time() if now is None else now
        status = delivery_status(ok, next_attempt_at)

        def work(conn: sqlite3.Connection) -> bool:
            with self._write(conn):
                cursor = conn.execute(
                    "UPDATE deliveries SET status = ?, last_error = ?, lease_until = NULL, "
                    "next_attempt_at = COALESCE(?, next_attempt_at), delivered_at = ? "
                    "WHERE id = ? AND status = 'claimed' AND (? IS NULL OR attempts = ?)",
                    (
                        str(status),
                        error,
                        next_attempt_at,
                        at if ok else None,
                        delivery_id,
                        attempt,
                        attempt,
                    ),
                )
                return cursor.rowcount == 1

        return await self._run(work)

    async def list_deliveries(self, status: str | None = None, limit: int = 100) -> builtins.list[Delivery]:
        def work(conn: sqlite3.Connection) -> builtins.list[Delivery]:
            rows = conn.execute(
                f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE ? IS NULL OR status = ? "
                "ORDER BY id DESC LIMIT ?",
                (status, status, limit),
            ).fetchall()
            return [_delivery(row) for row in rows]

        return await self._run(work)

    # -- approval mode -------------------------------------------------------------

    async def set_approval_mode(self, mode: ApprovalMode, *, effects: Effects) -> ApprovalMode:
        def work(conn: sqlite3.Connection) -> ApprovalMode:
            with self._write(conn):
                conn.execute(
                    "INSERT INTO approval_modes (glob, enabled, reason, actor, changed_at) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (glob) DO UPDATE SET enabled = excluded.enabled, "
                    "reason = excluded.reason, actor = excluded.actor, changed_at = excluded.changed_at",
                    (mode.glob, int(mode.enabled), mode.reason, mode.actor, mode.changed_at),
                )
                self._apply(conn, effects)
            return mode

        return await self._run(work)

    async def approval_modes(self) -> builtins.list[ApprovalMode]:
        def work(conn: sqlite3.Connection) -> builtins.list[ApprovalMode]:
            rows = conn.execute(
                "SELECT glob, enabled, reason, actor, changed_at FROM approval_modes"
            ).fetchall()
            modes = [ApprovalMode(row[0], bool(row[1]), row[2], row[3], row[4]) for row in rows]
            return sorted(modes, key=lambda mode: mode.glob)

        return await self._run(work)


def _request_values(request: Request) -> tuple[Any, ...]:
    return (
        str(request.status),
        str(request.subject_kind),
        request.requester,
        request.resource,
        request.account,
        request.fingerprint,
        request.created_at,
        request.expires_at,
        request.approved_until,
        request.version,
        request_doc(request),
    )


def _audit_event(row: Sequence[Any]) -> AuditEvent:
    return from_stored(*row)


def _delivery(row: Sequence[Any]) -> Delivery:
    return Delivery(
        id=row[0],
        channel=row[1],
        target=row[2],
        payload=json.loads(row[3]),
        status=DeliveryStatus(row[4]),
        attempts=row[5],
        created_at=row[6],
        next_attempt_at=row[7],
        lease_until=row[8],
        last_error=row[9],
        delivered_at=row[10],
    )
