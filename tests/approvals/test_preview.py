"""Impact previews without a network: reading plans, cutting them to size,
staleness, the ``preview`` transition, persistence in both stores (real SQLite
and the session's real PostgreSQL) and the refresh hook on approval."""

from __future__ import annotations

import json
from typing import Any

import pytest

from approvals import preview, workflow
from approvals.model import Request, Status, request_from_dict, request_to_dict
from approvals.service import ApprovalService
from approvals.store import Store
from approvals.workflow import Code, EventType, WorkflowError
from config.yamlnodes import ConfigError, load_text
from proxy.preview import Job, PreviewError, explain_text, jobs_for
from tests.approvals.helpers import DIRECTORY, T0, approve_all, make_grant, make_request

SCAN = {"Node Type": "Seq Scan", "Parent Relationship": "Outer", "Relation Name": "accounts",
        "Plan Rows": 40, "Total Cost": 2.25}
UPDATE_PLAN = {"Node Type": "ModifyTable", "Operation": "Update", "Relation Name": "accounts",
               "Plan Rows": 0, "Plans": [SCAN]}


def a_preview(at: float = T0, stale_after: float = 60.0, rows: int = 40) -> dict[str, Any]:
    return preview.make_preview([preview.explained("UPDATE accounts ...", {**UPDATE_PLAN, "Plans": [
        {**SCAN, "Plan Rows": rows}]})], at=at, stale_after=stale_after)


# -- plans -------------------------------------------------------------------------------


def test_a_write_is_estimated_by_the_rows_its_input_produces() -> None:
    init = {"Node Type": "Result", "Parent Relationship": "InitPlan", "Plan Rows": 1000}
    assert preview.estimated_rows(UPDATE_PLAN) == 40
    assert preview.estimated_rows({**UPDATE_PLAN, "Plans": [init, SCAN]}) == 40
    assert preview.estimated_rows({"Node Type": "Limit", "Plan Rows": 5, "Plans": [SCAN]}) == 5
    assert preview.estimated_rows({"Node Type": "ModifyTable", "Plan Rows": 3}) == 3


def test_a_large_plan_keeps_its_top_levels() -> None:
    def chain(depth: int) -> dict[str, Any]:
        node: dict[str, Any] = {"Node Type": "Nested Loop", "Plan Rows": depth, "Filter": "x" * 300}
        if depth:
            node["Plans"] = [chain(depth - 1), chain(depth - 1)]
        return node

    plan = chain(8)
    kept, truncated = preview.cut_plan(plan, limit=4000)
    assert truncated and len(json.dumps(kept)) <= 4000
    assert kept["Plan Rows"] == 8 and "Plans" in kept
    deepest = kept
    while "Plans" in deepest:
        deepest = deepest["Plans"][0]
    assert deepest["Plans omitted"] == 2
    small, cut = preview.cut_plan(SCAN)
    assert small == SCAN and not cut
    huge = {**SCAN, "Filter": "y" * 50_000}
    essential, cut = preview.cut_plan(huge, limit=1000)
    assert cut and "Filter" not in essential and essential["Plan Rows"] == 40


def test_statuses_and_the_summed_estimate() -> None:
    ok = preview.explained("UPDATE a", UPDATE_PLAN)
    other = preview.explained("DELETE b", {**UPDATE_PLAN, "Plans": [{**SCAN, "Plan Rows": 2}]})
    skipped = preview.not_applicable("CREATE TABLE t ()", "EXPLAIN does not apply")
    broken = preview.failed("UPDATE s", "permission denied" + "!" * 5000)
    assert preview.make_preview([ok, other, skipped], at=T0, stale_after=1)["estimated_rows"] == 42
    assert preview.make_preview([ok, skipped], at=T0, stale_after=1)["status"] == "ok"
    assert preview.make_preview([ok, broken], at=T0, stale_after=1)["status"] == "failed"
    assert preview.make_preview([skipped], at=T0, stale_after=1)["status"] == "not_applicable"
    assert len(broken["error"]) == preview.MAX_ERROR_CHARS


def test_stale_after_its_age_and_rendered_with_stale_and_age() -> None:
    doc = a_preview(at=T0, stale_after=60)
    assert not preview.is_stale(doc, T0 + 59) and preview.is_stale(doc, T0 + 60)
    assert preview.needs_refresh(None, T0) and not preview.needs_refresh(doc, T0 + 1)
    shown = preview.render(doc, T0 + 61)
    assert shown is not None and shown["stale"] is True and shown["age"] == 61
    assert preview.render(None, T0) is None
    assert preview.summary(doc) == "estimated rows: ~40"


