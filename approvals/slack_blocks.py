"""Slack Block Kit messages for requests, deny notes and announcements.

Owns: what a Slack message about a request looks like (the statement or the
grant, requester, resource/account, policies, step progress N/M, expiry,
impact preview, Approve / Deny buttons while pending), the deny form (a note
input plus "Confirm deny" / "Back"), the announcement message, the action
ids the interactivity endpoint understands, and Slack's text rules: ``&``,
``<`` and ``>`` escaped in everything we did not write (so a note or a SQL
string cannot mention ``@channel`` or forge a link) and Slack's size limits
(long SQL and parameter lists are cut, never rejected by Slack).

Must not: do I/O, read a clock (``now`` is passed in) or decide anything:
who may vote comes from ``approvals.workflow.progress``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from approvals import preview as impact
from approvals import workflow
from approvals.model import JSONObject, Request, Status, SubjectKind, canonical_json
from approvals.workflow import format_duration

ACTION_APPROVE = "pgvouch_approve"
ACTION_DENY = "pgvouch_deny"
ACTION_DENY_CONFIRM = "pgvouch_deny_confirm"
ACTION_BACK = "pgvouch_back"
NOTE_BLOCK = "pgvouch_deny_note"
NOTE_ACTION = "note"

MAX_SQL = 2500  # characters of SQL shown (a section's text may hold 3000)
MAX_PARAMS = 600  # characters of the parameter list
MAX_FIELD = 1500  # any other free text (notes, reasons, announcement values)
MAX_NOTE = 2000

_STATUS_EMOJI = {
    Status.PENDING: ":hourglass_flowing_sand:",
    Status.APPROVED: ":white_check_mark:",
    Status.EXECUTING: ":arrow_forward:",
    Status.EXECUTED: ":white_check_mark:",
    Status.FAILED: ":x:",
    Status.DENIED: ":no_entry:",
    Status.CANCELLED: ":heavy_multiplication_x:",
    Status.EXPIRED: ":alarm_clock:",
    Status.REVOKED: ":no_entry_sign:",
}


def escape(text: str) -> str:
    """Text Slack shows as is: no mentions, links or formatting smuggled in."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _code(text: str) -> str:
    """A preformatted block; a ``` inside cannot end it early."""
    return "```" + escape(text).replace("```", "`\u200b``") + "```"


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _section(text: str) -> JSONObject:
    return {"type": "section", "text": {"type": "mrkdwn", "text": clip(text, 3000)}}


def _context(text: str) -> JSONObject:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": clip(text, 3000)}]}


def _button(text: str, action_id: str, value: str, style: str | None = None) -> JSONObject:
    button: JSONObject = {"type": "button", "text": {"type": "plain_text", "text": text},
                          "action_id": action_id, "value": value}
    if style is not None:
        button["style"] = style
    return button


def title(request: Request) -> str:
    what = "grant" if request.subject_kind is SubjectKind.GRANT else "statement"
    kinds = "/".join(str(k) for k in request.subject.get("kinds", ())) or what
    return f"{request.id}: {kinds} {what} on {request.resource}/{request.account}"


def _params(params: Sequence[Mapping[str, Any]]) -> str:
    shown = []
    for number, param in enumerate(params, start=1):
        value = param.get("value")
        if value is None:
            text = "NULL"
        elif param.get("format") == "binary" or param.get("hex"):
            text = f"\\x{value}"
        else:
            text = repr(str(value))
        shown.append(f"${number} = {text}")
    return clip(", ".join(shown), MAX_PARAMS)


def subject_blocks(request: Request) -> list[JSONObject]:
    """The statement (SQL and parameters) or the grant (kinds, tables, duration, reason)."""
    subject = request.subject
    if request.subject_kind is SubjectKind.GRANT:
        tables = ", ".join(subject.get("tables") or ()) or "all tables"
        lines = [
            f"*Grant:* {escape(', '.join(subject.get('kinds', ())))} on {escape(tables)} "
            f"for {format_duration(float(subject.get('duration', 0)))}",
            f"*Reason:* {escape(clip(str(subject.get('reason') or '-'), MAX_FIELD))}",
        ]
        return [_section("\n".join(lines))]
    blocks = [_section(_code(clip(str(subject.get("sql", "")), MAX_SQL)))]
    params = subject.get("params") or ()
    if params:
        blocks.append(_context(f"*Parameters:* {escape(_params(params))}"))
    return blocks


def preview_text(request: Request, now: float) -> str | None:
    """The impact preview in one line, with its age when stale; None without one."""
    if request.subject_kind is not SubjectKind.STATEMENT or request.status is not Status.PENDING:
        return None
    found = request.preview
    line = impact.summary(found)
    if found is not None and impact.is_stale(found, now):
        line += f" (stale: {format_duration(now - float(found['at']))} old, refreshed on approve)"
    return f"*Impact:* {escape(clip(line, MAX_FIELD))}"


