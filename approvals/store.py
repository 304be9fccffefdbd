"""The approval store's contract: what every backend must do, and how to open one.

Owns: the :class:`Store` protocol (requests with compare-and-swap updates,
the hash-chained audit log, the durable delivery queue for webhooks and
email, the approval mode per resource glob), its errors, the
:class:`Effects` written atomically with a request change, the
:class:`Delivery` record, :func:`open_store` for a ``store:``
URL (``sqlite:///path`` or ``postgresql://...``), and the few helpers both
backends share (the stored document form, id retries on collision).

Must not: implement storage (``sqlite_store``, ``pg_store``), decide
transitions (``workflow``) or define the audit format (``audit``).

Guarantees every backend gives (the conformance suite in
``tests/approvals`` checks them on SQLite and PostgreSQL):

- Every write is durable when the call returns. A request change and its
  effects (audit events, queued deliveries) commit together or not at all,
  so an approval is never forwarded without its audit row and a webhook is
  queued exactly once per transition.
- ``update`` is compare-and-swap on ``version``: of two racing writers that
  read the same version, one wins and the other gets :class:`Conflict` (it
  re-reads and re-applies the workflow). This is how two votes cannot both
  count and how expiry (or any transition) happens exactly once across
  replicas.
- Audit appends are serialized on the chain head, so concurrent writers
  (threads, processes, replicas) never fork the chain.
- ``claim_due_deliveries`` hands each due delivery to exactly one claimer;
  a claim is a lease, and a delivery whose lease ran out (its claimer died)
  is due again.
- Anything that means the store cannot be read or written raises
  :class:`StoreUnavailable`; callers fail closed (nothing that needs review
  runs).
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from approvals.audit import AuditEvent, Verification
from approvals.model import (
    ID_LENGTH,
    JSONObject,
    Request,
    Status,
    canonical_json,
    new_request_id,
    request_from_dict,
    request_to_dict,
)

DEFAULT_PG_SCHEMA = "pgvouch"


class StoreError(Exception):
    """Base of the store's errors."""


class StoreUnavailable(StoreError):
    """The store cannot be read or written right now; fail closed."""


class Conflict(StoreError):
    """``update``: the request's version moved since it was read."""

    def __init__(self, request_id: str, expected_version: int) -> None:
        super().__init__(
            f"request {request_id} changed since version {expected_version}; re-read and try again"
        )
        self.request_id = request_id
        self.expected_version = expected_version


class NotFound(StoreError):
    """``update`` of a request that is not stored."""


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # due at next_attempt_at
    CLAIMED = "claimed"  # a worker holds it until lease_until
    DELIVERED = "delivered"
    DEAD = "dead"  # gave up (no next attempt)


@dataclass(frozen=True)
class Outbound:
    """A delivery to queue: ``channel`` ("webhook", "email", "slack"), where, and what."""

    channel: str
    target: str
    payload: JSONObject


@dataclass(frozen=True)
class Delivery:
    id: int
    channel: str
    target: str
    payload: JSONObject
    status: DeliveryStatus
    attempts: int  # claims so far; a claim's token for finish_delivery(attempt=...)
    created_at: float
    next_attempt_at: float
    lease_until: float | None
    last_error: str | None
    delivered_at: float | None


@dataclass(frozen=True)
class ApprovalMode:
    """Whether approvals are on for resources matching ``glob`` (break-glass: off), and why."""

    glob: str
    enabled: bool
    reason: str | None
    actor: str  # who set it
    changed_at: float


@dataclass(frozen=True)
class Effects:
    """Written in the same transaction as a request change."""

    audit: Sequence[Mapping[str, Any]] = ()
    deliveries: Sequence[Outbound] = ()


