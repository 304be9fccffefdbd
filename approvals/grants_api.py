"""The REST routes for just-in-time grants under ``/api/v1``.

Owns: ``POST /grants`` (the authenticated user asks for a grant),
``GET /grants`` (filters ``active``, ``mine``), ``POST /grants/{id}/revoke``
and ``POST /requests/{id}/convert-to-grant``: validating their input and
rendering the answers. Approving and denying a grant go through the usual
``/requests/{id}/approve|deny``. The routes are mounted and documented in
the OpenAPI document by ``approvals.api``.

Must not: decide anything: the checks against the policies are
``approvals.grants``' and the transitions ``approvals.workflow``'s.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from approvals.api import (
    DEFAULT_LIMIT,
    MAX_LIST_LIMIT,
    SERVICE,
    USER,
    ApiError,
    _parse_object,
    _query_int,
    _read_body,
    _request_id,
    _string,
    noted_action,
    render_request,
)
from approvals.grants import (
    GRANTS_UNAVAILABLE,
    GrantAsk,
    GrantDesk,
    GrantError,
    parse_grant_duration,
    parse_kinds,
    parse_reason,
    parse_tables,
)
from approvals.model import JSONObject, Status, SubjectKind
from approvals.service import ApprovalService
from approvals.workflow import is_usable

GRANT_DESK = web.AppKey("approvals_grant_desk", GrantDesk)
GRANT_FIELDS = ("resource", "account", "kinds", "tables", "duration", "reason", "terminate_sessions")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no", "")


def add_grant_routes(api: web.Application, desk: GrantDesk | None) -> None:
    if desk is not None:
        api[GRANT_DESK] = desk
    router = api.router
    router.add_post("/grants", request_grant, name="grants_request")
    router.add_get("/grants", list_grants, name="grants")
    router.add_post("/grants/{id}/revoke", revoke_grant, name="grant_revoke")
    router.add_post("/requests/{id}/convert-to-grant", convert_to_grant, name="convert_to_grant")


def _desk(request: web.Request) -> GrantDesk:
    desk = request.app.get(GRANT_DESK)
    if desk is None:
        raise ApiError(GRANTS_UNAVAILABLE, "grants need policies; this pgvouch has none configured")
    return desk


async def request_grant(request: web.Request) -> web.Response:
    fields = _parse_object(await _read_body(request), GRANT_FIELDS,
                           required=("resource", "account", "kinds", "duration", "reason"))
    desk, user = _desk(request), request[USER].name
    terminate = fields.get("terminate_sessions", False)
    if not isinstance(terminate, bool):
        raise ApiError("bad_request", "terminate_sessions must be true or false")
    try:
        ask = GrantAsk(
            user=user, resource=_string(fields, "resource"), account=_string(fields, "account"),
            kinds=parse_kinds(_string_list(fields, "kinds")),
            tables=parse_tables(_string_list(fields, "tables") if "tables" in fields else None),
            duration=parse_grant_duration(_string(fields, "duration")),
            reason=parse_reason(_string(fields, "reason")), terminate_sessions=terminate,
        )
        grant = await desk.request(ask)
    except GrantError as exc:
        raise ApiError(exc.code, exc.message) from None
    return web.json_response(render_request(grant, desk.service.clock(), user), status=201)


async def list_grants(request: web.Request) -> web.Response:
    active = _query_bool(request, "active")
    mine = _query_bool(request, "mine")
    limit = _query_int(request, "limit", DEFAULT_LIMIT, 1, MAX_LIST_LIMIT)
    service, viewer = request.app[SERVICE], request[USER].name
    now = service.clock()
    found = await service.store.list(status=Status.APPROVED if active else None, resource_glob=None,
                                     limit=MAX_LIST_LIMIT)
    grants = [r for r in found if r.subject_kind is SubjectKind.GRANT
              and (not active or is_usable(r, now)) and (not mine or r.requester == viewer)]
    return web.json_response({"grants": [render_request(g, now, viewer) for g in grants[:limit]]})


async def revoke_grant(request: web.Request) -> web.Response:
    return await noted_action(request, ApprovalService.revoke)


async def convert_to_grant(request: web.Request) -> web.Response:
    request_id = _request_id(request)
    fields = _parse_object(await _read_body(request), ("duration", "reason"),
                           required=("duration", "reason"))
    desk, user = _desk(request), request[USER].name
    try:
        duration = parse_grant_duration(_string(fields, "duration"))
        reason = parse_reason(_string(fields, "reason"))
        cancelled, grant = await desk.convert(request_id, user, duration, reason)
    except GrantError as exc:
        raise ApiError(exc.code, exc.message) from None
    now = desk.service.clock()
    body: JSONObject = {"grant": render_request(grant, now, user),
                        "cancelled": render_request(cancelled, now, user)}
    return web.json_response(body, status=201)


def _string_list(fields: JSONObject, key: str) -> list[str]:
    value: Any = fields.get(key)
    if isinstance(value, str):
        return value.split(",")
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ApiError("bad_request", f"{key} must be a list of strings")
    return value


def _query_bool(request: web.Request, name: str) -> bool:
    text = request.query.get(name, "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ApiError("bad_request", f"{name} must be true or false, not {text!r}")
