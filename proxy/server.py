"""The listener: accepts clients, keeps the session registry, drains on shutdown.

Owns: the listening socket (optionally TLS-capable), the connection limit,
the proxy's own cancel keys (each session gets a random pid/secret that maps
to its upstream backend, so a client can cancel without ever learning the
upstream key; a key of another replica is announced to the replicas, see
``cancel``), graceful drain, and the counters the metrics read. As one of
several workers (``workers:``) it has no listener: the supervisor hands it
client sockets (``adopt``) and keeps the connection count, and the bus
(``proxy.worker_link``) carries cancel keys to the other workers.

Must not: handle protocol messages (``proxy.client`` does) or evaluate
policies (the decider does).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from approvals.service import ApprovalService
from config.settings import Settings
from proxy import sqlstate
from proxy.client import ClientSession
from proxy.decide import AllowAll, Decider
from proxy.metrics import ProxyMetrics
from proxy.upstream import send_cancel

if TYPE_CHECKING:
    from approvals.grants import GrantDesk
    from proxy.function_catalog import FunctionCatalog
    from proxy.worker_link import WorkerLink

log = logging.getLogger("pgvouch.server")


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.tls is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(settings.tls.cert_file, settings.tls.key_file)
    return ctx


# Cancel requests with a key of no session here that one process announces to the
# other replicas, per second at most (a cancel request needs no login).
CANCEL_ANNOUNCEMENTS_PER_SECOND = 20


def cancel_digest(pid: int, secret: bytes) -> str:
    """What a replica announces for a cancel key it does not know: not the secret itself."""
    return hashlib.sha256(b"pgvouch-cancel\0" + pid.to_bytes(4, "big") + secret).hexdigest()


class ProxyServer:
    def __init__(self, settings: Settings, decider: Decider | None = None) -> None:
        self.settings = settings
        self.decider: Decider = decider or AllowAll()
        self.ssl_context = server_ssl_context(settings)
        self.server_secret = secrets.token_bytes(32)
        self.sessions: set[ClientSession] = set()
        self.by_key: dict[int, ClientSession] = {}
        self.listener: asyncio.Server | None = None
        self.approvals: ApprovalService | None = None
        self.grants: GrantDesk | None = None  # JIT grant requests (API, psql), with policies
        # each resource's functions, read before its first session (functions.volatility)
        self.functions: FunctionCatalog | None = None
        # with a store shared by replicas: sends "<pid>:<digest>" to the other replicas
        self.announce_cancel: Callable[[str], Awaitable[None]] | None = None
        self._announced = (0, 0)  # (second, cancel keys announced in it)
        self._cancels: set[asyncio.Task[None]] = set()  # announced cancels being carried out
        # one of several workers: the bus to the supervisor and the other workers
        self.link: WorkerLink | None = None
        self._over: set[ClientSession] = set()  # handed over past the shared connection limit
        self._adopting: set[asyncio.Task[None]] = set()
        self.draining = False
        self.started_at = time.time()
        self._total = 0
        self._closed_bytes_in = 0
        self._closed_bytes_out = 0
        self._closed_decisions: dict[str, int] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.metrics = ProxyMetrics(self)

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.link is not None:
            await self.link.start(self.adopt)
            return
        self.listener = await loop.create_server(
            lambda: ClientSession(self),
            self.settings.listen.host,
            self.settings.listen.port,
            reuse_address=True,
            backlog=1024,
        )
        log.info("listening on %s", ", ".join(self.addresses()))

    def addresses(self) -> list[str]:
        if self.listener is None:
            return []
        return [f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in self.listener.sockets]

    def serving(self) -> bool:
        if self.draining:
            return False
        if self.link is not None:
            return self.link.connected
        return self.listener is not None and self.listener.is_serving()

    def adopt(self, client: socket.socket, over_limit: bool) -> None:
        """A client connection the supervisor accepted and handed to this worker."""
        session = ClientSession(self)
        if over_limit:
            self._over.add(session)
        task = asyncio.get_running_loop().create_task(self._adopt(session, client))
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

    async def _adopt(self, session: ClientSession, client: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: session, client)
        except Exception as exc:
            self._over.discard(session)
            client.close()
            log.warning("a client connection could not be taken over: %s", exc)
            if self.link is not None:
                self.link.session_closed()

    @property
    def port(self) -> int:
        assert self.listener is not None
        return int(self.listener.sockets[0].getsockname()[1])

    async def drain(self, grace: float | None = None) -> None:
        """Stop accepting; let sessions finish up to ``grace`` seconds; then end them."""
        self.draining = True
        if self.listener is not None:
            self.listener.close()
        if self.link is not None:
            self.link.stop_taking()
        limit = self.settings.limits.drain_timeout if grace is None else grace
        if self.sessions:
            log.info("draining: waiting up to %.0fs for %d session(s)", limit, len(self.sessions))
            try:
                await asyncio.wait_for(self._idle.wait(), limit)
            except TimeoutError:
                for session in list(self.sessions):
                    session.terminate(
                        sqlstate.ADMIN_SHUTDOWN,
                        "terminating connection due to administrator command (pgvouch shutdown)",
                    )
        if self.listener is not None:
            await self.listener.wait_closed()

    # -- registry ----------------------------------------------------------------
    def session_started(self, session: ClientSession) -> None:
        self.sessions.add(session)
        self._total += 1
        self._idle.clear()

    def session_ended(self, session: ClientSession) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self._closed_bytes_in += session.bytes_in
            self._closed_bytes_out += session.bytes_out
            for action, count in session.decisions.items():
                self._closed_decisions[action] = self._closed_decisions.get(action, 0) + count
            if self.link is not None:
                self.link.session_closed()
        if self.by_key.get(session.key_pid) is session:
            del self.by_key[session.key_pid]
        self._over.discard(session)
        if not self.sessions:
            self._idle.set()

    def at_capacity(self, session: ClientSession) -> bool:
        if self.draining or session in self._over:
            return True
        return len(self.sessions) > self.settings.limits.max_client_connections

    def register_key(self, session: ClientSession) -> tuple[int, bytes]:
        while True:
            pid = secrets.randbelow(2**31 - 2) + 1
            if pid not in self.by_key:
                break
        self.by_key[pid] = session
        return pid, secrets.token_bytes(4)

    async def cancel(self, pid: int, secret: bytes) -> None:
        """A CancelRequest. Behind one address, replicas share no session registry: a
        key of no session here may be another replica's, so with a shared store it is
        announced to them all (as a digest, not the secret itself), and the
        replica that issued it cancels (``cancel_announced``)."""
        session = self.by_key.get(pid)
        if session is None or not hmac.compare_digest(session.key_secret, secret):
            if self.announce_cancel is None and self.link is not None:
                # the other workers of this process group (with a shared store, the
                # announcement below reaches them as it reaches other replicas)
                self.link.note("cancel", pid=pid, secret=secret.hex())
                return
            if self.announce_cancel is None:
                log.info("cancel request with an unknown key ignored")
                return
            second = int(time.monotonic())
            count = self._announced[1] + 1 if self._announced[0] == second else 1
            if count > CANCEL_ANNOUNCEMENTS_PER_SECOND:
                log.warning("cancel request with a key of no session here dropped: more than "
                            "%d per second", CANCEL_ANNOUNCEMENTS_PER_SECOND)
                return
            self._announced = (second, count)
            try:
                await self.announce_cancel(f"{pid}:{cancel_digest(pid, secret)}")
            except Exception as exc:
                log.warning("cancel request with a key of no session here could not be "
                            "announced to the other replicas: %s", exc)
            else:
                log.info("cancel request with a key of no session here announced to the "
                         "other replicas")
            return
        await self._cancel_session(session)

    def cancel_from_worker(self, pid: int, secret: bytes) -> None:
        """Another worker received a cancel request with a key of no session there."""
        session = self.by_key.get(pid)
        if session is None or not hmac.compare_digest(session.key_secret, secret):
            return
        log.info("cancel request for session %s received by another worker", session.id)
        self._cancel_soon(session)

    def cancel_announced(self, key: str) -> None:
        """Another replica announced a cancel key (``<pid>:<digest>``, see ``cancel``)."""
        pid, sep, digest = key.partition(":")
        if not sep or not pid.isdigit() or len(pid) > 10:
            return
        session = self.by_key.get(int(pid))
        if session is None or not hmac.compare_digest(
                cancel_digest(int(pid), session.key_secret), digest):
            return  # another replica's session, or a wrong secret
        log.info("cancel request for session %s received by another replica", session.id)
        self._cancel_soon(session)

    def _cancel_soon(self, session: ClientSession) -> None:
        task = asyncio.get_running_loop().create_task(self._cancel_session(session))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _cancel_session(self, session: ClientSession) -> None:
        if session.cancel_requested():
            log.info("cancel request for session %s: held statement cancelled", session.id)
            return
        target = session.target
        if target is None or not session.backend_pid:
            return
        log.info("cancel request for session %s", session.id)
        await send_cancel(target.resource, session.backend_pid, session.backend_secret)

    # -- metrics ---------------------------------------------------------------
    def live_totals(self) -> tuple[int, int, int, int, dict[str, int]]:
        bytes_in, bytes_out = self._closed_bytes_in, self._closed_bytes_out
        decisions = dict(self._closed_decisions)
        for session in self.sessions:
            bytes_in += session.bytes_in
            bytes_out += session.bytes_out
            for action, count in session.decisions.items():
                decisions[action] = decisions.get(action, 0) + count
        return len(self.sessions), self._total, bytes_in, bytes_out, decisions

    def metrics_auth_failure(self, reason: str) -> None:
        self.metrics.auth_failures.labels(reason).inc()

    def metrics_upstream_connected(self, seconds: float) -> None:
        self.metrics.upstream_connect_seconds.observe(seconds)

    def metrics_upstream_failure(self) -> None:
        self.metrics.upstream_connect_failures.inc()