# -- what the proxy explains -------------------------------------------------------------


def test_statements_are_split_and_only_explainable_ones_are_explained() -> None:
    subject = {"sql": "x", "params": [{"type_oid": 23, "format": "text", "value": "1"}],
               "statements": [
                   {"sql": "UPDATE a SET x = 1; CREATE TABLE t (x int); DELETE FROM b", "param_indexes": []},
                   {"sql": "UPDATE c SET y = $1", "param_indexes": [0]},
                   {"sql": None, "param_indexes": []},
               ]}
    jobs = jobs_for(subject)
    assert [(j.sql, j.skip is None and j.error is None) for j in jobs] == [
        ("UPDATE a SET x = 1", True), ("CREATE TABLE t (x int)", False), ("DELETE FROM b", True),
        ("UPDATE c SET y = $1", True), ("", False)]
    assert jobs[3].params == ({"type_oid": 23, "format": "text", "value": "1"},)
    bad = jobs_for({"sql": "x", "params": [], "statements": [{"sql": "UPDATE a SET", "param_indexes": []}]})
    assert bad[0].error is not None and "cannot parse" in bad[0].error
    # a request made before statements were recorded: the whole text with every parameter
    old = jobs_for({"sql": "UPDATE a SET x = $1", "params": [{"type_oid": 0, "format": "text",
                                                               "value": "2"}]})
    assert [(j.sql, len(j.params)) for j in old] == [("UPDATE a SET x = $1", 1)]


@pytest.mark.parametrize("sql", [
    "UPDATE a SET x = 1; DROP TABLE a",
    "DROP TABLE a",
    "UPDATE a SET x = 1) ANALYZE UPDATE a SET x = 2",
    "SELECT 1; SELECT 2",
])
def test_only_one_explainable_statement_is_ever_wrapped(sql: str) -> None:
    with pytest.raises(PreviewError):
        explain_text(sql)


def test_the_wrapped_text_is_a_plain_explain() -> None:
    assert explain_text("UPDATE a SET x = $1") == "EXPLAIN (FORMAT JSON) UPDATE a SET x = $1"
    assert Job("x").params == ()


# -- the transition ----------------------------------------------------------------------


def test_a_preview_attaches_to_a_pending_statement_only() -> None:
    request = make_request()
    outcome = workflow.attach_preview(request, a_preview(), T0 + 1)
    assert outcome.request.status is Status.PENDING and outcome.request.preview == a_preview()
    [event] = outcome.events
    assert event.type is EventType.PREVIEWED and event.actor == workflow.SYSTEM
    assert event.data["estimated_rows"] == 40 and event.data["previous_at"] is None
    again = workflow.attach_preview(outcome.request, a_preview(at=T0 + 9), T0 + 9, trigger="approve",
                                    requested_by="bob")
    assert again.events[0].data == {"status": "ok", "estimated_rows": 40, "preview_at": T0 + 9,
                                    "previous_at": T0, "trigger": "approve", "requested_by": "bob"}
    with pytest.raises(WorkflowError) as refused:
        workflow.attach_preview(approve_all(make_request(), "bob"), a_preview(), T0 + 2)
    assert refused.value.code is Code.NOT_PENDING
    with pytest.raises(WorkflowError) as refused:
        workflow.attach_preview(make_grant(), a_preview(), T0 + 2)
    assert refused.value.code is Code.WRONG_SUBJECT


def test_the_document_keeps_the_preview_and_old_documents_still_load() -> None:
    request = workflow.attach_preview(make_request(), a_preview(), T0).request
    assert request_from_dict(json.loads(json.dumps(request_to_dict(request)))) == request
    old = request_to_dict(make_request())
    del old["preview"]
    assert request_from_dict(old).preview is None


# -- both stores and the service ----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


async def _pending(store: Store, clock: Clock) -> tuple[ApprovalService, Request]:
    service = ApprovalService(store, DIRECTORY, clock=clock)
    request = await service.create(make_request())
    return service, request


