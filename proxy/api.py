"""The HTTP side: /metrics, /healthz and /readyz (approvals come later).

Owns: the aiohttp application and its routes. Handlers only read state and
render it; no business logic lives here.

Must not: decide anything about statements or sessions.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from approvals.api import add_approval_routes
from approvals.web import add_web_routes
from proxy.metrics import merge_expositions
from proxy.server import ProxyServer
from proxy.worker_link import LinkLost

PROXY = web.AppKey("proxy", ProxyServer)
log = logging.getLogger("pgvouch.api")
PENDING_TIMEOUT = 2.0  # a store slower than this leaves pgvouch_requests_pending as it was


async def metrics(request: web.Request) -> web.Response:
    proxy = request.app[PROXY]
    if proxy.approvals is not None:
        # what the store holds, not this process's count of what it saw created and
        # decided (holds on other workers and replicas are created elsewhere)
        try:
            async with asyncio.timeout(PENDING_TIMEOUT):
                pending = await proxy.approvals.store.count_pending()
        except Exception as exc:
            log.debug("pgvouch_requests_pending not refreshed: %s", exc)
        else:
            proxy.metrics.requests_pending.set(pending)
    body = generate_latest(proxy.metrics.registry)
    if proxy.link is not None:  # one of several workers: the sum over all of them
        try:
            others = await proxy.link.ask("metrics")
        except (LinkLost, TimeoutError):
            return web.json_response({"error": "the other workers did not answer"}, status=503)
        if len(others) < proxy.settings.workers - 1:
            return web.json_response({"error": "some workers did not answer"}, status=503)
        body = merge_expositions(body.decode(), [str(text) for text in others])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    proxy = request.app[PROXY]
    if not proxy.serving():
        return web.json_response({"status": "not ready"}, status=503)
    return web.json_response({"status": "ready", "sessions": len(proxy.sessions)})


def make_app(proxy: ProxyServer) -> web.Application:
    app = web.Application()
    app[PROXY] = proxy
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if proxy.approvals is not None:
        add_approval_routes(app, proxy.approvals, proxy.settings, proxy.grants)
        add_web_routes(app, proxy.approvals, proxy.settings)
    return app


async def start_api(proxy: ProxyServer) -> web.AppRunner | None:
    api = proxy.settings.api
    if not api.enabled:
        return None
    runner = web.AppRunner(make_app(proxy), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, api.host, api.port, reuse_address=True)
    await site.start()
    return runner
