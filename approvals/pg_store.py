"""The shared store: PostgreSQL through asyncpg (``store: postgresql://...``).

Owns: the store's tables in their own schema (default ``pgvouch``), the
versioned migrations that create them, and the
:class:`~approvals.store.Store` contract for several proxy replicas sharing
one database.

Must not: decide transitions (``workflow``), define the audit format
(``audit``) or touch anything outside its schema.

Migrations
    :data:`MIGRATIONS` is a list of SQL scripts; version N is the N-th.
    ``schema_migrations`` records what was applied. On start every replica
    takes a session advisory lock for the schema, applies what is missing,
    each script and its ``schema_migrations`` row in one transaction, and
    releases the lock: restarts and simultaneous starts apply each script
    once. A schema newer than this code is refused.

Concurrency across replicas
    ``update`` is ``UPDATE ... WHERE id = $1 AND version = $2``: a racing
    second writer blocks on the row lock, then re-checks the version, finds
    it moved and gets ``Conflict``. Audit appends lock the single
    ``audit_head`` row (``SELECT ... FOR UPDATE``), so the chain is extended
    by one transaction at a time. Deliveries are claimed with
    ``FOR UPDATE SKIP LOCKED`` (a claim is a lease: exclusive until it runs
    out). Every request write also sends ``request:<id>`` on the schema's
    NOTIFY channel in its transaction (``approvals.pg_notify``), so other
    replicas wake their held statements on commit. Commits are durable when they return:
    if the server runs with ``synchronous_commit`` off (or local), the
    store's sessions start with it on.

Connection, pool, timeout and server errors become
:class:`~approvals.store.StoreUnavailable`; the pool reconnects on later calls.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

import asyncpg

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
from approvals.pg_notify import REQUEST, change_channel, notify
from approvals.request_queries import RequestQueries, numbered
from approvals.store import (
    DEFAULT_PG_SCHEMA,
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
    glob_literal_prefix,
    request_doc,
    request_from_doc,
    retry_id,
)

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_GENESIS = "0" * 64

# "{schema}" is replaced by the quoted schema name.
MIGRATIONS: list[str] = [
    f"""
    CREATE TABLE {{schema}}.requests (
        id text PRIMARY KEY,
        status text NOT NULL,
        subject_kind text NOT NULL,
        requester text NOT NULL,
        resource text NOT NULL,
        account text NOT NULL,
        fingerprint text NOT NULL,
        created_at double precision NOT NULL,
        expires_at double precision NOT NULL,
        approved_until double precision,
        version integer NOT NULL,
        doc jsonb NOT NULL
    );
    CREATE INDEX requests_created ON {{schema}}.requests (created_at);
    CREATE INDEX requests_status_created ON {{schema}}.requests (status, created_at);
    CREATE INDEX requests_fingerprint ON {{schema}}.requests (fingerprint);
    CREATE INDEX requests_pending_expiry ON {{schema}}.requests (expires_at) WHERE status = 'pending';
    CREATE INDEX requests_grants ON {{schema}}.requests (requester, resource, account)
        WHERE subject_kind = 'grant' AND status = 'approved';

    CREATE TABLE {{schema}}.audit_events (
        id bigint PRIMARY KEY,
        at double precision NOT NULL,
        type text NOT NULL,
        actor text NOT NULL,
        request_id text,
        data text NOT NULL,
        prev_hash text NOT NULL,
        hash text NOT NULL
    );
    CREATE INDEX audit_events_at ON {{schema}}.audit_events (at);
    CREATE FUNCTION {{schema}}.audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'audit_events is append-only'; END
    $$;
    CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON {{schema}}.audit_events
        FOR EACH ROW EXECUTE FUNCTION {{schema}}.audit_append_only();
    CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON {{schema}}.audit_events
        FOR EACH STATEMENT EXECUTE FUNCTION {{schema}}.audit_append_only();
    CREATE TABLE {{schema}}.audit_head (
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        last_id bigint NOT NULL,
        last_hash text NOT NULL
    );
    INSERT INTO {{schema}}.audit_head VALUES (true, 0, '{_GENESIS}');

    CREATE TABLE {{schema}}.deliveries (
        id bigserial PRIMARY KEY,
        channel text NOT NULL,
        target text NOT NULL,
        payload jsonb NOT NULL,
        status text NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        created_at double precision NOT NULL,
        next_attempt_at double precision NOT NULL,
        lease_until double precision,
        last_error text,
        delivered_at double precision
    );
    CREATE INDEX deliveries_due ON {{schema}}.deliveries (status, next_attempt_at);
    """,
    """
    CREATE TABLE {schema}.approval_modes (
        glob text PRIMARY KEY,
        enabled boolean NOT NULL,
        reason text,
        actor text NOT NULL,
        changed_at double precision NOT NULL
    );
    """,
]

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # e.g. a connection the server dropped mid-protocol
)
_REQUEST_COLUMNS = (
    "status, subject_kind, requester, resource, account, fingerprint, created_at, expires_at, "
    "approved_until, version, doc"
)
_DELIVERY_COLUMNS = (
    "id, channel, target, payload, status, attempts, created_at, next_attempt_at, lease_until, "
    "last_error, delivered_at"
)

if TYPE_CHECKING:  # the asyncpg classes are not subscriptable at run time
    Connection = asyncpg.pool.PoolConnectionProxy[asyncpg.Record]
    Pool = asyncpg.Pool[asyncpg.Record]


class PgStore(RequestQueries):
    """:class:`~approvals.store.Store` on PostgreSQL; safe to share between replicas."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = DEFAULT_PG_SCHEMA,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 10.0,
    ) -> None:
        if not _SCHEMA_NAME.match(schema):
            raise ValueError(f"store schema must be a lowercase SQL identifier, not {schema!r}")
        self.dsn = dsn
        self.schema = schema
        self._q = f'"{schema}"'
        self.channel = change_channel(schema)  # where this store announces its changes
        self._min_size = min_size
        self._max_size = max_size
        self._timeout = timeout
        self._pool: Pool | None = None
        self._start_lock = asyncio.Lock()
        self._closed = False

    # -- plumbing ----------------------------------------------------------------

    def _t(self, table: str) -> str:
        return f"{self._q}.{table}"

    async def start(self) -> None:
        await self._ready()

    async def _ready(self) -> Pool:
        if self._closed:
            raise StoreUnavailable(f"the PostgreSQL store ({self.schema}) is closed")
        if self._pool is not None:
            return self._pool
        async with self._start_lock:
            if self._pool is None:
                try:
                    settings = await self._prepare()
                    self._pool = await asyncpg.create_pool(
                        self.dsn,
                        min_size=self._min_size,
                        max_size=self._max_size,
                        timeout=self._timeout,
                        command_timeout=self._timeout,
                        server_settings=settings,
                    )
                except _UNAVAILABLE as exc:
                    raise StoreUnavailable(f"PostgreSQL store: cannot start: {exc}") from exc
        return self._pool

    async def _prepare(self) -> dict[str, str]:
        """Migrate on a first connection; the session settings the pool needs."""
        conn = await asyncpg.connect(self.dsn, timeout=self._timeout, command_timeout=self._timeout)
        try:
            await self._migrate(conn)
            weak = await conn.fetchval("SELECT current_setting('synchronous_commit')") in ("off", "local")
        finally:
            await conn.close(timeout=self._timeout)
        # A startup setting survives the pool's RESET ALL; stronger server settings are kept.
        return {"synchronous_commit": "on"} if weak else {}

    async def announce(self, kind: str, key: str) -> None:
        """Send ``<kind>:<key>`` to every replica listening, outside any store change."""
        async with self._connection() as conn:
            await notify(conn, self.channel, kind, key)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        pool = await self._ready()
        try:
            async with pool.acquire(timeout=self._timeout) as conn:
                yield conn
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"PostgreSQL store: {type(exc).__name__}: {exc}") from exc

    async def _migrate(self, conn: asyncpg.Connection[asyncpg.Record]) -> None:
        lock_key = int.from_bytes(
            hashlib.sha256(f"pgvouch:{self.schema}".encode()).digest()[:8], "big", signed=True
        )
        await conn.execute("SELECT pg_advisory_lock($1)", lock_key)
        try:
            if await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", self.schema) is None:
                await conn.execute(
                    f"CREATE SCHEMA {self._q}"
                )  # else a pre-created schema needs no CREATE on db
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self._t('schema_migrations')} "
                "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            applied = {
                row["version"]
                for row in await conn.fetch(f"SELECT version FROM {self._t('schema_migrations')}")
            }
            newest = max(applied, default=0)
            if newest > len(MIGRATIONS):
                raise StoreUnavailable(
                    f"PostgreSQL store schema {self.schema} has version {newest}; this pgvouch knows "
                    f"{len(MIGRATIONS)} (upgrade pgvouch)"
                )
            for version, script in enumerate(MIGRATIONS, start=1):
                if version in applied:
                    continue
                async with conn.transaction():
                    await conn.execute(script.replace("{schema}", self._q))
                    await conn.execute(
                        f"INSERT INTO {self._t('schema_migrations')} (version) VALUES ($1)", version
                    )
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", lock_key)

    async def close(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self._timeout)
            except (*_UNAVAILABLE,):
                pool.terminate()

    # -- requests ----------------------------------------------------------------

    async def create(
        self, request: Request, *, effects: Callable[[Request], Effects] | None = None
    ) -> Request:
        candidate = replace(request, version=0)
        async with self._connection() as conn, conn.transaction():
            for attempt in range(1, ID_ATTEMPTS + 1):
                status = await conn.execute(
                    f"INSERT INTO {self._t('requests')} (id, {_REQUEST_COLUMNS}) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::jsonb) "
                    "ON CONFLICT (id) DO NOTHING",
                    candidate.id,
                    *_request_values(candidate),
                )
                if status == "INSERT 0 1":
                    break
                candidate = replace(candidate, id=retry_id(attempt))
            else:
                raise StoreError(f"no free request id after {ID_ATTEMPTS} attempts")
            await notify(conn, self.channel, REQUEST, candidate.id)
            if effects is not None:
                await self._apply(conn, effects(candidate))
        return candidate

    async def get(self, request_id: str) -> Request | None:
        found = await self._requests("WHERE id = $1", (request_id,))
        return found[0] if found else None

    async def list(
        self, status: Status | str | None = None, resource_glob: str | None = None, limit: int = 100
    ) -> builtins.list[Request]:
        where, args = ["true"], builtins.list[Any]()
        if status is not None:
            args.append(str(Status(status)))
            where.append(f"status = ${len(args)}")
        if resource_glob is None:
            args.append(limit)
            return await self._requests(
                f"WHERE {' AND '.join(where)} ORDER BY created_at DESC, id DESC LIMIT ${len(args)}", args
            )
        # Globs are matched by fnmatch, as everywhere else; SQL only narrows by the literal prefix.
        args.append(glob_literal_prefix(resource_glob))
        where.append(f"left(resource, length(${len(args)})) = ${len(args)}")
        query = (
            f"SELECT resource, doc, version FROM {self._t('requests')} "
            f"WHERE {' AND '.join(where)} ORDER BY created_at DESC, id DESC"
        )
        found: builtins.list[Request] = []
        async with self._connection() as conn, conn.transaction(readonly=True):
            async for row in conn.cursor(query, *args, prefetch=max(limit, 100)):
                if len(found) >= limit:
                    break
                if fnmatchcase(row["resource"], resource_glob):
                    found.append(request_from_doc(row["doc"], row["version"]))
        return found

    async def count_pending(self) -> int:
        async with self._connection() as conn:
            return int(await conn.fetchval(
                f"SELECT count(*) FROM {self._t('requests')} WHERE status = $1",
                str(Status.PENDING)))

    async def _select(self, tail: str, args: Sequence[Any]) -> builtins.list[Request]:
        return await self._requests(numbered(tail), args)

    async def _requests(self, tail: str, args: Sequence[Any]) -> builtins.list[Request]:
        async with self._connection() as conn:
            rows = await conn.fetch(f"SELECT doc, version FROM {self._t('requests')} {tail}", *args)
        return [request_from_doc(row["doc"], row["version"]) for row in rows]

    async def update(
        self, request: Request, expected_version: int, *, effects: Effects | None = None
    ) -> Request:
        stored = replace(request, version=expected_version + 1)
        async with self._connection() as conn, conn.transaction():
            status = await conn.execute(
                f"UPDATE {self._t('requests')} SET status = $1, subject_kind = $2, requester = $3, "
                "resource = $4, account = $5, fingerprint = $6, created_at = $7, expires_at = $8, "
                "approved_until = $9, version = $10, doc = $11::jsonb WHERE id = $12 AND version = $13",
                *_request_values(stored),
                stored.id,
                expected_version,
            )
            if status != "UPDATE 1":
                exists = await conn.fetchval(f"SELECT 1 FROM {self._t('requests')} WHERE id = $1", stored.id)
                if exists is None:
                    raise NotFound(f"no request {stored.id}")
                raise Conflict(stored.id, expected_version)
            await notify(conn, self.channel, REQUEST, stored.id)
            if effects is not None:
                await self._apply(conn, effects)
        return stored

    async def _apply(self, conn: Connection, effects: Effects) -> None:
        now = time.time()
        if effects.audit:
            await self._append(conn, [parse_event(event, now) for event in effects.audit])
        for outbound in effects.deliveries:
            await self._enqueue(conn, outbound.channel, outbound.target, outbound.payload, now)

    # -- audit -------------------------------------------------------------------

    async def append_audit(self, event: Mapping[str, Any]) -> AuditEvent:
        return (await self.append_audit_many([event]))[0]

    async def append_audit_many(self, events: Sequence[Mapping[str, Any]]) -> builtins.list[AuditEvent]:
        now = time.time()
        parsed = [parse_event(event, now) for event in events]
        async with self._connection() as conn, conn.transaction():
            return await self._append(conn, parsed)

    async def _append(self, conn: Connection, events: Sequence[NewAuditEvent]) -> builtins.list[AuditEvent]:
        head = await conn.fetchrow(f"SELECT last_id, last_hash FROM {self._t('audit_head')} FOR UPDATE")
        if head is None:
            raise StoreUnavailable(f"PostgreSQL store schema {self.schema}: the audit chain head is missing")
        last_id, last_hash = head["last_id"], head["last_hash"]
        sealed: builtins.list[AuditEvent] = []
        for new in events:
            event = seal(new, last_id + 1, last_hash)
            sealed.append(event)
            last_id, last_hash = event.id, event.hash
        await conn.executemany(
            f"INSERT INTO {self._t('audit_events')} (id, at, type, actor, request_id, data, prev_hash, hash) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            [
                (e.id, e.at, e.type, e.actor, e.request_id, data_text(e.data), e.prev_hash, e.hash)
                for e in sealed
            ],
        )
        await conn.execute(
            f"UPDATE {self._t('audit_head')} SET last_id = $1, last_hash = $2", last_id, last_hash
        )
        return sealed

    async def audit(
        self, since: float | None = None, limit: int = 1000, *, after_id: int = 0
    ) -> builtins.list[AuditEvent]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT id, at, type, actor, request_id, data, prev_hash, hash "
                f"FROM {self._t('audit_events')} WHERE id > $1 AND ($2::float8 IS NULL OR at >= $2) "
                "ORDER BY id LIMIT $3",
                after_id,
                since,
                limit,
            )
        return [from_stored(*row) for row in rows]

    async def verify_audit(self) -> Verification:
        verifier = ChainVerifier()
        async with self._connection() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            head_row = await conn.fetchrow(f"SELECT last_id, last_hash FROM {self._t('audit_head')}")
            query = (
                "SELECT id, at, type, actor, request_id, data, prev_hash, hash "
                f"FROM {self._t('audit_events')} ORDER BY id"
            )
            async for row in conn.cursor(query, prefetch=1000):
                verifier.feed(from_stored(*row))
                if verifier.broken:
                    break
        return verifier.finish(None if head_row is None else ChainHead(head_row[0], head_row[1]))

    # -- deliveries --------------------------------------------------------------

    async def enqueue_delivery(
        self, channel: str, target: str, payload: Mapping[str, Any], *, now: float | None = None
    ) -> Delivery:
        async with self._connection() as conn:
            return await self._enqueue(conn, channel, target, payload, time.time() if now is None else now)

    async def _enqueue(
        self, conn: Connection, channel: str, target: str, payload: Mapping[str, Any], now: float
    ) -> Delivery:
        row = await conn.fetchrow(
            f"INSERT INTO {self._t('deliveries')} "
            "(channel, target, payload, status, created_at, next_attempt_at) "
            f"VALUES ($1, $2, $3::jsonb, $4, $5, $5) RETURNING {_DELIVERY_COLUMNS}",
            channel,
            target,
            canonical_json(dict(payload)),
            str(DeliveryStatus.PENDING),
            now,
        )
        assert row is not None
        return _delivery(row)

    async def claim_due_deliveries(
        self, now: float, limit: int = 10, lease_seconds: float = 60.0
    ) -> builtins.list[Delivery]:
        table = self._t("deliveries")
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"UPDATE {table} SET status = 'claimed', attempts = attempts + 1, lease_until = $2 "
                f"WHERE id IN (SELECT id FROM {table} "
                "WHERE (status = 'pending' AND next_attempt_at <= $1) "
                "OR (status = 'claimed' AND lease_until <= $1) "
                "ORDER BY next_attempt_at, id LIMIT $3 FOR UPDATE SKIP LOCKED) "
                f"RETURNING {_DELIVERY_COLUMNS}",
                now,
                now + lease_seconds,
                limit,
            )
        return sorted((_delivery(row) for row in rows), key=lambda d: (d.next_attempt_at, d.id))

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
        async with self._connection() as conn:
            status = await conn.execute(
                f"UPDATE {self._t('deliveries')} SET status = $1, last_error = $2, lease_until = NULL, "
                "next_attempt_at = COALESCE($3, next_attempt_at), delivered_at = $4 "
                "WHERE id = $5 AND status = 'claimed' AND ($6::integer IS NULL OR attempts = $6)",
                str(delivery_status(ok, next_attempt_at)),
                error,
                next_attempt_at,
                at if ok else None,
                delivery_id,
                attempt,
            )
        return status == "UPDATE 1"

    async def list_deliveries(self, status: str | None = None, limit: int = 100) -> builtins.list[Delivery]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {_DELIVERY_COLUMNS} FROM {self._t('deliveries')} "
                "WHERE $1::text IS NULL OR status = $1 ORDER BY id DESC LIMIT $2",
                status,
                limit,
            )
        return [_delivery(row) for row in rows]

    # -- approval mode -------------------------------------------------------------

    async def set_approval_mode(self, mode: ApprovalMode, *, effects: Effects) -> ApprovalMode:
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                f"INSERT INTO {self._t('approval_modes')} (glob, enabled, reason, actor, changed_at) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (glob) DO UPDATE SET enabled = excluded.enabled, "
                "reason = excluded.reason, actor = excluded.actor, changed_at = excluded.changed_at",
                mode.glob, mode.enabled, mode.reason, mode.actor, mode.changed_at,
            )
            await self._apply(conn, effects)
        return mode

    async def approval_modes(self) -> builtins.list[ApprovalMode]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT glob, enabled, reason, actor, changed_at FROM {self._t('approval_modes')}"
            )
        modes = [ApprovalMode(row["glob"], row["enabled"], row["reason"], row["actor"], row["changed_at"])
                 for row in rows]
        return sorted(modes, key=lambda mode: mode.glob)


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


def _delivery(row: asyncpg.Record) -> Delivery:
    return Delivery(
        id=row["id"],
        channel=row["channel"],
        target=row["target"],
        payload=json.loads(row["payload"]),
        status=DeliveryStatus(row["status"]),
        attempts=row["attempts"],
        created_at=row["created_at"],
        next_attempt_at=row["next_attempt_at"],
        lease_until=row["lease_until"],
        last_error=row["last_error"],
        delivered_at=row["delivered_at"],
    )
