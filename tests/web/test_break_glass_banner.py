"""The Activity Queue shows a red banner while approvals are off (break-glass), escaped."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from approvals.approval_mode import ApprovalModes
from config.settings import User
from tests.web.test_pages import WebEnv, _env

OWNER = User("frank", ("dba", "developers"), roles=("owner",))


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[WebEnv]:
    async for made in _env(tmp_path):
        yield made


async def test_the_queue_shows_where_approvals_are_off(env: WebEnv) -> None:
    await env.sign_in("bob")
    page = await (await env.client.get("/")).text()
    assert "Approvals are OFF" not in page
    modes = ApprovalModes(env.service)
    await modes.set_approval_mode(OWNER, "prod-*", False, "incident <4711>")
    page = await (await env.client.get("/")).text()
    assert 'class="flash error break-glass" role="alert"' in page
    assert "Approvals are OFF for prod-*</strong> (break-glass by frank: incident &lt;4711&gt;)" in page
    await modes.set_approval_mode(OWNER, "prod-*", True, None)
    assert "Approvals are OFF" not in await (await env.client.get("/")).text()
