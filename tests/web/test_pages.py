"""The Activity Queue's pages over HTTP without a browser: sign-in and its cookie,
CSRF and origin checks, escaping, the same refusals as the REST API, the event
stream, grants and audit. (The browser tests are in ``test_browser.py``.)"""

from __future__ import annotations

import asyncio
import html
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st

from approvals.api import add_approval_routes
from approvals.model import Status
from approvals.service import ApprovalService
from approvals.store import Store, open_store
from approvals.web import ACTIVITY_QUEUE, SESSION_COOKIE, SESSION_IDLE, add_web_routes
from approvals.web_html import highlight_sql
from tests.approvals.api_harness import Clock, make_settings, token_of
from tests.approvals.helpers import DBA, DIRECTORY, StepDef, make_grant, make_request, statement


@dataclass
class WebEnv:
    app: web.Application
    client: TestClient[web.Request, web.Application]
    service: ApprovalService
    store: Store
    clock: Clock

    async def submit(self, **kwargs: object):  # type: ignore[no-untyped-def]
        kwargs.setdefault("now", self.clock())
        return await self.service.create(make_request(**kwargs))  # type: ignore[arg-type]

    async def sign_in(self, user: str) -> None:
        form = await self.client.get("/signin")
        nonce = _csrf(await form.text())
        reply = await self.client.post("/signin", data={"csrf": nonce, "token": token_of(user)},
                                       allow_redirects=False)
        assert reply.status == 303, await reply.text()

    async def decide(self, request_id: str, *, follow: bool = True, **form: str) -> ClientResponse:
        return await self.client.post(f"/requests/{request_id}/decide", data=form, allow_redirects=follow)

    async def status(self, request_id: str) -> Status:
        found = await self.store.get(request_id)
        assert found is not None
        return found.status

    async def csrf(self, path: str = "/") -> str:
        reply = await self.client.get(path)
        assert reply.status == 200
        return _csrf(await reply.text())


