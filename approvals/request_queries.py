"""The request look-ups both stores answer with the same SQL.

Owns: the conditions and order of :meth:`find_approved`, :meth:`find_pending`,
:meth:`active_grants`, :meth:`pending_due` and :meth:`grants_due`, written
once with ``?`` placeholders. A store mixes this in and runs each clause
through its ``_select(tail, args)`` (``SELECT doc, version FROM requests
<tail>``); PostgreSQL numbers the placeholders with :func:`numbered`.

Must not: open connections or know a backend. The clauses hold no string
literal with a ``?`` in it, which :func:`numbered` relies on.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any

from approvals.model import Request, SubjectKind


def numbered(tail: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1``, ``$2``, ..."""
    parts = tail.split("?")
    return parts[0] + "".join(f"${index}{part}" for index, part in enumerate(parts[1:], start=1))


class RequestQueries:
    async def _select(self, tail: str, args: Sequence[Any]) -> builtins.list[Request]:
        raise NotImplementedError

    async def find_approved(self, fingerprint: str, now: float) -> Request | None:
        found = await self._select(
            "WHERE fingerprint = ? AND status = 'approved' AND subject_kind = ? AND approved_until > ? "
            "ORDER BY approved_until, id LIMIT 1",
            (fingerprint, str(SubjectKind.STATEMENT), now),
        )
        return found[0] if found else None

    async def find_pending(self, fingerprint: str, now: float) -> Request | None:
        found = await self._select(
            "WHERE fingerprint = ? AND status = 'pending' AND expires_at > ? ORDER BY created_at, id LIMIT 1",
            (fingerprint, now),
        )
        return found[0] if found else None

    async def active_grants(
        self, requester: str, resource: str, account: str, now: float
    ) -> builtins.list[Request]:
        return await self._select(
            "WHERE requester = ? AND resource = ? AND account = ? AND subject_kind = ? "
            "AND status = 'approved' AND approved_until > ? ORDER BY approved_until, id",
            (requester, resource, account, str(SubjectKind.GRANT), now),
        )

    async def pending_due(self, now: float, limit: int = 100) -> builtins.list[Request]:
        return await self._select(
            "WHERE status = 'pending' AND expires_at <= ? ORDER BY expires_at, id LIMIT ?", (now, limit)
        )

    async def grants_due(self, now: float, limit: int = 100) -> builtins.list[Request]:
        return await self._select(
            "WHERE subject_kind = ? AND status = 'approved' AND approved_until <= ? "
            "ORDER BY approved_until, id LIMIT ?",
            (str(SubjectKind.GRANT), now, limit),
        )
