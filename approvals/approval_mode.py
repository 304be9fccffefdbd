"""Break-glass: switching approvals off (and on again) for the resources a glob matches.

Owns: who may switch (users with the ``owner`` role), what a switch needs (a
reason to turn approvals off), writing the new mode together with its audit
event and its announcement to every channel in one store transaction,
expiring the pending requests of the resources it covers, and the question
the proxy asks before holding a statement: are approvals off for this
resource, and since when, by whom, why?

Must not: speak HTTP or the PostgreSQL protocol, or decide request
transitions itself (``workflow.expire`` through :meth:`ApprovalService.apply`
does, with compare-and-swap, so a request someone approves at the same
moment is either approved or expired, never both).

The mode is kept per glob (``prod-*``). Approvals are off for a resource
while any glob matching it is off; ``on`` for a glob ends that glob's
break-glass (the same glob that was switched off). Every change is one
``approval_mode.off`` / ``approval_mode.on`` audit event; the announcement to
webhooks, Slack and email is queued in the same transaction, so there is no
mode change without its audit record and announcement.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from approvals import workflow
from approvals.channels import Announcement
from approvals.service import ApprovalService
from approvals.store import ApprovalMode, Conflict, Effects, NotFound
from approvals.workflow import WorkflowError
from config.settings import User

log = logging.getLogger("pgvouch.approvals")

OWNER_ROLE = "owner"
MODE_OFF, MODE_ON = "approval_mode.off", "approval_mode.on"
MAX_GLOB, MAX_REASON = 200, 4000
_EXPIRY_PASSES = 5  # a hold that checked the mode just before the switch may still create a request
_EXPIRY_BATCH = 500


class ApprovalModeError(Exception):
    """A refused switch; ``code`` is the API's error code (``not_owner``, ``bad_request``, ``not_off``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ModeChange:
    mode: ApprovalMode
    expired: tuple[str, ...]  # the pending requests switching off expired


def off_for(modes: Sequence[ApprovalMode], resource: str) -> ApprovalMode | None:
    """The break-glass in force for ``resource`` (the earliest switched off), or None."""
    matching = [mode for mode in modes if not mode.enabled and fnmatchcase(resource, mode.glob)]
    return min(matching, key=lambda mode: (mode.changed_at, mode.glob), default=None)


def check_glob(glob: str) -> str:
    glob = glob.strip()
    if not glob:
        raise ApprovalModeError("bad_request", "resources must be a non-empty glob, e.g. prod-*")
    if len(glob) > MAX_GLOB or any(char.isspace() or not char.isprintable() for char in glob):
        raise ApprovalModeError("bad_request",
                                f"resources must be a glob of at most {MAX_GLOB} characters without spaces")
    return glob


def check_reason(reason: str | None, *, required: bool) -> str | None:
    reason = (reason or "").strip() or None
    if reason is None and required:
        raise ApprovalModeError("bad_request", "a reason is required to switch approvals off")
    if reason is not None and any(not c.isprintable() and c not in "\r\n\t" for c in reason):
        raise ApprovalModeError("bad_request", "the reason must not contain control characters")
    if reason is not None and len(reason) > MAX_REASON:
        raise ApprovalModeError("bad_request", f"the reason may be at most {MAX_REASON} characters")
    return reason


class ApprovalModes:
    """The approval mode over an :class:`ApprovalService` (its store, channels and clock)."""

    def __init__(self, service: ApprovalService) -> None:
        self.service = service

    async def current(self) -> list[ApprovalMode]:
        return await self.service.store.approval_modes()

    async def off_for(self, resource: str) -> ApprovalMode | None:
        """StoreUnavailable if the store cannot say: the caller must then refuse (fail closed)."""
        return off_for(await self.current(), resource)

    async def set_approval_mode(self, user: User, resources: str, enabled: bool,
                                reason: str | None) -> ModeChange:
        """Switch approvals for ``resources`` (a glob) on or off as ``user``, an owner."""
        if OWNER_ROLE not in user.roles:
            raise ApprovalModeError(
                "not_owner", f"only owners (roles: [{OWNER_ROLE}]) may switch approvals on or off")
        glob = check_glob(resources)
        reason = check_reason(reason, required=not enabled)
        if enabled:
            current = next((mode for mode in await self.current() if mode.glob == glob), None)
            if current is None or current.enabled:
                off = ", ".join(mode.glob for mode in await self.current() if not mode.enabled)
                raise ApprovalModeError(
                    "not_off", f"approvals are not off for {glob} (off for: {off or 'nothing'})")
        now = self.service.clock()
        mode = ApprovalMode(glob, enabled, reason, user.name, now)
        kind = MODE_ON if enabled else MODE_OFF
        data = {"resources": glob, "enabled": enabled, "reason": reason}
        announcement = Announcement(kind, user.name, now, data)
        effects = Effects(audit=[{"type": kind, "actor": user.name, "at": now, **data}],
                          deliveries=self.service.announcement_deliveries(announcement))
        stored = await self.service.store.set_approval_mode(mode, effects=effects)
        log.warning("approvals switched %s for %s by %s%s", "on" if enabled else "OFF", glob,
                    user.name, f": {reason}" if reason else "")
        expired: tuple[str, ...] = ()
        if not enabled:
            expired = await self._expire_pending(glob, user.name, reason or "")
        return ModeChange(stored, expired)

    async def _expire_pending(self, glob: str, actor: str, reason: str) -> tuple[str, ...]:
        """Expire every pending request (statements and grants) on a resource ``glob`` matches."""
        note = f"approvals were switched off for {glob} by {actor}: {reason}"
        expired: list[str] = []
        for _ in range(_EXPIRY_PASSES):
            pending = await self.service.store.list(status="pending", resource_glob=glob,
                                                    limit=_EXPIRY_BATCH)
            if not pending:
                break
            for request in pending:
                try:
                    await self.service.apply(
                        request.id,
                        lambda r, now: workflow.expire(r, now, reason=note, actor=actor))
                except (WorkflowError, Conflict, NotFound):
                    continue  # decided by someone else meanwhile
                expired.append(request.id)
        return tuple(expired)
