"""The approvers' REST API under ``/api/v1``, and its OpenAPI document.

Owns: the HTTP surface of the approvals: bearer-token authentication of
every call (but the signed inbound hook and the OpenAPI document), input
validation, rendering requests, votes, audit events and deliveries as JSON,
and the mapping of every refusal to a JSON error ``{"error": {"code",
"message"}}`` with a stable code and an HTTP status (:data:`CODE_STATUS`).

Must not: decide anything. Who may vote, cancel or see a request move is
``approvals.workflow``'s, applied through :class:`ApprovalService`; handlers
only validate, call the service and render. Bad input of any shape is a 4xx
error, never a crash: bodies are read with a size cap, JSON is parsed
defensively and every field is type-checked.

Wiring: :func:`add_approval_routes` mounts a sub-application at
``/api/v1`` on the proxy's aiohttp app (its middlewares turn every error
under the prefix, 404 and 405 included, into the JSON error shape).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from approvals import preview, workflow
from approvals.approval_mode import MAX_REASON, ApprovalModeError, ApprovalModes
from approvals.auth import TokenAuthenticator
from approvals.model import JSONObject, Request, Status, normalize_request_id, request_fields
from approvals.service import ApprovalService
from approvals.store import ApprovalMode, Delivery, DeliveryStatus, NotFound, StoreUnavailable
from approvals.webhooks import (
    SIGNATURE_HEADER,
    ReplayGuard,
    SignatureError,
    check_signature,
    redact_url,
    speaks_for,
)
from approvals.workflow import Code, WorkflowError, format_duration
from config.settings import Integration, Settings, User
from config.yamlnodes import ConfigError

if TYPE_CHECKING:
    from approvals.grants import GrantDesk

log = logging.getLogger("pgvouch.api")

API_PREFIX = "/api/v1"
MAX_BODY = 64 * 1024  # bytes; JSON bodies here are a note and a few ids
MAX_NOTE = 4000  # characters
DEFAULT_LIMIT, MAX_LIST_LIMIT, MAX_AUDIT_LIMIT = 100, 500, 1000

SERVICE = web.AppKey("approvals_service", ApprovalService)
SETTINGS = web.AppKey("approvals_settings", Settings)
AUTHENTICATOR = web.AppKey("approvals_authenticator", TokenAuthenticator)
REPLAYS = web.AppKey("approvals_replays", ReplayGuard)
USER = web.RequestKey("approvals_user", User)

# Routes that authenticate otherwise (the hooks by their signatures) or not at all.
PUBLIC_ROUTES = frozenset({"openapi", "hook", "slack_interactions"})

# The HTTP status of every error code the API returns.
CODE_STATUS: Mapping[str, int] = {
    # the workflow's refusals
    Code.CANNOT_SELF_APPROVE: 403,
    Code.NOT_ELIGIBLE: 403,
    Code.NOT_REQUESTER: 403,
    Code.WOULD_STRAND: 403,
    Code.GRANT_NOT_ALLOWED: 403,
    Code.ALREADY_REVIEWED: 409,
    Code.EXPIRED: 409,
    Code.NOT_PENDING: 409,
    Code.NOT_APPROVED: 409,
    Code.NOT_EXECUTING: 409,
    Code.NOT_DUE: 409,
    Code.WRONG_SUBJECT: 409,
    Code.UNREACHABLE: 409,
    Code.INVALID_DECISION: 400,
    Code.DURATION_TOO_LONG: 400,
    # the API's own
    "bad_request": 400,
    "invalid_json": 400,
    "unauthorized": 401,
    "missing_signature": 401,
    "malformed_signature": 401,
    "stale_signature": 401,
    "bad_signature": 401,
    "replayed_signature": 401,
    "not_delegated": 403,
    "not_owner": 403,
    "not_off": 409,
    # grants (approvals.grants)
    "invalid_grant": 400,
    "unknown_resource": 400,
    "account_not_allowed": 403,
    "grant_denied": 403,
    "no_approval_needed": 409,
    "grants_unavailable": 503,
    "not_found": 404,
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "internal_error": 500,
    "integration_misconfigured": 500,
    "store_unavailable": 503,
}

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


class ApiError(Exception):
    """A refusal rendered as ``{"error": {"code", "message"}}`` with the code's HTTP status."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def add_approval_routes(app: web.Application, service: ApprovalService, settings: Settings,
                        grants: GrantDesk | None = None) -> None:
    """Mount the approvals API at ``/api/v1`` on ``app`` (before ``app`` starts)."""
    app.add_subapp(API_PREFIX, approvals_app(service, settings, grants))


