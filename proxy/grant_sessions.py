"""Closing a grant holder's sessions when a ``terminate_sessions`` grant ends.

Owns: knowing which running grants asked for ``terminate_sessions: true``
and, when one ends (revoked, or its window passed), closing its holder's
open client sessions on that resource with a FATAL ``PV006``. Revocations
made through this process arrive as service events at once; the window's end
is a timer; revocations made on another replica are found by re-reading the
watched grants every ``interval`` seconds, and grants approved elsewhere by
looking up the running grants of the identities with local sessions every
``scan_every`` rounds (grants a local session uses are watched at once).

Must not: change requests (the workflow does), decide whether a statement
is covered (``proxy.grant_coverage``) or handle protocol messages (the
session's ``terminate`` does).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from approvals.model import Request, Status, SubjectKind
from approvals.service import ApprovalService
from approvals.store import StoreError
from approvals.workflow import Event, EventType
from proxy import sqlstate
from proxy.server import ProxyServer

log = logging.getLogger("pgvouch.grants")


def wants_termination(request: Request) -> bool:
    return request.subject_kind is SubjectKind.GRANT and bool(request.subject.get("terminate_sessions"))


class GrantSessions:
    """Watches running ``terminate_sessions`` grants; ends their holders' sessions with them."""

    def __init__(self, server: ProxyServer, service: ApprovalService, *, interval: float = 2.0,
                 scan_every: int = 5) -> None:
        self.server = server
        self.service = service
        self.interval = interval
        self.scan_every = scan_every  # look up the local identities' grants every this many rounds
        self._rounds = 0
        self.watched: dict[str, Request] = {}
        self._changed = asyncio.Event()

    def install(self) -> None:
        self.service.listeners.append(self.on_change)

    # -- what arrives ------------------------------------------------------------
    def on_change(self, request: Request, events: Sequence[Event]) -> None:
        """Service listener: start watching approved grants, end revoked ones now.

        A grant the sweeper ended (``request.ended``) is ended here too unless
        the window's timer already did (then it is no longer watched).
        """
        if not wants_termination(request):
            return
        if request.status is Status.APPROVED:
            self.watch(request)
        elif any(event.type is EventType.REVOKED for event in events):
            self.watched.pop(request.id, None)
            actor = next(e.actor for e in events if e.type is EventType.REVOKED)
            self.end(request, f"was revoked by {actor}")
        elif (any(event.type is EventType.ENDED for event in events)
              and self.watched.pop(request.id, None) is not None):
            self.end(request, "expired")

    def watch(self, grant: Request) -> None:
        """Keep an eye on a running grant (also called when a session uses one)."""
        if wants_termination(grant) and grant.status is Status.APPROVED and grant.id not in self.watched:
            self.watched[grant.id] = grant
            self._changed.set()

    # -- ending --------------------------------------------------------------------
    def end(self, grant: Request, how: str) -> int:
        """Close ``grant``'s holder's sessions on its resource; how many were closed."""
        closed = 0
        for session in list(self.server.sessions):
            info = session.info
            if info is None or info.user != grant.requester or info.resource != grant.resource:
                continue
            session.terminate(
                sqlstate.GRANT_ENDED,
                f"terminating connection: pgvouch grant {grant.id} {how}, and it asked for the "
                "holder's sessions to be closed when it ends",
            )
            closed += 1
        log.info("grant %s %s: closed %d session(s) of %s on %s", grant.id, how, closed,
                 grant.requester, grant.resource)
        return closed

    # -- the loop ----------------------------------------------------------------------
    async def run(self) -> None:
        """End grants when their window passes; catch what other replicas did."""
        while True:
            await self._wait()
            now = self.service.clock()
            for grant in list(self.watched.values()):
                if grant.approved_until is not None and now >= grant.approved_until:
                    self.watched.pop(grant.id, None)
                    self.end(grant, "expired")
            try:
                await self._recheck(now)
            except StoreError as exc:
                log.warning("could not re-read grants (will retry): %s", exc)
            except Exception:  # the watch must outlive any one failure
                log.exception("checking running grants failed; will retry")

    async def _wait(self) -> None:
        now = self.service.clock()
        due = [g.approved_until - now for g in self.watched.values() if g.approved_until is not None]
        timeout = max(0.0, min([self.interval, *due]))
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass

    async def _recheck(self, now: float) -> None:
        store = self.service.store
        for grant_id in list(self.watched):
            current = await store.get(grant_id)
            if current is not None and current.status is not Status.APPROVED and grant_id in self.watched:
                self.watched.pop(grant_id, None)
                self.end(current, f"was {current.status}")
        self._rounds += 1
        if self._rounds % self.scan_every:
            return
        identities = {(s.info.user, s.info.resource, s.info.account)
                      for s in list(self.server.sessions) if s.info is not None}
        for user, resource, account in identities:
            for grant in await store.active_grants(user, resource, account, now):
                self.watch(grant)
