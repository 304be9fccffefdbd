"""Free text from callers that the stores could not keep (a NUL in PostgreSQL's jsonb) or that
has no business in a reason (terminal escapes): refused up front as bad input, on SQLite and
on real PostgreSQL alike, instead of surfacing as "store unavailable"."""

from __future__ import annotations

import pytest

from approvals.approval_mode import ApprovalModeError, ApprovalModes
from approvals.service import ApprovalService
from approvals.store import Store
from config.settings import User
from tests.approvals.helpers import DIRECTORY, T0

OWNER = User("frank", ("dba", "developers"), roles=("owner",))


@pytest.mark.parametrize("reason", ["incident\u0000 4711", "incident \u001b[2J4711"])
async def test_a_break_glass_reason_with_control_characters_is_refused(store: Store, reason: str) -> None:
    modes = ApprovalModes(ApprovalService(store, DIRECTORY, clock=lambda: T0))
    with pytest.raises(ApprovalModeError) as refused:
        await modes.set_approval_mode(OWNER, "prod-*", False, reason)
    assert refused.value.code == "bad_request"
    assert await store.approval_modes() == []
    # line breaks and tabs are fine in a reason
    change = await modes.set_approval_mode(OWNER, "prod-*", False, "incident 4711:\n\tdisk full")
    assert change.mode.reason == "incident 4711:\n\tdisk full"