def approvals_app(service: ApprovalService, settings: Settings,
                  grants: GrantDesk | None = None) -> web.Application:
    """The API as an application of its own, routes relative to ``/api/v1``.

    ``grants`` answers grant requests (it needs the policies); without it
    ``POST /grants`` and ``convert-to-grant`` answer ``grants_unavailable``.
    """
    api = web.Application(middlewares=[_json_errors, _authenticate])
    api[SERVICE] = service
    api[SETTINGS] = settings
    api[AUTHENTICATOR] = TokenAuthenticator(settings.users)
    api[REPLAYS] = ReplayGuard()
    router = api.router
    router.add_get("/openapi.json", openapi, name="openapi")
    router.add_get("/me", me, name="me")
    router.add_get("/requests", list_requests, name="requests")
    router.add_get("/requests/{id}", get_request, name="request")
    router.add_post("/requests/{id}/approve", approve, name="approve")
    router.add_post("/requests/{id}/deny", deny, name="deny")
    router.add_post("/requests/{id}/cancel", cancel, name="cancel")
    router.add_get("/audit", audit, name="audit")
    router.add_get("/audit/verify", audit_verify, name="audit_verify")
    router.add_get("/deliveries", deliveries, name="deliveries")
    router.add_post("/hooks/{integration}", hook, name="hook")
    from approvals.grants_api import add_grant_routes  # it imports this module

    add_grant_routes(api, grants)
    modes = router.add_resource("/approval-mode", name="approval_mode")
    modes.add_route("GET", get_approval_mode)
    modes.add_route("POST", set_approval_mode)
    if settings.slack is not None:
        from approvals.slack_interactions import SlackInteractions  # it imports this module

        slack = SlackInteractions(service, settings, api[REPLAYS])
        router.add_post("/slack/interactions", slack.handle, name="slack_interactions")
        api.on_cleanup.append(slack.cleanup)
    else:
        router.add_post("/slack/interactions", slack_not_configured, name="slack_interactions")
    return api


# -- middlewares -----------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(code: str, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"error": {"code": str(code), "message": message}},
        status=CODE_STATUS.get(code, 409),
        headers=headers,
    )


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        headers = {"WWW-Authenticate": 'Bearer realm="pgvouch"'} if exc.code == "unauthorized" else None
        return error_response(exc.code, exc.message, headers)
    except WorkflowError as exc:
        return error_response(exc.code, exc.message)
    except NotFound as exc:
        message = str(exc)
        return error_response("not_found", message if message.startswith("no ") else f"no request {message}")
    except StoreUnavailable as exc:
        log.warning("API call failed, store unavailable: %s", exc)
        return error_response("store_unavailable", "the approvals store is unavailable; try again shortly")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "bad_request")
        message = exc.reason
        headers = None
        if exc.status == 404:
            message = f"no endpoint {request.path}; see {API_PREFIX}/openapi.json"
        elif "Allow" in exc.headers:
            headers = {"Allow": exc.headers["Allow"]}
            message = f"{request.method} is not allowed here; use {exc.headers['Allow']}"
        return web.json_response({"error": {"code": code, "message": message}}, status=exc.status,
                                 headers=headers)
    except Exception:
        log.exception("API call %s %s failed", request.method, request.path)
        return error_response("internal_error", "internal error; see the pgvouch log")


@web.middleware
async def _authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.match_info.route.name not in PUBLIC_ROUTES:
        user = request.app[AUTHENTICATOR].authenticate(request.headers.get("Authorization"))
        if user is None:
            raise ApiError("unauthorized", "send a valid API token: Authorization: Bearer <token>")
        request[USER] = user
    return await handler(request)


# -- handlers --------------------------------------------------------------------


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


async def me(request: web.Request) -> web.Response:
    user = request[USER]
    return web.json_response({"name": user.name, "groups": list(user.groups), "roles": list(user.roles)})


async def list_requests(request: web.Request) -> web.Response:
    status = _query_choice(request, "status", [str(s) for s in Status])
    resource = request.query.get("resource") or None
    limit = _query_int(request, "limit", DEFAULT_LIMIT, 1, MAX_LIST_LIMIT)
    service = request.app[SERVICE]
    found = await service.store.list(status=status, resource_glob=resource, limit=limit)
    now, viewer = service.clock(), request[USER].name
    return web.json_response({"requests": [render_request(r, now, viewer) for r in found]})