async def test_both_stores_keep_the_preview_and_audit_it(store: Store) -> None:
    clock = Clock()
    service, request = await _pending(store, clock)
    doc = a_preview(at=T0)
    stored = await service.apply(request.id, lambda r, now: workflow.attach_preview(r, doc, now))
    assert stored.preview == doc and stored.version == request.version + 1
    fetched = await store.get(request.id)
    assert fetched is not None and fetched.preview == doc
    events = await store.audit(since=None, limit=10, after_id=0)
    assert [e.type for e in events] == ["request.created", "request.previewed"]
    # the request is still found by its fingerprint: the preview is not part of it
    assert (await store.find_pending(request.fingerprint, T0)) is not None


async def test_an_approval_on_a_stale_or_missing_preview_refreshes_it_first(store: Store) -> None:
    clock = Clock()
    service, request = await _pending(store, clock)
    calls: list[tuple[str, str, int]] = []

    async def refresh(current: Request, user: str) -> None:
        calls.append((current.id, user, len(current.votes)))
        await service.apply(current.id, lambda r, now: workflow.attach_preview(
            r, a_preview(at=now), now, trigger="approve", requested_by=user))

    service.before_approve = refresh
    # refused votes make no preview: the requester, a deny
    with pytest.raises(WorkflowError):
        await service.vote(request.id, "alice", "approve", None)
    await service.apply(request.id, lambda r, now: workflow.attach_preview(r, a_preview(at=now), now))
    clock.now = T0 + 61  # stale
    with pytest.raises(WorkflowError):
        await service.vote(request.id, "dave", "approve", None)  # not eligible
    assert calls == []
    approved = await service.vote(request.id, "bob", "approve", None)
    assert calls == [(request.id, "bob", 0)]  # before the vote was applied
    assert approved.status is Status.APPROVED and approved.preview is not None
    assert approved.preview["at"] == T0 + 61


async def test_a_fresh_preview_or_a_denial_needs_no_refresh_and_a_failing_one_does_not_block(
        store: Store) -> None:
    clock = Clock()
    service, request = await _pending(store, clock)
    calls: list[str] = []

    async def broken(current: Request, user: str) -> None:
        calls.append(user)
        raise RuntimeError("upstream gone")

    service.before_approve = broken
    await service.apply(request.id, lambda r, now: workflow.attach_preview(r, a_preview(at=now), now))
    clock.now = T0 + 30
    denied = await service.vote(request.id, "bob", "deny", "no")
    assert denied.status is Status.DENIED and calls == []
    _, other = await _pending(store, clock)  # no preview yet: refreshed, and the hook fails
    approved = await service.vote(other.id, "carol", "approve", None)
    assert approved.status is Status.APPROVED and calls == ["carol"]


# -- settings ----------------------------------------------------------------------------


def _settings(extra: str) -> Any:
    from config.settings import settings_from_node

    text = ("resources:\n  - name: app\n    host: 127.0.0.1\n    database: app\n"
            "    accounts: [{name: app, user: app}]\n" + extra)
    return settings_from_node(load_text(text, "pgvouch.yaml"))


def test_preview_settings_default_and_validate() -> None:
    default = _settings("").preview
    assert default.enabled and default.stale_after == 1800 and default.timeout == 5
    custom = _settings("preview: {stale_after: 10m, timeout: 2s, enabled: false}\n").preview
    assert (custom.stale_after, custom.timeout, custom.enabled) == (600, 2, False)
    with pytest.raises(ConfigError, match="stale_after must be a positive"):
        _settings("preview: {stale_after: 0s}\n")
    with pytest.raises(ConfigError, match=r"pgvouch\.yaml:6"):
        _settings("preview: {stale: 10m}\n")
    assert _settings(
        "notify: {webhooks: [{url: 'http://127.0.0.1:1/h', secret_env: X, events: [request.previewed]}]}\n"
    ).webhooks[0].events == ("request.previewed",)


def test_the_review_page_shows_the_preview_and_whether_it_is_stale() -> None:
    from approvals.api import render_request
    from approvals.web_html import review_body

    request = workflow.attach_preview(make_request(), a_preview(at=T0, stale_after=60), T0).request
    fresh = review_body(render_request(request, T0 + 1, "bob"), T0 + 1, csrf="c", next_url="/",
                        max_note=100)
    assert "Impact preview" in fresh and "estimated rows: ~40" in fresh and "stale" not in fresh
    assert "Seq Scan" in fresh
    stale = review_body(render_request(request, T0 + 61, "bob"), T0 + 61, csrf="c", next_url="/",
                        max_note=100)
    assert "(stale: refreshed when you approve)" in stale
    without = review_body(render_request(make_request(), T0, "bob"), T0, csrf="c", next_url="/",
                          max_note=100)
    assert "Impact preview" not in without
