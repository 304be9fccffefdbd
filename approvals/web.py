"""The Activity Queue: the approvers' web pages, served by the API process at ``/``.

Owns: signing in with a user's API token and the browser session that
follows (the cookie holds a random session id, kept here only as its
SHA-256; never the token), CSRF tokens on every state-changing form, the
routes of the pages (queue, review, grants, audit), the live-update stream
(server-sent events, fed by an :class:`ApprovalService` listener) and the
two static files in ``web_static/``.

Must not: decide anything or build markup. Votes, cancels and revokes are
the same :class:`ApprovalService` calls the REST API makes, refused with the
same workflow error codes and HTTP statuses (``approvals.api.CODE_STATUS``);
what a viewer may do comes from ``approvals.api.render_request``. Markup is
``approvals.web_html``'s, which escapes everything it did not build itself.

Sessions live in this process's memory: a restart signs everyone out, and
several replicas behind one address need sticky sessions. The session cookie
is HttpOnly and SameSite=Strict, and Secure when the page is served over
HTTPS (or ``secure_cookies=True`` says a TLS-terminating proxy is in front).
Forms carry a per-session CSRF token compared in constant time; a POST whose
``Origin`` names another host is refused before that. Every page is sent
with a Content-Security-Policy that allows only this origin's script and
stylesheet, so no inline script can run even if escaping were ever missed.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from approvals import web_html
from approvals.api import CODE_STATUS, MAX_NOTE, parse_timestamp, render_request
from approvals.audit import AuditEvent
from approvals.auth import MAX_TOKEN_LENGTH, TokenAuthenticator
from approvals.model import JSONObject, Request, Status, SubjectKind, normalize_request_id
from approvals.service import ApprovalService
from approvals.store import NotFound, StoreUnavailable
from approvals.web_html import AuditFilters, Chrome, Html, QueueFilters
from approvals.workflow import Event, WorkflowError, is_usable
from config.settings import Settings, User

log = logging.getLogger("pgvouch.web")

SESSION_COOKIE = "pgvouch_session"
SIGNIN_COOKIE = "pgvouch_signin"  # the sign-in form's CSRF nonce (there is no session yet)
SESSION_IDLE = 8 * 3600.0  # seconds without a request before a session ends
SESSION_LIFETIME = 24 * 3600.0  # seconds after sign-in a session ends regardless
SESSIONS_PER_USER = 20  # the oldest of a user's sessions ends beyond this
QUEUE_LIMIT = 200  # rows on the queue page
PENDING_CAP = 1000  # the badge counts up to this many
GRANTS_LIMIT = 500
AUDIT_PAGE, AUDIT_BATCH, AUDIT_SCAN = 200, 500, 5000  # rows shown, read per query, read per page
AUDIT_DEFAULT_WINDOW = 24 * 3600.0  # the audit tab shows the last day unless told otherwise
MAX_FILTER = 200  # characters of a filter value
HEARTBEAT = 20.0  # seconds between keep-alive comments on the event stream
DECISIONS = ("approve", "deny", "cancel", "revoke")

STATIC_DIR = Path(__file__).with_name("web_static")
ASSET_TYPES = {"activity-queue.css": "text/css", "activity-queue.js": "text/javascript"}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # not no-referrer: that makes browsers send "Origin: null"
    "Cache-Control": "no-store",
}


def add_web_routes(
    app: web.Application, service: ApprovalService, settings: Settings, *, secure_cookies: bool | None = None
) -> None:
    """Serve the Activity Queue at ``/`` on ``app`` (before ``app`` starts).

    ``secure_cookies``: None marks cookies Secure when the request came over
    HTTPS; True always (TLS ends at a proxy in front); False never.
    """
    queue = ActivityQueue(service, settings, secure_cookies=secure_cookies)
    app[ACTIVITY_QUEUE] = queue
    service.listeners.append(queue.feed.publish)
    app.on_shutdown.append(queue.on_shutdown)
    app.on_cleanup.append(queue.on_cleanup)
    router = app.router
    router.add_get("/", queue.index, name="activity_queue")
    router.add_get("/queue", queue.queue_fragment)
    router.add_get("/signin", queue.signin_form)
    router.add_post("/signin", queue.signin)
    router.add_post("/signout", queue.signout)
    router.add_get("/requests/{id}", queue.review)
    router.add_post("/requests/{id}/decide", queue.decide)
    router.add_get("/grants", queue.grants)
    router.add_get("/audit", queue.audit)
    router.add_get("/events", queue.events)
    router.add_get("/assets/{name}", queue.asset)


# -- sessions ---------------------------------------------------------------------


@dataclass
class WebSession:
    user: str
    token_sha256: str  # the configured hash the user signed in with: a rotated token ends the session
    csrf: str
    created_at: float
    seen_at: float
    flashes: list[tuple[str, str]] = field(default_factory=list)  # (kind, message) for the next page


class SessionStore:
    """Signed-in browsers; a session id is looked up by its SHA-256, never kept in clear."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._sessions: dict[str, WebSession] = {}

    @staticmethod
    def _key(session_id: str) -> str:
        return hashlib.sha256(session_id.encode("utf-8")).hexdigest()

    def open(self, user: User) -> tuple[str, WebSession]:
        now = self.clock()
        self._forget_stale(now)
        mine = sorted((s.created_at, key) for key, s in self._sessions.items() if s.user == user.name)
        for _, key in mine[: max(0, len(mine) - SESSIONS_PER_USER + 1)]:
            del self._sessions[key]
        session_id = secrets.token_urlsafe(32)
        session = WebSession(user.name, user.api_token_sha256 or "", secrets.token_urlsafe(32), now, now)
        self._sessions[self._key(session_id)] = session
        return session_id, session

    def find(self, session_id: str | None) -> WebSession | None:
        if not session_id or len(session_id) > 128:
            return None
        key = self._key(session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self.clock()
        if now - session.seen_at > SESSION_IDLE or now - session.created_at > SESSION_LIFETIME:
            del self._sessions[key]
            return None
        session.seen_at = now
        return session

    def close(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(self._key(session_id), None)

    def _forget_stale(self, now: float) -> None:
        for key, session in list(self._sessions.items()):
            if now - session.seen_at > SESSION_IDLE or now - session.created_at > SESSION_LIFETIME:
                del self._sessions[key]


# -- live updates -----------------------------------------------------------------


class ChangeFeed:
    """Fans request changes out to the open event streams (an ApprovalService listener)."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[str | None]] = set()

    def publish(self, request: Request, events: Sequence[Event]) -> None:
        message = json.dumps({"id": request.id, "status": str(request.status),
                              "events": [str(event.type) for event in events]})
        for queue in self._subscribers:
            with suppress(asyncio.QueueFull):  # a slow reader re-fetches the queue anyway
                queue.put_nowait(message)

    def subscribe(self) -> asyncio.Queue[str | None]:
        queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=64)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[str | None]) -> None:
        self._subscribers.discard(queue)

    def close(self) -> None:
        """End every stream (the server is shutting down)."""
        for queue in self._subscribers:
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(None)


# -- the pages ---------------------------------------------------------------------

Handler = Callable[["ActivityQueue", web.Request], Awaitable[web.StreamResponse]]


def _store_errors(handler: Handler) -> Handler:
    """A page whose store is down or whose request is unknown says so, instead of a 500."""

    @functools.wraps(handler)
    async def wrapped(self: ActivityQueue, request: web.Request) -> web.StreamResponse:
        try:
            return await handler(self, request)
        except StoreUnavailable as exc:
            log.warning("page %s failed, store unavailable: %s", request.path, exc)
            return _error_page(503, "Store unavailable",
                               "The approvals store is unavailable; try again shortly.", "store_unavailable")
        except NotFound as exc:
            return _error_page(404, "Not found", f"No request {exc}.", "not_found")

    return wrapped


class ActivityQueue:
    """The pages' handlers and the state they share (sessions, the change feed, the assets)."""

    def __init__(self, service: ApprovalService, settings: Settings, *,
                 secure_cookies: bool | None = None) -> None:
        self.service = service
        self.settings = settings
        self.authenticator = TokenAuthenticator(settings.users)
        self.sessions = SessionStore(service.clock)
        self.feed = ChangeFeed()
        self.secure_cookies = secure_cookies
        self.assets = {name: (STATIC_DIR / name).read_bytes() for name in ASSET_TYPES}

    async def on_shutdown(self, app: web.Application) -> None:
        self.feed.close()

    async def on_cleanup(self, app: web.Application) -> None:
        with suppress(ValueError):
            self.service.listeners.remove(self.feed.publish)

    # -- signing in and out ---------------------------------------------------------

    async def signin_form(self, request: web.Request) -> web.StreamResponse:
        if self._session(request) is not None:
            return _redirect("/")
        return self._signin_page(request)

    async def signin(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        nonce = request.cookies.get(SIGNIN_COOKIE, "")
        if not _same_origin(request) or not nonce or not _equal(_field(form, "csrf"), nonce):
            return _csrf_refused()
        token = _field(form, "token").strip()
        user = None
        if token and len(token) <= MAX_TOKEN_LENGTH and " " not in token:
            user = self.authenticator.authenticate(f"Bearer {token}")
        if user is None:
            return self._signin_page(request, "That token is not valid. Paste the whole API token.", 401)
        self.sessions.close(request.cookies.get(SESSION_COOKIE))
        session_id, _ = self.sessions.open(user)
        log.info("web sign-in: %s", user.name)
        response = _redirect("/")
        response.set_cookie(SESSION_COOKIE, session_id, path="/", httponly=True, samesite="Strict",
                            secure=self._secure(request))
        response.del_cookie(SIGNIN_COOKIE, path="/signin")
        return response

    async def signout(self, request: web.Request) -> web.StreamResponse:
        checked = await self._checked_form(request)
        if isinstance(checked, web.Response):
            return checked
        self.sessions.close(request.cookies.get(SESSION_COOKIE))
        response = _redirect("/signin")
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    def _signin_page(self, request: web.Request, error: str | None = None, status: int = 200
                     ) -> web.Response:
        nonce = secrets.token_urlsafe(32)
        response = _html(web_html.page("Sign in", web_html.signin_body(nonce, error), None), status)
        response.set_cookie(SIGNIN_COOKIE, nonce, path="/signin", httponly=True, samesite="Strict",
                            secure=self._secure(request), max_age=3600)
        return response

    # -- the queue -------------------------------------------------------------------

    @_store_errors
    async def index(self, request: web.Request) -> web.StreamResponse:
        session = self._require(request)
        filters = _queue_filters(request)
        if isinstance(filters, web.Response):
            return filters
        docs, pending = await self._queue(filters, session.user)
        body = web_html.queue_body(docs, self.service.clock(), filters, pending)
        off = [(m.glob, m.actor, m.reason or "") for m in await self.service.store.approval_modes()
               if not m.enabled]
        body = web_html.join([web_html.break_glass_banner(off), body])
        return self._page(session, "Activity Queue", body, pending, tab="queue")

    @_store_errors
    async def queue_fragment(self, request: web.Request) -> web.StreamResponse:
        """The queue's table alone, re-fetched by the page when the event stream says so."""
        session = self._session(request)
        if session is None:
            return _html(Html(""), 401)
        filters = _queue_filters(request)
        if isinstance(filters, web.Response):
            return filters
        docs, pending = await self._queue(filters, session.user)
        return _html(web_html.queue_results(docs, self.service.clock(), filters, pending))

    async def _queue(self, filters: QueueFilters, viewer: str) -> tuple[list[JSONObject], int]:
        store = self.service.store
        found = await store.list(status=filters.status, resource_glob=filters.resource, limit=QUEUE_LIMIT)
        now = self.service.clock()
        return [render_request(r, now, viewer) for r in found], await self._pending_count()

    async def _pending_count(self) -> int:
        return len(await self.service.store.list(status=Status.PENDING, limit=PENDING_CAP))

    # -- one request -------------------------------------------------------------------

    @_store_errors
    async def review(self, request: web.Request) -> web.StreamResponse:
        """The review dialog: a whole page, or with ``?fragment=1`` the dialog's content alone."""
        session = self._require(request)
        request_id = _request_id(request)
        if isinstance(request_id, web.Response):
            return request_id
        found = await self.service.store.get(request_id)
        if found is None:
            raise NotFound(request_id)
        next_url = _local_url(request.query.get("next", ""))
        return await self._review_page(request, session, found, next_url)

    async def _review_page(self, request: web.Request, session: WebSession, found: Request, next_url: str,
                           error: WorkflowError | None = None) -> web.Response:
        now = self.service.clock()
        body = web_html.review_body(
            render_request(found, now, session.user), now, csrf=session.csrf, next_url=next_url,
            max_note=MAX_NOTE, error=None if error is None else (str(error.code), error.message),
        )
        status = 200 if error is None else CODE_STATUS.get(error.code, 409)
        if request.query.get("fragment") == "1":
            return _html(body, status)
        return self._page(session, found.id, body, await self._pending_count(), tab="queue",
                          status=status)

    @_store_errors
    async def decide(self, request: web.Request) -> web.StreamResponse:
        """Approve, deny, cancel or revoke: the service's rules, the API's error codes."""
        checked = await self._checked_form(request)
        if isinstance(checked, web.Response):
            return checked
        session, form = checked
        request_id = _request_id(request)
        if isinstance(request_id, web.Response):
            return request_id
        decision = _field(form, "decision")
        note = _field(form, "note").strip() or None
        next_url = _local_url(_field(form, "next"))
        if decision not in DECISIONS:
            return _error_page(400, "Bad request", f"decision must be one of {', '.join(DECISIONS)}",
                               "bad_request")
        if note is not None and len(note) > MAX_NOTE:
            return _error_page(400, "Bad request", f"a note may be at most {MAX_NOTE} characters",
                               "bad_request")
        service, user = self.service, session.user
        try:
            if decision in ("approve", "deny"):
                updated = await service.vote(request_id, user, decision, note)
            elif decision == "cancel":
                updated = await service.cancel(request_id, user, note)
            else:
                updated = await service.revoke(request_id, user, note)
        except WorkflowError as exc:
            current = await service.store.get(request_id)
            if current is None:
                raise NotFound(request_id) from None
            return await self._review_page(request, session, current, next_url, exc)
        session.flashes.append(("ok", _decided(decision, render_request(updated, service.clock(), user))))
        return _redirect(next_url)

    # -- grants and audit ----------------------------------------------------------------

    @_store_errors
    async def grants(self, request: web.Request) -> web.StreamResponse:
        session = self._require(request)
        store, now = self.service.store, self.service.clock()
        found = [*await store.list(status=Status.PENDING, limit=GRANTS_LIMIT),
                 *await store.list(status=Status.APPROVED, limit=GRANTS_LIMIT)]
        grants = [r for r in found if r.subject_kind is SubjectKind.GRANT
                  and (r.status is Status.PENDING or is_usable(r, now))]
        docs = [render_request(r, now, session.user) for r in grants]
        body = web_html.grants_body(docs, now, session.csrf)
        return self._page(session, "Grants", body, await self._pending_count(), tab="grants")

    @_store_errors
    async def audit(self, request: web.Request) -> web.StreamResponse:
        session = self._require(request)
        query = request.query
        values = {key: query.get(key, "").strip()[:MAX_FILTER]
                  for key in ("type", "actor", "request", "since")}
        request_id = values["request"]
        if request_id:
            with suppress(ValueError):
                request_id = normalize_request_id(request_id)
        now = self.service.clock()
        since_text = values["since"]
        if not since_text and "after_id" not in query:
            since_text = web_html.iso_input(now - AUDIT_DEFAULT_WINDOW)
        try:
            since = parse_timestamp(since_text) if since_text else None
            after_id = max(0, int(query.get("after_id") or 0))
        except ValueError as exc:
            return _error_page(400, "Bad request", str(exc), "bad_request")
        filters = AuditFilters(values["type"], values["actor"], request_id, since_text)
        events, next_after_id = await self._audit_page(filters, since, after_id)
        verification = await self.service.store.verify_audit()
        body = web_html.audit_body(events, verification, filters, next_after_id)
        return self._page(session, "Audit", body, await self._pending_count(), tab="audit")

    async def _audit_page(self, filters: AuditFilters, since: float | None, after_id: int
                          ) -> tuple[list[AuditEvent], int | None]:
        """Up to a page of matching events after ``after_id``, and where the next page starts."""
        matches: list[AuditEvent] = []
        cursor, scanned = after_id, 0
        while True:
            batch = await self.service.store.audit(since=since, limit=AUDIT_BATCH, after_id=cursor)
            for event in batch:
                cursor, scanned = event.id, scanned + 1
                if filters.matches(event):
                    matches.append(event)
                    if len(matches) == AUDIT_PAGE:
                        return matches, cursor
            if len(batch) < AUDIT_BATCH:
                return matches, None
            if scanned >= AUDIT_SCAN:
                return matches, cursor

    # -- live updates and assets -----------------------------------------------------------

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: one ``change`` per request change, while the session lasts."""
        if self._session(request) is None:
            return _html(Html(""), 401)
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no",
        })
        await response.prepare(request)
        queue = self.feed.subscribe()
        try:
            await response.write(b"retry: 3000\n\n")
            while True:
                try:
                    message = await asyncio.wait_for(queue.get(), HEARTBEAT)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if message is None or self._session(request) is None:
                    break
                await response.write(f"event: change\ndata: {message}\n\n".encode())
        except ConnectionResetError:
            pass  # the browser went away
        finally:
            self.feed.unsubscribe(queue)
        return response

    async def asset(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in self.assets:
            return _error_page(404, "Not found", f"No asset {name}.", "not_found")
        return web.Response(body=self.assets[name], content_type=ASSET_TYPES[name], charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})

    # -- helpers -----------------------------------------------------------------------------

    def _session(self, request: web.Request) -> WebSession | None:
        session = self.sessions.find(request.cookies.get(SESSION_COOKIE))
        if session is None:
            return None
        user = self.settings.users.get(session.user)
        if user is None or not user.api_token_sha256 or user.api_token_sha256 != session.token_sha256:
            self.sessions.close(request.cookies.get(SESSION_COOKIE))
            return None
        return session

    def _require(self, request: web.Request) -> WebSession:
        session = self._session(request)
        if session is None:
            raise web.HTTPSeeOther("/signin")
        return session

    async def _checked_form(self, request: web.Request
                            ) -> tuple[WebSession, Mapping[str, object]] | web.Response:
        """The session and form of a POST whose origin and CSRF token check out; else the refusal."""
        if not _same_origin(request):
            return _csrf_refused()
        session = self._session(request)
        form = await request.post()
        if session is None:
            return _error_page(401, "Signed out", "Your session has ended; sign in again.", "unauthorized")
        if not _equal(_field(form, "csrf"), session.csrf):
            return _csrf_refused()
        return session, form

    def _page(self, session: WebSession, title: str, body: Html, pending: int, *, tab: str,
              status: int = 200) -> web.Response:
        flashes, session.flashes = list(session.flashes), []
        chrome = Chrome(session.user, session.csrf, pending, flashes)
        return _html(web_html.page(title, body, chrome, tab), status)

    def _secure(self, request: web.Request) -> bool:
        return request.secure if self.secure_cookies is None else self.secure_cookies


ACTIVITY_QUEUE = web.AppKey("activity_queue", ActivityQueue)


# -- small helpers ----------------------------------------------------------------------


def _html(body: Html, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8",
                        headers=SECURITY_HEADERS)


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def _error_page(status: int, title: str, message: str, code: str) -> web.Response:
    return _html(web_html.page(title, web_html.error_body(title, message, code), None), status)


def _csrf_refused() -> web.Response:
    return _error_page(403, "Refused", "This form could not be verified (a missing or stale CSRF token, or "
                       "another site's form). Reload the page and try again.", "csrf_failed")


def _equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _same_origin(request: web.Request) -> bool:
    """False when the browser says the form came from elsewhere (advisory: the CSRF token decides)."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin != "null" and urlsplit(origin).netloc == request.host


def _field(form: Mapping[str, object], name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def _local_url(value: str, default: str = "/") -> str:
    """``value`` if it is a path on this site (never another host: no open redirect)."""
    if (value.startswith("/") and not value.startswith("//") and "\\" not in value
            and value.isprintable() and len(value) <= 1000):
        return value
    return default


def _request_id(request: web.Request) -> str | web.Response:
    try:
        return normalize_request_id(request.match_info["id"])
    except ValueError as exc:
        return _error_page(400, "Bad request", str(exc), "bad_request")


def _queue_filters(request: web.Request) -> QueueFilters | web.Response:
    status = request.query.get("status") or None
    resource = (request.query.get("resource") or "").strip() or None
    if status is not None and status not in web_html.STATUS_CHOICES:
        return _error_page(400, "Bad request", f"status must be one of {', '.join(web_html.STATUS_CHOICES)}",
                           "bad_request")
    if resource is not None and len(resource) > MAX_FILTER:
        return _error_page(400, "Bad request", f"a resource glob may be at most {MAX_FILTER} characters",
                           "bad_request")
    return QueueFilters(status, resource)


def _decided(decision: str, doc: JSONObject) -> str:
    """The confirmation shown after a decision; under quorum, how many approvals remain."""
    rid = doc["id"]
    if decision == "approve":
        if doc["status"] == "pending":
            return f"You approved {rid}: {web_html.remaining_text(doc)}."
        done = "the grant is active now" if doc["kind"] == "grant" else "the statement may run now"
        return f"You approved {rid}: it has all its approvals and {done}."
    past = {"deny": "denied", "cancel": "cancelled", "revoke": "revoked"}[decision]
    return f"You {past} {rid}."