def progress_text(request: Request, now: float) -> str:
    """Step N/M, who approved, who may still approve, and the time left or the outcome."""
    progress = workflow.progress(request, now)
    lines = []
    for step in progress.steps:
        mark = ":white_check_mark:" if step.done else (":arrow_right:" if step.current else ":white_circle:")
        line = (f"{mark} Step {step.index + 1}/{len(progress.steps)} *{escape(step.name)}*: "
                f"{step.count} approvals")
        if step.approved_by:
            line += f" (by {escape(', '.join(step.approved_by))})"
        if step.current:
            line += f"; may approve: {escape(', '.join(step.may_vote)) or 'nobody'}"
        lines.append(line)
    if request.status is Status.PENDING:
        lines.append(f"Expires in {format_duration(progress.time_left or 0.0)} "
                     f"({_when(request.expires_at)})")
    elif request.status is Status.APPROVED and request.approved_until is not None:
        usable = "Open" if request.subject_kind is SubjectKind.GRANT else "Usable"
        lines.append(f"{usable} until {_when(request.approved_until)}")
    elif request.status is Status.EXPIRED and request.approved_until is not None:
        lines.append(f"Ended {_when(request.approved_until)}")  # a grant whose window passed
    return "\n".join(lines)


def request_message(
    request: Request,
    now: float,
    *,
    headline: str,
    link: str,
    requester_mention: str | None = None,
    outcome: str | None = None,
) -> JSONObject:
    """The message about ``request``: buttons only while it is pending."""
    who = escape(request.requester) + (f" (<@{requester_mention}>)" if requester_mention else "")
    blocks: list[JSONObject] = [
        _section(f"{_STATUS_EMOJI.get(request.status, '')} *{escape(title(request))}* {escape(headline)}"),
        {"type": "section", "fields": [
            {"type": "mrkdwn", "text": f"*Requester:*\n{who}"},
            {"type": "mrkdwn", "text": f"*Resource/account:*\n{escape(request.resource)}/"
                                       f"{escape(request.account)}"},
            {"type": "mrkdwn", "text": f"*Policy:*\n{escape(', '.join(request.policies) or '-')}"},
            {"type": "mrkdwn", "text": f"*Status:*\n{request.status}"},
        ]},
        *subject_blocks(request),
    ]
    impact_line = preview_text(request, now)
    if impact_line is not None:
        blocks.append(_section(impact_line))
    blocks.append(_section(progress_text(request, now)))
    if request.note and request.status is not Status.PENDING:
        blocks.append(_section(f"*Note:* {escape(clip(request.note, MAX_FIELD))}"))
    if outcome:
        blocks.append(_context(escape(outcome)))
    if request.status is Status.PENDING:
        blocks.append({"type": "actions", "block_id": f"pgvouch_vote_{request.id}", "elements": [
            _button("Approve", ACTION_APPROVE, request.id, "primary"),
            _button("Deny", ACTION_DENY, request.id, "danger"),
        ]})
    blocks.append(_context(f"<{link}|Open {request.id} in the Activity Queue>"))
    return {"text": clip(f"{title(request)} {headline}", 300), "blocks": blocks}


def deny_form(request: Request, now: float, *, link: str) -> JSONObject:
    """The message while someone writes why they deny: a note input, "Confirm deny" and "Back"."""
    message = request_message(request, now, headline="deny: write a note", link=link)
    blocks = [block for block in message["blocks"] if block.get("type") != "actions"]
    blocks[-1:-1] = [
        {"type": "input", "block_id": NOTE_BLOCK, "dispatch_action": False,
         "label": {"type": "plain_text", "text": "Why deny? (the requester sees this)"},
         "element": {"type": "plain_text_input", "action_id": NOTE_ACTION, "multiline": True,
                     "max_length": MAX_NOTE}},
        {"type": "actions", "block_id": f"pgvouch_deny_{request.id}", "elements": [
            _button("Confirm deny", ACTION_DENY_CONFIRM, request.id, "danger"),
            _button("Back", ACTION_BACK, request.id),
        ]},
    ]
    return {"text": message["text"], "blocks": blocks}


def announcement_message(kind: str, actor: str, at: float, data: Mapping[str, Any]) -> JSONObject:
    """A loud message for an announcement (break-glass and the like)."""
    lines = [f":rotating_light: *{escape(kind)}* by {escape(actor)} at {_when(at)}"]
    for key, value in sorted(data.items()):
        shown = value if isinstance(value, str) else canonical_json(value)
        lines.append(f"*{escape(key)}:* {escape(clip(shown, MAX_FIELD))}")
    return {"text": clip(f"pgvouch: {kind} by {actor}", 300), "blocks": [_section("\n".join(lines))]}


def ephemeral(text: str) -> JSONObject:
    """An answer only the clicking user sees; the message stays as it is."""
    return {"response_type": "ephemeral", "replace_original": False, "text": escape(clip(text, 3000))}