async def get_request(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    request_id = _request_id(request)
    found = await service.store.get(request_id)
    if found is None:
        raise ApiError("not_found", f"no request {request_id}")
    return web.json_response(render_request(found, service.clock(), request[USER].name))


async def approve(request: web.Request) -> web.Response:
    return await _vote(request, "approve")


async def deny(request: web.Request) -> web.Response:
    return await _vote(request, "deny")


async def _vote(request: web.Request, decision: str) -> web.Response:
    return await noted_action(
        request, lambda service, request_id, user, note: service.vote(request_id, user, decision, note))


async def cancel(request: web.Request) -> web.Response:
    return await noted_action(request, ApprovalService.cancel)


NotedAction = Callable[[ApprovalService, str, str, "str | None"], Awaitable[Request]]


async def noted_action(request: web.Request, act: NotedAction) -> web.Response:
    """``act(service, request id, user, note)`` on the request in the path; the body may hold a note."""
    request_id = _request_id(request)
    note = _note(await _optional_json_object(request, ("note",)))
    service, user = request.app[SERVICE], request[USER].name
    updated = await act(service, request_id, user, note)
    return web.json_response(render_request(updated, service.clock(), user))


async def audit(request: web.Request) -> web.Response:
    since = _query_time(request, "since")
    limit = _query_int(request, "limit", DEFAULT_LIMIT, 1, MAX_AUDIT_LIMIT)
    after_id = _query_int(request, "after_id", 0, 0, 2**62)
    events = await request.app[SERVICE].store.audit(since=since, limit=limit, after_id=after_id)
    return web.json_response(
        {
            "events": [event.to_dict() for event in events],
            "next_after_id": events[-1].id if len(events) == limit else None,
        }
    )


async def audit_verify(request: web.Request) -> web.Response:
    result = await request.app[SERVICE].store.verify_audit()
    return web.json_response(
        {"ok": result.ok, "first_bad_id": result.first_bad_id, "message": result.message}
    )


async def deliveries(request: web.Request) -> web.Response:
    status = _query_choice(request, "status", [str(s) for s in DeliveryStatus])
    limit = _query_int(request, "limit", DEFAULT_LIMIT, 1, MAX_LIST_LIMIT)
    found = await request.app[SERVICE].store.list_deliveries(status=status, limit=limit)
    return web.json_response({"deliveries": [render_delivery(d) for d in found]})


async def hook(request: web.Request) -> web.Response:
    """An integration (chat-ops bot, ticketing system) casts a vote for one of its approvers.

    Authenticated by ``X-Pgvouch-Signature`` over the raw body with the
    integration's secret; a signature is accepted once (see
    :class:`~approvals.webhooks.ReplayGuard`: across replicas the store's
    record of votes makes a replayed vote fail as ``already_reviewed``).
    """
    integration = _integration(request)
    body = await _read_body(request)
    seen = _check_hook_signature(request, integration, body)
    fields = _parse_object(body, ("request_id", "approver", "decision", "note"),
                           required=("request_id", "approver", "decision"))
    request_id = _parse_request_id(_string(fields, "request_id"))
    approver, decision = _string(fields, "approver"), _string(fields, "decision")
    note = _note(fields)
    if not speaks_for(integration, approver, request.app[SETTINGS].groups_of(approver)):
        raise ApiError("not_delegated", f"integration {integration.name} may not vote for {approver}")
    service = request.app[SERVICE]
    try:
        updated = await service.vote(
            request_id, approver, decision, note, via=f"integration:{integration.name}"
        )
    except StoreUnavailable:
        request.app[REPLAYS].forget(seen)  # nothing happened: the same signed call may be retried
        raise
    return web.json_response(render_request(updated, service.clock(), approver))


async def get_approval_mode(request: web.Request) -> web.Response:
    modes = await ApprovalModes(request.app[SERVICE]).current()
    return web.json_response({"modes": [render_mode(mode) for mode in modes]})


async def set_approval_mode(request: web.Request) -> web.Response:
    """Break-glass: an owner switches approvals off (or back on) for a resource glob."""
    fields = _parse_object(await _read_body(request), ("resources", "enabled", "reason"),
                           required=("resources", "enabled"))
    resources, enabled, reason = fields["resources"], fields["enabled"], fields.get("reason")
    if not isinstance(resources, str):
        raise ApiError("bad_request", "resources must be a string (a glob such as prod-*)")
    if not isinstance(enabled, bool):
        raise ApiError("bad_request", "enabled must be true or false")
    if reason is not None and not isinstance(reason, str):
        raise ApiError("bad_request", "reason must be a string")
    try:
        change = await ApprovalModes(request.app[SERVICE]).set_approval_mode(
            request[USER], resources, enabled, reason)
    except ApprovalModeError as exc:
        raise ApiError(exc.code, exc.message) from None
    return web.json_response({"mode": render_mode(change.mode), "expired": list(change.expired)})


async def slack_not_configured(request: web.Request) -> web.Response:
    raise ApiError("not_found", "Slack is not configured here (notify.slack)")


def _check_hook_signature(request: web.Request, integration: Integration, body: bytes) -> str:
    """The replay-guard key of a valid, fresh, first-seen signature of ``body``; else ApiError."""
    try:
        secret = integration.secret()
    except ConfigError as exc:
        log.error("inbound hook %s: %s", integration.name, exc)
        raise ApiError("integration_misconfigured", f"integration {integration.name} has no secret") from None
    now = request.app[SERVICE].clock()
    try:
        digest = check_signature(secret, request.headers.get(SIGNATURE_HEADER), body, now)
    except SignatureError as exc:
        raise ApiError(exc.code, exc.message) from None
    seen = f"{integration.name}:{digest}"
    if not request.app[REPLAYS].first_use(seen, now):
        raise ApiError("replayed_signature", "this signature was already used; sign every call anew")
    return seen


# -- input -----------------------------------------------------------------------


async def _read_body(request: web.Request, limit: int = MAX_BODY) -> bytes:
    """The request body, refused with 413 beyond ``limit`` bytes (whatever the app's client_max_size)."""
    too_large = ApiError("payload_too_large", f"the body may be at most {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    body = bytearray()
    while chunk := await request.content.read(limit + 1 - len(body)):
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def _optional_json_object(request: web.Request, allowed: tuple[str, ...]) -> JSONObject:
    """The body as a JSON object with only ``allowed`` keys; an empty body is ``{}``."""
    body = await _read_body(request)
    return _parse_object(body, allowed, required=()) if body.strip() else {}


def _parse_object(body: bytes, allowed: tuple[str, ...], required: tuple[str, ...]) -> JSONObject:
    try:
        value = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise ApiError("invalid_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError("bad_request", f"the body must be a JSON object, not {type(value).__name__}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ApiError("bad_request", f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    missing = [key for key in required if key not in value]
    if missing:
        raise ApiError("bad_request", f"missing field(s) {', '.join(missing)}")
    return value


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _string(fields: JSONObject, key: str) -> str:
    value = fields.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ApiError("bad_request", f"{key} must be a non-empty string")
    return value.strip()


def _note(fields: JSONObject) -> str | None:
    note = fields.get("note")
    if note is None:
        return None
    if not isinstance(note, str):
        raise ApiError("bad_request", "note must be a string")
    if len(note) > MAX_NOTE:
        raise ApiError("bad_request", f"note may be at most {MAX_NOTE} characters")
    if any(not char.isprintable() and char not in "\r\n\t" for char in note):
        # a NUL cannot be stored (jsonb) and escapes would reach logs and terminals
        raise ApiError("bad_request", "note must not contain control characters")
    return note.strip() or None


def _request_id(request: web.Request) -> str:
    return _parse_request_id(request.match_info["id"])


def _parse_request_id(text: str) -> str:
    try:
        return normalize_request_id(text)
    except ValueError as exc:
        raise ApiError("bad_request", str(exc)) from None


def _integration(request: web.Request) -> Integration:
    name = request.match_info["integration"]
    for integration in request.app[SETTINGS].integrations:
        if integration.name == name:
            return integration
    raise ApiError("not_found", f"no integration named {name!r}")


def _query_choice(request: web.Request, name: str, choices: list[str]) -> str | None:
    value = request.query.get(name) or None
    if value is not None and value not in choices:
        raise ApiError("bad_request", f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiError("bad_request", f"{name} must be an integer, not {text!r}") from None
    if not low <= value <= high:
        raise ApiError("bad_request", f"{name} must be between {low} and {high}")
    return value


def _query_time(request: web.Request, name: str) -> float | None:
    text = request.query.get(name)
    if not text:
        return None
    try:
        return parse_timestamp(text)
    except ValueError as exc:
        raise ApiError("bad_request", f"{name}: {exc}") from None


def parse_timestamp(text: str) -> float:
    """Unix seconds, or an ISO 8601 date or time (UTC unless it says otherwise), as unix seconds."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(
                f"{text!r} is neither unix seconds nor an ISO 8601 time (e.g. 2025-01-31T08:00:00Z)"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a time")
    return value


# -- rendering -------------------------------------------------------------------


def render_request(request: Request, now: float, viewer: str | None = None) -> JSONObject:
    """A request as the API shows it: what, where, who voted, progress per step, time left."""
    progress = workflow.progress(request, now)
    own_vote = next((v for v in request.votes if v.user == viewer), None)
    return {
        **request_fields(request),
        "decided_at": request.decided_at,
        "approved_until": request.approved_until,
        "executed_at": request.executed_at,
        "error": request.error,
        "preview": preview.render(request.preview, now),
        "summary": progress.summary(),
        "time_left": progress.time_left,
        "time_left_text": None if progress.time_left is None else format_duration(progress.time_left),
        "current_step": progress.current_step,
        "may_vote": list(progress.may_vote),
        "steps": [
            {
                "index": step.index,
                "name": step.name,
                "policy": request.steps[step.index].policy,
                "rule": request.steps[step.index].rule,
                "approvers": list(request.steps[step.index].approvers),
                "eligible": sorted(request.steps[step.index].eligible),
                "required": step.required,
                "approved_by": list(step.approved_by),
                "progress": step.count,
                "may_vote": list(step.may_vote),
                "done": step.done,
                "current": step.current,
            }
            for step in progress.steps
        ],
        "votes": [
            {
                "user": vote.user,
                "decision": str(vote.decision),
                "note": vote.note,
                "step": vote.step_index,
                "at": vote.at,
            }
            for vote in request.votes
        ],
        "viewer": {
            "name": viewer,
            "is_requester": viewer == request.requester,
            "may_vote": viewer in progress.may_vote,
            "voted": None if own_vote is None else str(own_vote.decision),
        },
    }


def render_mode(mode: ApprovalMode) -> JSONObject:
    return {"resources": mode.glob, "enabled": mode.enabled, "reason": mode.reason,
            "changed_by": mode.actor, "changed_at": mode.changed_at}


def render_delivery(delivery: Delivery) -> JSONObject:
    request = delivery.payload.get("request")
    return {
        "id": delivery.id,
        "channel": delivery.channel,
        "target": redact_url(delivery.target) if delivery.channel == "webhook" else delivery.target,
        "event": delivery.payload.get("event"),
        "request_id": request.get("id") if isinstance(request, dict) else None,
        "status": str(delivery.status),
        "attempts": delivery.attempts,
        "created_at": delivery.created_at,
        "next_attempt_at": delivery.next_attempt_at,
        "delivered_at": delivery.delivered_at,
        "last_error": delivery.last_error,
    }


# -- the OpenAPI document ----------------------------------------------------------


def _ref(name: str) -> JSONObject:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(type_name: str) -> JSONObject:
    return {"type": [type_name, "null"]}


def _object(properties: JSONObject, required: list[str] | None = None, **extra: Any) -> JSONObject:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
        **extra,
    }


def _json(schema: JSONObject, description: str) -> JSONObject:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> JSONObject:
    return {str(status): {"$ref": f"#/components/responses/E{status}"} for status in statuses}


def _codes_for(status: int) -> list[str]:
    return sorted(str(code) for code, code_status in CODE_STATUS.items() if code_status == status)


_STATUS_TEXT = {
    400: "Bad input",
    401: "Not authenticated",
    403: "Not allowed for this user",
    404: "No such request or integration",
    405: "Method not allowed",
    409: "The request's state does not allow this",
    413: "Body too large",
    500: "Server error",
    503: "The approvals store is unavailable",
}

_REQUEST_ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "Request id as people type it: R-7KQ2X, r-7kq2x or 7KQ2X",
    "schema": {"type": "string"},
}
_NOTE_BODY = {
    "required": False,
    "content": {"application/json": {"schema": _ref("NoteBody")}},
}
_COMMON = (400, 401, 405, 413, 500, 503)


def _vote_operation(summary: str, description: str) -> JSONObject:
    return {
        "summary": summary,
        "description": description,
        "parameters": [_REQUEST_ID_PARAM],
        "requestBody": _NOTE_BODY,
        "responses": {"200": _json(_ref("Request"), "The request after the change"),
                      **_errors(*_COMMON, 403, 404, 409)},
    }


def _query(name: str, description: str, schema: JSONObject) -> JSONObject:
    """An optional query parameter of the OpenAPI document."""
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema}


def _limit(default: int, maximum: int) -> JSONObject:
    return {"name": "limit", "in": "query", "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": maximum, "default": default}}


OPENAPI: JSONObject = {
    "openapi": "3.1.0",
    "info": {
        "title": "pgvouch approvals API",
        "version": "1",
        "description": (
            "Review statements and grants held by the pgvouch PostgreSQL proxy. Every call but "
            "/openapi.json and /hooks/{integration} needs `Authorization: Bearer <token>` (make "
            "a token with `pgvouch user token NAME`). Times are unix seconds. Errors are "
            "`{\"error\": {\"code\", \"message\"}}`; match on `code`, it is stable."
        ),
    },
    "servers": [{"url": API_PREFIX}],
    "security": [{"bearer": []}],
    "paths": {
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": _json({"type": "object"}, "The OpenAPI 3.1 document")},
            }
        },
        "/me": {
            "get": {
                "summary": "Who the token belongs to",
                "responses": {"200": _json(_ref("Me"), "The authenticated user"), **_errors(401, 500)},
            }
        },
        "/requests": {
            "get": {
                "summary": "List requests, newest first",
                "parameters": [
                    {"name": "status", "in": "query", "required": False,
                     "schema": {"enum": [str(s) for s in Status]}},
                    _query("resource", "fnmatch glob on the resource name, e.g. prod-*",
                           {"type": "string"}),
                    _limit(DEFAULT_LIMIT, MAX_LIST_LIMIT),
                ],
                "responses": {
                    "200": _json(_object({"requests": {"type": "array", "items": _ref("Request")}}),
                                 "The matching requests"),
                    **_errors(400, 401, 500, 503),
                },
            }
        },
        "/requests/{id}": {
            "get": {
                "summary": "One request with its votes, progress per step and time left",
                "parameters": [_REQUEST_ID_PARAM],
                "responses": {"200": _json(_ref("Request"), "The request"),
                              **_errors(400, 401, 404, 500, 503)},
            }
        },
        "/requests/{id}/approve": {
            "post": _vote_operation(
                "Approve the current step",
                "Four-eyes: the requester cannot approve (cannot_self_approve). A person counts "
                "once per request (already_reviewed); only eligible approvers of the current step "
                "may vote (not_eligible).",
            )
        },
        "/requests/{id}/deny": {
            "post": _vote_operation(
                "Deny the request (at once, whatever the step)",
                "A note saying why is recommended; the requester sees it.",
            )
        },
        "/requests/{id}/cancel": {
            "post": _vote_operation("Withdraw a pending request (its requester only)",
                                    "Only the requester may cancel (not_requester)."),
        },
        "/requests/{id}/convert-to-grant": {
            "post": {
                "summary": "Turn your pending statement request into a grant request",
                "description": (
                    "Its requester only (not_requester). Cancels the statement request (note "
                    "\"converted to grant R-...\"; a psql still waiting for it gets the "
                    "cancellation) and asks for a grant of the statement's kinds and tables on the "
                    "same resource and account, checked like POST /grants."
                ),
                "parameters": [_REQUEST_ID_PARAM],
                "requestBody": {"required": True,
                                "content": {"application/json": {"schema": _ref("ConvertBody")}}},
                "responses": {
                    "201": _json(_object({"grant": _ref("Request"), "cancelled": _ref("Request")}),
                                 "The new grant request and the cancelled statement request"),
                    **_errors(*_COMMON, 403, 404, 409),
                },
            }
        },
        "/grants": {
            "post": {
                "summary": "Ask for a just-in-time grant (you are the requester)",
                "description": (
                    "Checked against the policies in force as one statement per kind naming the "
                    "tables (any table when none are given): a kind a policy denies is refused "
                    "(grant_denied: a grant never overrides a deny), nothing to review is refused "
                    "(no_approval_needed), a deciding rule without jit is refused "
                    "(grant_not_allowed), a duration above the rules' jit.max_duration is refused "
                    "with the cap in the message (duration_too_long). Otherwise a pending grant "
                    "request goes through the rules' steps like a statement; its window starts at "
                    "approval."
                ),
                "requestBody": {"required": True,
                                "content": {"application/json": {"schema": _ref("GrantBody")}}},
                "responses": {"201": _json(_ref("Request"), "The pending grant request"),
                              **_errors(*_COMMON, 403, 409)},
            },
            "get": {
                "summary": "List grant requests, newest first (among the newest 500 requests)",
                "parameters": [
                    _query("active", "true: only approved grants whose window is open",
                           {"type": "boolean"}),
                    _query("mine", "true: only your own grants", {"type": "boolean"}),
                    _limit(DEFAULT_LIMIT, MAX_LIST_LIMIT),
                ],
                "responses": {
                    "200": _json(_object({"grants": {"type": "array", "items": _ref("Request")}}),
                                 "The matching grants"),
                    **_errors(400, 401, 500, 503),
                },
            },
        },
        "/grants/{id}/revoke": {
            "post": _vote_operation(
                "End an approved grant now",
                "Its requester or anyone eligible to approve it (not_eligible); only approved "
                "grants (not_approved); statements are not revoked (wrong_subject). With "
                "terminate_sessions the holder's sessions on the resource are closed (PV006).",
            )
        },
        "/audit": {
            "get": {
                "summary": "Audit events in id order",
                "parameters": [
                    _query("since", "unix seconds or ISO 8601 (UTC unless it says otherwise)",
                           {"type": "string"}),
                    _query("after_id", "page on: the previous page's next_after_id",
                           {"type": "integer", "minimum": 0}),
                    _limit(DEFAULT_LIMIT, MAX_AUDIT_LIMIT),
                ],
                "responses": {"200": _json(_ref("AuditPage"), "A page of events"),
                              **_errors(400, 401, 500, 503)},
            }
        },
        "/audit/verify": {
            "get": {
                "summary": "Verify the audit log's hash chain",
                "responses": {
                    "200": _json(_ref("Verification"), "The verification (ok or the first bad event)"),
                    **_errors(401, 500, 503),
                },
            }
        },
        "/deliveries": {
            "get": {
                "summary": "Outbound webhook deliveries, newest first",
                "parameters": [
                    {"name": "status", "in": "query", "required": False,
                     "schema": {"enum": [str(s) for s in DeliveryStatus]}},
                    _limit(DEFAULT_LIMIT, MAX_LIST_LIMIT),
                ],
                "responses": {
                    "200": _json(_object({"deliveries": {"type": "array", "items": _ref("Delivery")}}),
                                 "The deliveries"),
                    **_errors(400, 401, 500, 503),
                },
            }
        },
        "/hooks/{integration}": {
            "post": {
                "summary": "Inbound decision from an integration (chat-ops bot, ticketing system)",
                "description": (
                    "Authenticated by `X-Pgvouch-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "
                    "\"<t>.<body>\")>` with the integration's secret over the raw body. The timestamp "
                    "must be within 5 minutes of the server's clock and each signature is accepted "
                    "once. The integration may only vote for the approvers it is configured for "
                    "(not_delegated); then the same workflow rules apply to the named approver."
                ),
                "security": [],
                "parameters": [
                    {"name": "integration", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "X-Pgvouch-Signature", "in": "header", "required": True,
                     "schema": {"type": "string"}},
                ],
                "requestBody": {"required": True,
                                "content": {"application/json": {"schema": _ref("HookBody")}}},
                "responses": {"200": _json(_ref("Request"), "The request after the vote"),
                              **_errors(*_COMMON, 403, 404, 409)},
            }
        },
        "/approval-mode": {
            "get": {
                "summary": "Where approvals are switched off (break-glass), and every glob ever switched",
                "responses": {
                    "200": _json(_object({"modes": {"type": "array", "items": _ref("ApprovalMode")}}),
                                 "The current mode of every glob, by glob"),
                    **_errors(401, 405, 500, 503),
                },
            },
            "post": {
                "summary": "Switch approvals off (break-glass) or back on for a resource glob; owners only",
                "description": (
                    "Off: statements that would be held for review on a matching resource run "
                    "directly, each audited as statement.break_glass; deny rules still apply. "
                    "Pending requests on those resources are expired at once. A reason is "
                    "required. On: ends the break-glass of that same glob (not_off if it is not "
                    "off). Every switch is audited (approval_mode.off / approval_mode.on) and "
                    "announced to every webhook, Slack and email. Only users with roles: [owner] "
                    "(not_owner)."
                ),
                "requestBody": {"required": True,
                                "content": {"application/json": {"schema": _ref("ApprovalModeBody")}}},
                "responses": {
                    "200": _json(_object({
                        "mode": _ref("ApprovalMode"),
                        "expired": {"type": "array", "items": {"type": "string"},
                                    "description": "the pending requests this switch expired"},
                    }), "The new mode"),
                    **_errors(*_COMMON, 403, 409),
                },
            },
        },
        "/slack/interactions": {
            "post": {
                "summary": "Slack's interactivity requests (Approve / Deny buttons); only with notify.slack",
                "description": (
                    "Authenticated by Slack's `X-Slack-Signature: v0=<hex HMAC-SHA256(signing secret, "
                    "\"v0:<X-Slack-Request-Timestamp>:<body>\")>`; the timestamp must be within 5 "
                    "minutes and each signature is accepted once. The form body's `payload` is a "
                    "block_actions JSON; the Slack user must be mapped (`users[].slack_id`). The vote "
                    "goes through the same workflow; the HTTP response is an empty 200 as soon as the "
                    "click is authenticated and valid, and the answer is sent later to the payload's "
                    "`response_url` (allowed hosts only)."
                ),
                "security": [],
                "requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {
                    "schema": _object({"payload": {"type": "string"}}, ["payload"])}}},
                "responses": {"200": {"description": "Accepted (the answer goes to response_url)"},
                              **_errors(400, 401, 404, 413, 500)},
            }
        },
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "responses": {
            f"E{status}": _json(_ref("Error"), f"{text}; code: {', '.join(_codes_for(status))}")
            for status, text in _STATUS_TEXT.items()
        },
        "schemas": {
            "Error": _object({
                "error": _object({
                    "code": {"type": "string", "enum": sorted(str(code) for code in CODE_STATUS)},
                    "message": {"type": "string"},
                }),
            }),
            "Me": _object({
                "name": {"type": "string"},
                "groups": {"type": "array", "items": {"type": "string"}},
                "roles": {"type": "array", "items": {"type": "string"}},
            }),
            "NoteBody": _object({"note": {"type": ["string", "null"], "maxLength": MAX_NOTE}}, required=[]),
            "GrantBody": _object(
                {
                    "resource": {"type": "string"},
                    "account": {"type": "string"},
                    "kinds": {"type": "array", "items": {"enum": ["read", "session", "write", "ddl",
                                                                  "destructive", "privilege", "admin",
                                                                  "unknown"]}},
                    "tables": {"type": "array", "items": {"type": "string"},
                               "description": "table globs as in policies (public.orders*); none: any table"},
                    "duration": {"type": "string", "description": "e.g. 1h, 30m, 1h30m"},
                    "reason": {"type": "string"},
                    "terminate_sessions": {"type": "boolean", "default": False,
                                           "description": "close your sessions on the resource "
                                                          "when the grant ends"},
                },
                required=["resource", "account", "kinds", "duration", "reason"],
            ),
            "ConvertBody": _object({"duration": {"type": "string"}, "reason": {"type": "string"}}),
            "HookBody": _object(
                {
                    "request_id": {"type": "string"},
                    "approver": {"type": "string"},
                    "decision": {"enum": ["approve", "deny"]},
                    "note": {"type": ["string", "null"], "maxLength": MAX_NOTE},
                },
                required=["request_id", "approver", "decision"],
            ),
            "Request": _object({
                "id": {"type": "string"},
                "kind": {"enum": ["statement", "grant"]},
                "status": {"enum": [str(s) for s in Status]},
                "requester": {"type": "string"},
                "resource": {"type": "string"},
                "account": {"type": "string"},
                "policies": {"type": "array", "items": {"type": "string"}},
                "subject": {
                    "type": "object",
                    "description": "statement: sql, params, kinds, tables, session; "
                                   "grant: kinds, tables, duration, reason",
                },
                "created_at": {"type": "number"},
                "expires_at": {"type": "number"},
                "decided_at": _nullable("number"),
                "approved_until": _nullable("number"),
                "executed_at": _nullable("number"),
                "note": _nullable("string"),
                "error": _nullable("string"),
                "preview": {
                    "type": ["object", "null"],
                    "description": "statement: the impact preview (EXPLAIN without ANALYZE on a "
                                   "separate connection as the same account): at, stale_after, "
                                   "stale, age, status (ok, failed, not_applicable), "
                                   "estimated_rows, statements [{sql, status, estimated_rows, "
                                   "plan, plan_truncated, error}]; null until it is made",
                },
                "summary": {"type": "string"},
                "time_left": {"type": ["number", "null"],
                              "description": "pending: until expiry; approved: until the approval lapses"},
                "time_left_text": _nullable("string"),
                "current_step": {"type": ["integer", "null"], "description": "0-based; null unless pending"},
                "may_vote": {"type": "array", "items": {"type": "string"},
                             "description": "who may still approve the current step"},
                "steps": {"type": "array", "items": _ref("StepProgress")},
                "votes": {"type": "array", "items": _ref("Vote")},
                "viewer": _object({
                    "name": _nullable("string"),
                    "is_requester": {"type": "boolean"},
                    "may_vote": {"type": "boolean"},
                    "voted": {"enum": ["approve", "deny", None]},
                }),
            }),
            "StepProgress": _object({
                "index": {"type": "integer", "minimum": 0},
                "name": {"type": "string"},
                "policy": {"type": "string"},
                "rule": {"type": "string"},
                "approvers": {"type": "array", "items": {"type": "string"}},
                "eligible": {"type": "array", "items": {"type": "string"}},
                "required": {"type": "integer", "minimum": 1},
                "approved_by": {"type": "array", "items": {"type": "string"}},
                "progress": {"type": "string", "description": "N/M approvals"},
                "may_vote": {"type": "array", "items": {"type": "string"}},
                "done": {"type": "boolean"},
                "current": {"type": "boolean"},
            }),
            "Vote": _object({
                "user": {"type": "string"},
                "decision": {"enum": ["approve", "deny"]},
                "note": _nullable("string"),
                "step": {"type": "integer", "minimum": 0},
                "at": {"type": "number"},
            }),
            "AuditEvent": _object({
                "id": {"type": "integer", "minimum": 1},
                "at": {"type": "number"},
                "type": {"type": "string"},
                "actor": {"type": "string"},
                "request_id": _nullable("string"),
                "data": {"type": "object"},
                "prev_hash": {"type": "string"},
                "hash": {"type": "string"},
            }),
            "AuditPage": _object({
                "events": {"type": "array", "items": _ref("AuditEvent")},
                "next_after_id": {"type": ["integer", "null"],
                                  "description": "pass as after_id for the next page; null at the end"},
            }),
            "ApprovalMode": _object({
                "resources": {"type": "string", "description": "fnmatch glob on resource names"},
                "enabled": {"type": "boolean", "description": "false: approvals are off (break-glass)"},
                "reason": _nullable("string"),
                "changed_by": {"type": "string"},
                "changed_at": {"type": "number"},
            }),
            "ApprovalModeBody": _object(
                {
                    "resources": {"type": "string", "description": "a glob, e.g. prod-*"},
                    "enabled": {"type": "boolean"},
                    "reason": {"type": ["string", "null"], "maxLength": MAX_REASON,
                               "description": "required to switch off"},
                },
                required=["resources", "enabled"],
            ),
            "Verification": _object({
                "ok": {"type": "boolean"},
                "first_bad_id": _nullable("integer"),
                "message": {"type": "string"},
            }),
            "Delivery": _object({
                "id": {"type": "integer"},
                "channel": {"type": "string"},
                "target": {"type": "string", "description": "the url without credentials or query"},
                "event": _nullable("string"),
                "request_id": _nullable("string"),
                "status": {"enum": [str(s) for s in DeliveryStatus]},
                "attempts": {"type": "integer", "minimum": 0},
                "created_at": {"type": "number"},
                "next_attempt_at": {"type": "number"},
                "delivered_at": _nullable("number"),
                "last_error": _nullable("string"),
            }),
        },
    },
}
