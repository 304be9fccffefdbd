"""A local fake of Slack's endpoints on 127.0.0.1, and signed clicks like Slack sends them.

:class:`FakeSlack` is a real aiohttp server with the two endpoints pgvouch
calls: an incoming webhook (``/services/T000/B000/<token>``: messages
posted to the channel) and response URLs (``/actions/<n>``: what an
interaction answers). It records every JSON body it gets; pgvouch answers a
click after its HTTP 200, so tests wait for answers (:meth:`FakeSlack.wait_answers`,
or ``wait_answers_sync`` from another thread). :func:`click`
builds the form-encoded ``payload=<json>`` Slack posts when someone presses
a button, and :func:`signed_headers` signs it the way Slack does (the
algorithm is public: ``v0=`` HMAC-SHA256 over ``v0:<timestamp>:<body>``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from aiohttp.test_utils import TestServer

SIGNING_SECRET = "slack-signing-secret-for-tests"
WEBHOOK_TOKEN = "XXXXsecretTOKENxxxx"


@dataclass
class FakeSlack:
    messages: list[dict[str, Any]] = field(default_factory=list)  # posted to the channel
    responses: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # per response_url path
    base: str = ""
    fail_next: int = 0
    _numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _arrived: threading.Condition = field(default_factory=threading.Condition)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(f"/services/T000/B000/{WEBHOOK_TOKEN}", self._incoming)
        app.router.add_post("/actions/{n}", self._response)
        return app

    async def _incoming(self, request: web.Request) -> web.Response:
        if self.fail_next:
            self.fail_next -= 1
            return web.Response(status=500, text="slack_is_down")
        body = await request.json()
        if not body.get("text") and not body.get("blocks"):
            return web.Response(status=400, text="no_text")
        self.messages.append(body)
        return web.Response(text="ok")

    async def _response(self, request: web.Request) -> web.Response:
        self.responses.setdefault(request.path, []).append(await request.json())
        with self._arrived:
            self._arrived.notify_all()
        return web.json_response({"ok": True})

    @property
    def webhook_url(self) -> str:
        return f"{self.base}/services/T000/B000/{WEBHOOK_TOKEN}"

    def response_url(self) -> str:
        return f"{self.base}/actions/{next(self._numbers)}"

    def answers(self, url: str) -> list[dict[str, Any]]:
        return self.responses.get(url.removeprefix(self.base), [])

    async def wait_answers(self, url: str, count: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
        """The answers posted to ``url`` once there are ``count`` (pgvouch answers after its 200)."""
        try:
            async with asyncio.timeout(timeout):
                while len(self.answers(url)) < count:
                    await asyncio.sleep(0.01)
        except TimeoutError:
            raise AssertionError(self._missing(url, count, timeout)) from None
        return self.answers(url)

    def wait_answers_sync(self, url: str, count: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
        """:meth:`wait_answers` for a test thread while the fake runs on its own loop."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.answers(url)) >= count, timeout):
                raise AssertionError(self._missing(url, count, timeout))
        return self.answers(url)

    def _missing(self, url: str, count: int, timeout: float) -> str:
        return f"{url}: {len(self.answers(url))} of {count} answers in {timeout}s"


@asynccontextmanager
async def running_fake_slack() -> AsyncIterator[FakeSlack]:
    slack = FakeSlack()
    server = TestServer(slack.app(), host="127.0.0.1")
    await server.start_server()
    slack.base = str(server.make_url("")).rstrip("/")
    try:
        yield slack
    finally:
        await server.close()


class ThreadedFakeSlack:
    """The fake on its own thread and event loop (for tests that drive a `pgvouch serve` process)."""

    def __init__(self) -> None:
        self.slack = FakeSlack()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        async def main() -> None:
            runner = web.AppRunner(self.slack.app())
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            self.slack.base = f"http://127.0.0.1:{port}"
            self._ready.set()
            await asyncio.Event().wait()

        asyncio.run(main())


def click(action_id: str, request_id: str, slack_user: str, response_url: str,
          note: str | None = None, kind: str = "block_actions") -> bytes:
    """The form body Slack posts when ``slack_user`` presses a pgvouch button."""
    payload: dict[str, Any] = {
        "type": kind,
        "user": {"id": slack_user, "username": slack_user.lower(), "team_id": "T000"},
        "team": {"id": "T000"},
        "response_url": response_url,
        "actions": [{"type": "button", "action_id": action_id, "value": request_id,
                     "block_id": f"pgvouch_vote_{request_id}", "action_ts": "1700000000.000100"}],
        "container": {"type": "message", "message_ts": "1700000000.000001"},
    }
    if note is not None:
        payload["state"] = {"values": {"pgvouch_deny_note": {"note": {"type": "plain_text_input",
                                                                      "value": note}}}}
    return urlencode({"payload": json.dumps(payload)}).encode()


def signed_headers(body: bytes, timestamp: float, secret: str = SIGNING_SECRET) -> dict[str, str]:
    stamp = str(int(timestamp))
    digest = hmac.new(secret.encode(), f"v0:{stamp}:".encode() + body, hashlib.sha256).hexdigest()
    return {"X-Slack-Signature": f"v0={digest}", "X-Slack-Request-Timestamp": stamp,
            "Content-Type": "application/x-www-form-urlencoded"}
