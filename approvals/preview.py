"""Impact previews: the planner's estimate of what a held statement would touch.

Owns: the shape of a preview as a request keeps it (``Request.preview``) and
as the API, webhooks and chat show it; when one is stale; how the estimated
rows are read from a plan; how a plan is cut to a bounded size; which
statement types EXPLAIN can take.

Must not: connect to PostgreSQL (``proxy.preview`` runs the EXPLAIN), read a
clock (``now`` is passed in), or change a request (``approvals.workflow``
attaches a preview).

A preview document::

    {"at", "stale_after", "status": "ok" | "failed" | "not_applicable",
     "estimated_rows": int | None,          # summed over the statements that were explained
     "statements": [{"sql", "status", "estimated_rows", "plan", "plan_truncated", "error"}],
     "statements_omitted": int}             # past MAX_STATEMENTS: not explained

``status`` is ``failed`` if any statement failed, ``ok`` if at least one was
explained and none failed, ``not_applicable`` when no statement could be
explained (DDL, transaction control, ...). A preview is *stale* once it is
``stale_after`` seconds old; rendering adds ``stale`` and ``age``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from approvals.model import JSONObject, canonical_json

OK = "ok"
FAILED = "failed"
NOT_APPLICABLE = "not_applicable"

DEFAULT_STALE_AFTER = 30 * 60.0
MAX_PLAN_CHARS = 16_000  # all plans of a preview together, as canonical JSON ...
MIN_PLAN_CHARS = 1_000  # ... but at least this much for each statement's
MAX_STATEMENTS = 20  # statements previewed per request; the rest are counted, not explained
MAX_ERROR_CHARS = 1_000
MAX_SQL_CHARS = 4_000  # the statement text repeated in the preview (the subject has all of it)

# Statement types (pglast node names) that EXPLAIN takes and that a held write can be.
EXPLAINABLE = frozenset({"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})

# Fields of a plan node kept when even the top node alone is too large.
_ESSENTIAL = ("Node Type", "Operation", "Relation Name", "Schema", "Alias", "Index Name",
              "Startup Cost", "Total Cost", "Plan Rows", "Plan Width")


# -- reading a plan --------------------------------------------------------------------


def estimated_rows(plan: Mapping[str, Any]) -> int:
    """Rows the statement is estimated to return or change, from its top plan node.

    A ModifyTable node (INSERT, UPDATE, DELETE, MERGE) estimates 0 rows of its
    own without RETURNING; the rows it changes are those its input produces,
    so its input plans are summed (init plans and sub plans are not input).
    """
    if plan.get("Node Type") == "ModifyTable":
        inputs = [child for child in plan.get("Plans", ())
                  if child.get("Parent Relationship") not in ("InitPlan", "SubPlan")]
        if inputs:
            return sum(_rows(child) for child in inputs)
    return _rows(plan)


def _rows(node: Mapping[str, Any]) -> int:
    value = node.get("Plan Rows", 0)
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def cut_plan(plan: Mapping[str, Any], limit: int = MAX_PLAN_CHARS) -> tuple[JSONObject, bool]:
    """``plan`` as is if its JSON fits in ``limit`` characters, else its top levels.

    Returns the plan and whether it was cut. Deeper levels go first; if the
    top node alone is too big (a huge filter), only its essential fields stay.
    """
    whole = dict(plan)
    if len(canonical_json(whole)) <= limit:
        return whole, False
    for depth in range(_depth(plan) - 1, -1, -1):
        pruned = _prune(plan, depth)
        if len(canonical_json(pruned)) <= limit:
            return pruned, True
    return {key: plan[key] for key in _ESSENTIAL if key in plan}, True


def _depth(plan: Mapping[str, Any]) -> int:
    children = plan.get("Plans") or ()
    return 1 + max((_depth(child) for child in children), default=0)


def _prune(plan: Mapping[str, Any], depth: int) -> JSONObject:
    node = {key: value for key, value in plan.items() if key != "Plans"}
    children = plan.get("Plans") or ()
    if children:
        if depth > 0:
            node["Plans"] = [_prune(child, depth - 1) for child in children]
        else:
            node["Plans omitted"] = len(children)
    return node


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- building a preview ------------------------------------------------------------------


def plan_budget(statements: int) -> int:
    """Characters each of ``statements`` plans may keep."""
    return max(MIN_PLAN_CHARS, MAX_PLAN_CHARS // max(1, statements))


def explained(sql: str, plan: Mapping[str, Any], limit: int = MAX_PLAN_CHARS) -> JSONObject:
    """The entry of a statement EXPLAIN answered; ``plan`` is its top ``Plan`` node."""
    kept, truncated = cut_plan(plan, limit)
    return {"sql": _clip(sql, MAX_SQL_CHARS), "status": OK, "estimated_rows": estimated_rows(plan),
            "plan": kept, "plan_truncated": truncated, "error": None}


def failed(sql: str, error: str) -> JSONObject:
    return {"sql": _clip(sql, MAX_SQL_CHARS), "status": FAILED, "estimated_rows": None,
            "plan": None, "plan_truncated": False, "error": _clip(error, MAX_ERROR_CHARS)}


def not_applicable(sql: str, why: str) -> JSONObject:
    return {"sql": _clip(sql, MAX_SQL_CHARS), "status": NOT_APPLICABLE, "estimated_rows": None,
            "plan": None, "plan_truncated": False, "error": why}


def make_preview(statements: Sequence[JSONObject], *, at: float, stale_after: float,
                 omitted: int = 0) -> JSONObject:
    """The preview of a request; ``omitted`` statements past :data:`MAX_STATEMENTS` were not explained."""
    statuses = {entry["status"] for entry in statements}
    if FAILED in statuses:
        status = FAILED
    elif OK in statuses:
        status = OK
    else:
        status = NOT_APPLICABLE
    rows = [entry["estimated_rows"] for entry in statements if entry["status"] == OK]
    return {"at": at, "stale_after": stale_after, "status": status,
            "estimated_rows": sum(rows) if rows else None, "statements": list(statements),
            "statements_omitted": omitted}


# -- questions about a preview -------------------------------------------------------------


def is_stale(preview: Mapping[str, Any], now: float) -> bool:
    return now - float(preview["at"]) >= float(preview.get("stale_after", DEFAULT_STALE_AFTER))


def needs_refresh(preview: Mapping[str, Any] | None, now: float) -> bool:
    """Before an approval is accepted: no preview yet, or a stale one."""
    return preview is None or is_stale(preview, now)


def render(preview: Mapping[str, Any] | None, now: float) -> JSONObject | None:
    """The preview as the API and webhooks show it: the document plus ``stale`` and ``age``."""
    if preview is None:
        return None
    return {**preview, "stale": is_stale(preview, now), "age": max(0.0, now - float(preview["at"]))}


def summary(preview: Mapping[str, Any] | None) -> str:
    """One line for people: ``~42 rows``, ``EXPLAIN failed: ...``, ``no plan (DDL)``."""
    if preview is None:
        return "impact preview pending"
    status = preview.get("status")
    if status == OK:
        rows = preview.get("estimated_rows")
        return f"estimated rows: ~{rows}"
    if status == FAILED:
        error = next((s.get("error") for s in preview.get("statements", ())
                      if s.get("status") == FAILED), None)
        return f"EXPLAIN failed: {error or 'unknown error'}"
    return "no plan: EXPLAIN does not apply to this statement"
