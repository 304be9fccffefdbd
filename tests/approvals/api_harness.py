"""The approvals API on 127.0.0.1 over a real SQLite store, with a clock the test moves.

``running_api`` starts an aiohttp app with ``add_approval_routes`` on a free
port and yields an :class:`ApiEnv`. Every ``env.call`` checks the answer
against the API's own OpenAPI document (fetched from the server), so each
test is also a conformance test of that document.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from approvals.api import API_PREFIX, add_approval_routes
from approvals.auth import token_hash
from approvals.model import Request
from approvals.service import ApprovalService
from approvals.store import Store, open_store
from config.settings import Api, Integration, Limits, Listen, Settings, User, Webhook
from tests.approvals import openapi_check
from tests.approvals.helpers import DIRECTORY, make_request

HOOK_SECRET_ENV = "PGVOUCH_TEST_HOOK_SECRET"
HOOK_SECRET = "hook-secret-for-tests"
WEBHOOK_SECRET_ENV = "PGVOUCH_TEST_WEBHOOK_SECRET"
WEBHOOK_SECRET = "webhook-secret-for-tests"


def token_of(user: str) -> str:
    return f"pgv_test_token_of_{user}"


class Clock:
    """Time that moves only when the test says so.

    It starts a minute ahead of the wall clock because the store stamps
    queued deliveries with the wall clock: they must already be due for a
    worker that runs on this clock.
    """

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() + 60 if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_settings(
    *,
    integrations: Sequence[Integration] = (),
    webhooks: Sequence[Webhook] = (),
    store: str = "sqlite:///unused.db",
    users: Mapping[str, User] | None = None,
) -> Settings:
    if users is None:
        users = {
            name: User(name, groups, api_token_sha256=token_hash(token_of(name)),
                       roles=("owner",) if name == "frank" else ())
            for name, groups in DIRECTORY.items()
        }
    return Settings(
        listen=Listen(), api=Api(), tls=None, client_auth="trust", resources={}, users=dict(users),
        limits=Limits(), store=store, integrations=tuple(integrations), webhooks=tuple(webhooks),
    )


@dataclass
class Reply:
    status: int
    body: Any
    headers: Mapping[str, str]

    @property
    def code(self) -> str | None:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return str(self.body["error"]["code"])
        return None


@dataclass
class ApiEnv:
    client: TestClient[web.Request, web.Application]
    service: ApprovalService
    store: Store
    clock: Clock
    settings: Settings
    doc: dict[str, Any] = field(default_factory=dict)

    async def call(
        self,
        method: str,
        path: str,
        *,
        user: str | None = None,
        body: Any = None,
        data: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        token: str | None = None,
        check: bool = True,
    ) -> Reply:
        """``method API_PREFIX+path`` as ``user``; the answer is checked against the document."""
        sent = dict(headers or {})
        if user is not None:
            sent["Authorization"] = f"Bearer {token_of(user)}"
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        if body is not None:
            data = json.dumps(body)
            sent.setdefault("Content-Type", "application/json")
        response = await self.client.request(method, API_PREFIX + path, data=data, headers=sent)
        assert response.content_type == "application/json", await response.text()
        reply = Reply(response.status, await response.json(), response.headers)
        if check:
            openapi_check.check_response(self.doc, method, path.split("?")[0], reply.status, reply.body)
        return reply

    async def submit(self, **kwargs: Any) -> Request:
        kwargs.setdefault("now", self.clock())
        return await self.service.create(make_request(**kwargs))

    @property
    def url(self) -> str:
        return str(self.client.make_url(API_PREFIX))


@asynccontextmanager
async def running_api(
    tmp_path: Path,
    *,
    integrations: Sequence[Integration] = (),
    webhooks: Sequence[Webhook] = (),
    store: Store | None = None,
    clock: Clock | None = None,
    db_name: str = "store.db",
) -> AsyncIterator[ApiEnv]:
    url = f"sqlite:///{tmp_path / db_name}"
    own_store = store is None
    opened = await open_store(url) if store is None else store
    clock = clock or Clock()
    settings = make_settings(integrations=integrations, webhooks=webhooks, store=url)
    service = ApprovalService(
        opened, DIRECTORY, webhooks=[(w.url, w.events) for w in webhooks], clock=clock
    )
    app = web.Application()
    add_approval_routes(app, service, settings)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        env = ApiEnv(client, service, opened, clock, settings)
        response = await client.get(API_PREFIX + "/openapi.json")
        assert response.status == 200
        env.doc = await response.json()
        yield env
    finally:
        await client.close()
        if own_store:
            await opened.close()
