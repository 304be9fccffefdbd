"""Changes announced between replicas: LISTEN/NOTIFY on the shared PostgreSQL store.

Owns: the channel of a store schema (:func:`change_channel`: ``<schema>_changes``,
so ``pgvouch_changes`` by default), the payload format ``<kind>:<key>`` (the
store sends ``request:<request id>`` for every request it creates or
updates), sending one inside a store transaction (:func:`notify`: PostgreSQL
delivers it only when that transaction commits, so nobody is woken for a
change that rolled back), and :class:`ChangeListener`: one dedicated
connection per process that LISTENs and hands each payload to the handlers
registered for its kind, reconnecting with backoff when the connection drops.

Must not: read or decide anything. A notification only says "this changed";
handlers re-read the store themselves (``ApprovalService.wake`` lets held
statements re-read their request). Notifications are a latency shortcut,
never the source of truth: one lost while the listener reconnects costs at
most one ``hold.poll_interval``, because holds keep re-reading on their own.

Other kinds (``approval_mode:<glob>``, ``grant:<id>``, ...) need only a
:func:`notify` call in the store transaction that makes the change and a
handler registered with :meth:`ChangeListener.on` in every process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import asyncpg

log = logging.getLogger("pgvouch.replicas")

REQUEST = "request"  # payload "request:<id>": a request was created or changed
CANCEL = "cancel"  # payload "cancel:<pid>:<digest>": see ProxyServer.cancel
# Seconds before reconnect attempt 1, 2, ...; the last entry repeats.
BACKOFF: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0)
APPLICATION_NAME = "pgvouch-listener"  # how the listening session shows in pg_stat_activity
_MAX_CHANNEL = 63  # PostgreSQL identifiers (NAMEDATALEN - 1)
_DROPPED: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)

if TYPE_CHECKING:
    Connection = asyncpg.Connection[asyncpg.Record]

Handler = Callable[[str], None]


def change_channel(schema: str) -> str:
    """The NOTIFY channel of the store in ``schema`` (stores in other schemas do not hear it)."""
    return f"{schema}_changes"[:_MAX_CHANNEL]


async def notify(conn: Any, channel: str, kind: str, key: str) -> None:
    """Queue ``<kind>:<key>`` on ``channel`` in ``conn``'s transaction (sent on commit)."""
    await conn.execute("SELECT pg_notify($1, $2)", channel, f"{kind}:{key}")


class ChangeListener:
    """LISTENs on a store's channel on its own connection and dispatches payloads by kind.

    ``run()`` is a background task (cancel it to stop). When the connection
    is (re)established, ``on_listening`` runs: changes made while nobody was
    listening were not heard, so that is the moment to re-read everything
    (``ApprovalService.wake_all``). A dead connection is noticed at once when
    the socket closes, else by a ``SELECT 1`` every ``keepalive`` seconds.
    """

    def __init__(
        self,
        dsn: str,
        channel: str,
        *,
        on_listening: Callable[[], None] | None = None,
        timeout: float = 10.0,
        keepalive: float = 15.0,
        backoff: Sequence[float] = BACKOFF,
    ) -> None:
        self.dsn = dsn
        self.channel = channel
        self.on_listening = on_listening
        self.timeout = timeout
        self.keepalive = keepalive
        self.backoff = tuple(backoff)
        self.listening = asyncio.Event()  # set while LISTEN is active
        self.connections = 0  # how many times LISTEN was established (1 + reconnects)
        self._handlers: dict[str, list[Handler]] = {}

    def on(self, kind: str, handler: Handler) -> None:
        """Call ``handler(key)`` for every ``<kind>:<key>`` notification."""
        if not kind or ":" in kind:
            raise ValueError(f"a notification kind is a word without ':', not {kind!r}")
        self._handlers.setdefault(kind, []).append(handler)

    def dispatch(self, payload: str) -> None:
        """Hand ``payload`` to its kind's handlers; unknown kinds are ignored (newer replicas)."""
        kind, sep, key = payload.partition(":")
        if not sep:
            log.debug("ignoring notification without a kind: %r", payload[:100])
            return
        for handler in self._handlers.get(kind, ()):
            try:
                handler(key)
            except Exception:  # one handler must not silence the others or the listener
                log.exception("handler for %s notifications failed", kind)

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                await self._listen_once()
                failures = 0  # it was listening; it dropped later
            except _DROPPED as exc:
                delay = self.backoff[min(failures, len(self.backoff) - 1)]
                failures += 1
                log.warning("store notifications unavailable (%s: %s); reconnecting in %.1fs, "
                            "held statements re-read the store meanwhile",
                            type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                continue
            delay = self.backoff[0]
            log.warning("store notification connection lost; reconnecting in %.1fs", delay)
            await asyncio.sleep(delay)

    async def _listen_once(self) -> None:
        """Listen until the connection is lost (returns) or cannot be set up (raises)."""
        conn: Connection = await asyncpg.connect(
            self.dsn, timeout=self.timeout, command_timeout=self.timeout,
            server_settings={"application_name": APPLICATION_NAME})
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        try:
            await conn.add_listener(self.channel, self._received)
            self.connections += 1
            self.listening.set()
            log.info("listening for store changes on channel %s", self.channel)
            if self.on_listening is not None:
                self.on_listening()
            await self._watch(conn, lost)
        finally:
            self.listening.clear()
            conn.terminate()

    async def _watch(self, conn: Connection, lost: asyncio.Event) -> None:
        while not lost.is_set():
            try:
                await asyncio.wait_for(lost.wait(), self.keepalive)
            except TimeoutError:
                try:
                    await conn.fetchval("SELECT 1", timeout=self.timeout)
                except _DROPPED as exc:
                    log.warning("store notification connection is not answering: %s", exc)
                    return

    def _received(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        self.dispatch(str(payload))