class Store(Protocol):
    async def start(self) -> None:
        """Connect and migrate (idempotent); StoreUnavailable if that fails."""

    async def close(self) -> None: ...

    async def create(
        self, request: Request, *, effects: Callable[[Request], Effects] | None = None
    ) -> Request:
        """Store a new request (version 0); returns what was stored.

        On an id collision the request gets a fresh id (longer after repeated
        collisions), so ``effects`` is built from the stored request.
        """

    async def get(self, request_id: str) -> Request | None: ...

    async def list(
        self, status: Status | str | None = None, resource_glob: str | None = None, limit: int = 100
    ) -> builtins.list[Request]:
        """Newest first; ``resource_glob`` is fnmatch syntax, case-sensitive."""

    async def count_pending(self) -> int:
        """How many requests are pending (a metric: one indexed count, no documents read)."""

    async def find_approved(self, fingerprint: str, now: float) -> Request | None:
        """An approved statement with this fingerprint whose approval has not lapsed."""

    async def find_pending(self, fingerprint: str, now: float) -> Request | None:
        """A pending request with this fingerprint that has not expired (a re-sent held statement)."""

    async def active_grants(
        self, requester: str, resource: str, account: str, now: float
    ) -> builtins.list[Request]:
        """Approved grants of ``requester`` on ``resource``/``account`` whose window is open."""

    async def pending_due(self, now: float, limit: int = 100) -> builtins.list[Request]:
        """Pending requests whose expiry time has come, oldest first."""

    async def grants_due(self, now: float, limit: int = 100) -> builtins.list[Request]:
        """Approved grants whose window has passed (``approved_until <= now``), earliest first."""

    async def update(
        self, request: Request, expected_version: int, *, effects: Effects | None = None
    ) -> Request:
        """Replace the request if its stored version is ``expected_version``.

        Returns it with the new version; :class:`Conflict` if the version
        moved, :class:`NotFound` if there is no such request.
        """

    async def append_audit(self, event: Mapping[str, Any]) -> AuditEvent: ...

    async def append_audit_many(self, events: Sequence[Mapping[str, Any]]) -> builtins.list[AuditEvent]:
        """One transaction for several events (e.g. a batch of allowed statements)."""

    async def audit(
        self, since: float | None = None, limit: int = 1000, *, after_id: int = 0
    ) -> builtins.list[AuditEvent]:
        """Events with ``at >= since`` and ``id > after_id``, in id order."""

    async def verify_audit(self) -> Verification: ...

    async def enqueue_delivery(
        self, channel: str, target: str, payload: Mapping[str, Any], *, now: float | None = None
    ) -> Delivery: ...

    async def claim_due_deliveries(
        self, now: float, limit: int = 10, lease_seconds: float = 60.0
    ) -> builtins.list[Delivery]: ...

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
        """Record a claimed delivery's result: delivered, retry at ``next_attempt_at``, or dead.

        With ``attempt`` (the claim's ``attempts``) the result is recorded only
        if that claim still holds; returns whether it was recorded.
        """

    async def list_deliveries(self, status: str | None = None, limit: int = 100) -> builtins.list[Delivery]:
        """Newest first."""

    async def set_approval_mode(self, mode: ApprovalMode, *, effects: Effects) -> ApprovalMode:
        """Record ``mode`` as the current one for ``mode.glob``, with ``effects``, in one transaction."""

    async def approval_modes(self) -> builtins.list[ApprovalMode]:
        """The current mode of every glob ever set, by glob."""


async def open_store(url: str, *, connect: bool = True) -> Store:
    """The store for a ``store:`` URL, started unless ``connect`` is False.

    ``sqlite:///relative/path`` or ``sqlite:////absolute/path``;
    ``postgresql://user:pass@host:port/db?schema=pgvouch`` (``schema``
    defaults to ``pgvouch``; other query parameters go to the server). A store
    that was not started connects on first use, so a proxy can come up while
    its store is down and heal when it returns.
    """
    store: Store
    if url.startswith("sqlite://"):
        from approvals.sqlite_store import SqliteStore

        store = SqliteStore(sqlite_path(url))
    elif url.startswith(("postgresql://", "postgres://")):
        from approvals.pg_store import PgStore

        dsn, schema = split_pg_url(url)
        store = PgStore(dsn, schema=schema)
    else:
        raise ValueError(f"unsupported store URL {url!r} (use sqlite:///path or postgresql://...)")
    if connect:
        await store.start()
    return store


def sqlite_path(url: str) -> str:
    path = url.removeprefix("sqlite://")
    if not path.startswith("/") or path == "/":
        raise ValueError(f"a SQLite store URL looks like sqlite:///path/to/file.db, not {url!r}")
    return path[1:]


def split_pg_url(url: str) -> tuple[str, str]:
    """The DSN without our ``schema`` parameter, and the schema."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for key, value in query if key == "schema"]
    rest = [(key, value) for key, value in query if key != "schema"]
    dsn = urlunsplit(parts._replace(query=urlencode(rest)))
    return dsn, schemas[-1] if schemas else DEFAULT_PG_SCHEMA


# -- shared by the backends ----------------------------------------------------

ID_ATTEMPTS = 12


def retry_id(attempt: int) -> str:
    """A fresh id for the ``attempt``-th try (1-based) after a collision; longer every 3 tries."""
    return new_request_id(ID_LENGTH + (attempt - 1) // 3)


def request_doc(request: Request) -> str:
    """The JSON document a backend keeps for ``request``."""
    return canonical_json(request_to_dict(request))


def request_from_doc(doc: str, version: int) -> Request:
    """A stored document back into a request; the version column wins."""
    return replace(request_from_dict(json.loads(doc)), version=version)


def delivery_status(ok: bool, next_attempt_at: float | None) -> DeliveryStatus:
    if ok:
        return DeliveryStatus.DELIVERED
    return DeliveryStatus.PENDING if next_attempt_at is not None else DeliveryStatus.DEAD


def glob_literal_prefix(glob: str) -> str:
    """What every name matching the fnmatch ``glob`` starts with (for an index-friendly prefilter)."""
    for position, char in enumerate(glob):
        if char in "*?[":
            return glob[:position]
    return glob