def _csrf(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, page
    return match.group(1)


async def _env(tmp_path: Path, secure_cookies: bool | None = None) -> AsyncIterator[WebEnv]:
    url = f"sqlite:///{tmp_path / 'web.db'}"
    store = await open_store(url)
    clock = Clock()
    service = ApprovalService(store, DIRECTORY, clock=clock)
    settings = make_settings(store=url)
    app = web.Application()
    add_approval_routes(app, service, settings)
    add_web_routes(app, service, settings, secure_cookies=secure_cookies)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield WebEnv(app, client, service, store, clock)
    finally:
        await client.close()
        await store.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[WebEnv]:
    async for made in _env(tmp_path):
        yield made


async def test_signing_in_keeps_a_session_id_never_the_token(env: WebEnv) -> None:
    reply = await env.client.get("/", allow_redirects=False)
    assert reply.status == 303 and reply.headers["Location"] == "/signin"
    page = await env.client.get("/signin")
    nonce = _csrf(await page.text())
    wrong = await env.client.post("/signin", data={"csrf": nonce, "token": "pgv_wrong"})
    assert wrong.status == 401 and "not valid" in await wrong.text()
    page = await env.client.get("/signin")
    nonce = _csrf(await page.text())
    reply = await env.client.post("/signin", data={"csrf": nonce, "token": token_of("bob")},
                                  allow_redirects=False)
    assert reply.status == 303
    cookie = reply.headers["Set-Cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=") and "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie and "Secure" not in cookie  # plain HTTP on 127.0.0.1
    assert token_of("bob") not in cookie
    queue = env.app[ACTIVITY_QUEUE]
    assert token_of("bob") not in repr(queue.sessions._sessions)
    home = await env.client.get("/")
    assert home.status == 200 and "Signed in as <strong>bob</strong>" in await home.text()
    assert "script-src 'self'" in home.headers["Content-Security-Policy"]


async def test_sign_out_ends_the_session_for_good(env: WebEnv) -> None:
    await env.sign_in("bob")
    session_id = env.client.session.cookie_jar.filter_cookies(env.client.make_url("/"))[SESSION_COOKIE].value
    csrf = await env.csrf()
    reply = await env.client.post("/signout", data={"csrf": csrf}, allow_redirects=False)
    assert reply.status == 303 and reply.headers["Location"] == "/signin"
    replay = await env.client.get("/", allow_redirects=False, cookies={SESSION_COOKIE: session_id})
    assert replay.status == 303  # the old id is gone server-side


async def test_a_session_ends_after_being_idle(env: WebEnv) -> None:
    await env.sign_in("bob")
    env.clock.advance(SESSION_IDLE - 60)
    assert (await env.client.get("/", allow_redirects=False)).status == 200
    env.clock.advance(SESSION_IDLE + 1)
    assert (await env.client.get("/", allow_redirects=False)).status == 303


async def test_secure_cookie_when_told_tls_ends_in_front(tmp_path: Path) -> None:
    async for env in _env(tmp_path, secure_cookies=True):
        page = await env.client.get("/signin")
        assert "Secure" in page.headers["Set-Cookie"]
        nonce = _csrf(await page.text())
        reply = await env.client.post("/signin", data={"csrf": nonce, "token": token_of("bob")},
                                      allow_redirects=False, cookies={"pgvouch_signin": nonce})
        assert "Secure" in reply.headers["Set-Cookie"]


async def test_posts_without_the_csrf_token_or_from_another_origin_are_refused(env: WebEnv) -> None:
    request = await env.submit()
    await env.sign_in("bob")
    csrf = await env.csrf()
    for data, headers in (
        ({"decision": "approve"}, {}),
        ({"decision": "approve", "csrf": "forged"}, {}),
        ({"decision": "approve", "csrf": csrf}, {"Origin": "http://evil.example"}),
    ):
        reply = await env.client.post(f"/requests/{request.id}/decide", data=data, headers=headers)
        assert reply.status == 403 and "csrf_failed" in await reply.text()
    assert await env.status(request.id) is Status.PENDING
    # the sign-in form has its own token (no login CSRF)
    reply = await env.client.post("/signin", data={"token": token_of("bob")})
    assert reply.status == 403
    reply = await env.decide(request.id, decision="approve", csrf=csrf)
    assert reply.status == 200 and await env.status(request.id) is Status.APPROVED


async def test_user_provided_text_is_escaped_everywhere(env: WebEnv) -> None:
    evil = ("UPDATE t SET v = '<script>alert(1)</script>' WHERE note = $1 "
            "-- </pre><img src=x onerror=alert(2)>")
    request = await env.submit(subject=statement(evil, value='"><script>alert(3)</script>'),
                               resource="prod-<b>db</b>")
    await env.sign_in("bob")
    csrf = await env.csrf()
    await env.decide(request.id, decision="deny", csrf=csrf, note="<script>alert(4)</script>")
    pages = [await (await env.client.get(path)).text()
             for path in ("/", f"/requests/{request.id}", f"/requests/{request.id}?fragment=1", "/audit",
                          "/queue")]
    for page in pages:
        assert "<script>alert" not in page and "<img" not in page and "<b>db" not in page
    review = pages[1]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in review and "&lt;script&gt;alert(4)" in review
    assert "&quot;&gt;&lt;script&gt;alert(3)" in review


@given(st.text())
def test_the_highlighter_shows_every_character_of_the_statement(sql: str) -> None:
    shown = highlight_sql(sql)
    assert html.unescape(re.sub(r"<[^>]*>", "", shown)) == sql
    assert "<" not in re.sub(r'</?span( class="[a-z]+")?>', "", shown)


def test_the_highlighter_marks_keywords_literals_and_parameters() -> None:
    shown = highlight_sql("SELECT 'it''s', $1, 42 FROM \"T\" -- c")
    assert '<span class="kw">SELECT</span>' in shown
    assert '<span class="str">&#x27;it&#x27;&#x27;s&#x27;</span>' in shown
    assert '<span class="param">$1</span>' in shown and '<span class="num">42</span>' in shown
    assert '<span class="ident">&quot;T&quot;</span>' in shown and '<span class="cmt">-- c</span>' in shown


async def test_refusals_are_the_workflow_codes_the_api_returns(env: WebEnv) -> None:
    request = await env.submit()
    await env.sign_in("alice")
    home = await (await env.client.get("/")).text()
    assert "Awaiting another reviewer" in home and ">Review</a>" not in home
    csrf = await env.csrf()
    reply = await env.decide(request.id, decision="approve", csrf=csrf)
    assert reply.status == 403 and "cannot_self_approve" in await reply.text()
    reply = await env.decide(request.id, decision="cancel", csrf=csrf)
    assert reply.status == 200 and f"You cancelled {request.id}." in await reply.text()
    reply = await env.decide(request.id, decision="cancel", csrf=csrf)
    assert reply.status == 409 and "not_pending" in await reply.text()


async def test_quorum_progress_and_the_already_reviewed_state(env: WebEnv) -> None:
    request = await env.submit(steps=[StepDef("DBA pair", ("group:dba",), required=2)])
    await env.sign_in("bob")
    review = await (await env.client.get(f"/requests/{request.id}")).text()
    assert "Pending (0/2)" in review and "1 more approval will be needed" in review
    csrf = await env.csrf()
    reply = await env.decide(request.id, decision="approve", csrf=csrf, note="looks right")
    text = await reply.text()
    assert "1 more approval needed (step 1/1 &#x27;DBA pair&#x27;)" in text
    assert "Pending (1/2)" in text and "You've already reviewed" in text


async def test_the_event_stream_announces_changes(env: WebEnv) -> None:
    await env.sign_in("bob")
    unauthenticated = await env.client.get("/events", cookies={SESSION_COOKIE: "nope"})
    assert unauthenticated.status == 401
    stream = await env.client.get("/events")
    assert stream.headers["Content-Type"].startswith("text/event-stream")
    assert await stream.content.readline() == b"retry: 3000\n"
    request = await env.submit()

    async def next_event() -> bytes:
        while True:
            line = await stream.content.readline()
            if line.startswith(b"data: "):
                return line

    line = await asyncio.wait_for(next_event(), 5)
    assert request.id.encode() in line and b'"pending"' in line
    stream.close()


async def test_grants_tab_lists_and_revokes(env: WebEnv) -> None:
    pending = await env.service.create(make_grant(now=env.clock()))
    active = await env.service.create(make_grant(now=env.clock(), duration=1800))
    await env.service.vote(active.id, "bob", "approve", None)
    await env.sign_in("carol")
    page = await (await env.client.get("/grants")).text()
    assert pending.id in page and active.id in page and "incident 4711" in page
    assert f'aria-label="Revoke grant {active.id}"' in page
    assert f'aria-label="Revoke grant {pending.id}"' not in page
    reply = await env.decide(active.id, decision="revoke", csrf=_csrf(page), next="/grants")
    assert reply.status == 200 and f"You revoked {active.id}." in await reply.text()
    assert reply.url.path == "/grants" and await env.status(active.id) is Status.REVOKED


async def test_audit_tab_filters_and_shows_the_chain_verified(env: WebEnv) -> None:
    first = await env.submit()
    second = await env.submit(steps=[DBA], requester="frank")
    await env.service.vote(first.id, "bob", "approve", "ok")
    await env.sign_in("carol")
    page = await (await env.client.get("/audit")).text()
    assert "Chain verified" in page and "request.approved" in page and second.id in page
    page = await (await env.client.get(f"/audit?request={first.id.lower()}")).text()
    assert first.id in page and second.id not in page
    page = await (await env.client.get("/audit?type=request.approved&actor=bob")).text()
    assert "request.approved" in page and "request.created" not in page
    bad = await env.client.get("/audit?since=yesterday-ish")
    assert bad.status == 400


async def test_open_redirects_and_bad_filters_are_refused(env: WebEnv) -> None:
    request = await env.submit()
    await env.sign_in("bob")
    csrf = await env.csrf()
    reply = await env.decide(request.id, decision="deny", csrf=csrf, next="//evil.example/x", follow=False)
    assert reply.status == 303 and reply.headers["Location"] == "/"
    assert (await env.client.get("/?status=bogus")).status == 400
    assert (await env.client.get("/requests/not-an-id!")).status == 400
    assert (await env.client.get("/requests/R-00000")).status == 404
