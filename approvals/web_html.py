"""The Activity Queue's HTML: every page and fragment, as pure functions of data.

Owns: the markup of the sign-in page, the queue (badge, filters, rows), the
review dialog (statement highlighted with its bound parameters, steps,
earlier reviewers, the actions the viewer may take), the grants and audit
tabs, and the small SQL highlighter.

Must not: do I/O, read a clock (``now`` is passed in) or decide anything.
What a viewer may do comes from the REST API's rendering of a request
(:func:`approvals.api.render_request`, itself from ``workflow.progress``),
so the pages and the API can never disagree.

Escaping: markup is built with :func:`fill`, which HTML-escapes every value
that is not already :class:`Html`; only this module's own functions make
:class:`Html`. A value from a request, a user, a note or the audit log can
therefore only reach a page as text, never as markup.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from string import Template
from typing import Any
from urllib.parse import urlencode

from approvals import preview as impact
from approvals.audit import AuditEvent, Verification
from approvals.model import JSONObject, Status
from approvals.workflow import format_duration

STATEMENT_PREVIEW = 90  # characters of a statement shown in a queue row
STATUS_CHOICES = tuple(str(status) for status in Status)
ASSETS = "/assets"


class Html(str):
    """Markup that is safe to insert as is (built here, values escaped)."""


def fill(template: Template, **values: object) -> Html:
    """``template`` with every value escaped unless it is :class:`Html`."""
    return Html(template.substitute(
        {key: value if isinstance(value, Html) else escape(str(value)) for key, value in values.items()}
    ))


def join(parts: Iterable[Html], separator: str = "") -> Html:
    return Html(separator.join(parts))


def text(value: object) -> Html:
    return Html(escape(str(value)))


# -- SQL highlighting -------------------------------------------------------------

SQL_KEYWORDS = frozenset([
    "add", "all", "alter", "and", "any", "as", "asc", "begin", "between", "by", "cascade", "case",
    "cast", "check", "column", "commit", "constraint", "copy", "create", "cross", "current_date",
    "current_timestamp", "current_user", "database", "default", "delete", "desc", "distinct", "do",
    "drop", "else", "end", "except", "exists", "false", "fetch", "for", "foreign", "from", "full",
    "function", "grant", "group", "having", "if", "ilike", "in", "index", "inner", "insert",
    "intersect", "into", "is", "join", "key", "left", "like", "limit", "lock", "not", "null", "nulls",
    "offset", "on", "only", "or", "order", "outer", "over", "partition", "primary", "references",
    "rename", "replace", "returning", "revoke", "right", "role", "rollback", "savepoint", "schema",
    "select", "sequence", "set", "show", "table", "then", "to", "transaction", "trigger", "true",
    "truncate", "union", "unique", "update", "using", "vacuum", "values", "view", "when", "where",
    "window", "with",
])

_SQL_TOKEN = re.compile(
    r"""
      (?P<comment>--[^\n]*|/\*.*?(?:\*/|\Z))
    | (?P<string>[eE]?'(?:[^']|'')*(?:'|\Z))
    | (?P<dollar>\$\$.*?(?:\$\$|\Z)|\$(?P<tag>[A-Za-z_]\w*)\$.*?(?:\$(?P=tag)\$|\Z))
    | (?P<ident>"(?:[^"]|"")*(?:"|\Z))
    | (?P<param>\$\d+)
    | (?P<number>\b\d+(?:\.\d*)?(?:[eE][+-]?\d+)?\b)
    | (?P<word>[A-Za-z_][A-Za-z_0-9$]*)
    | (?P<other>\s+|.)
    """,
    re.VERBOSE | re.DOTALL,
)
_TOKEN_CLASS = {"comment": "cmt", "string": "str", "dollar": "str", "ident": "ident",
                "param": "param", "number": "num"}


def highlight_sql(sql: str) -> Html:
    """``sql`` escaped, with keywords, literals, comments and parameters in spans.

    Every character of ``sql`` lands in exactly one token, so the text a
    reader sees is the statement as sent, whatever it contains.
    """
    parts: list[str] = []
    for match in _SQL_TOKEN.finditer(sql):
        kind, token = match.lastgroup, match.group()
        if kind == "tag":  # the tag group sits inside "dollar"
            kind = "dollar"
        css = _TOKEN_CLASS.get(kind or "")
        if kind == "word" and token.lower() in SQL_KEYWORDS:
            css = "kw"
        parts.append(f'<span class="{css}">{escape(token)}</span>' if css else escape(token))
    return Html("".join(parts))


# -- small pieces -----------------------------------------------------------------

_TYPE_NAMES = {0: "unspecified", 16: "bool", 20: "int8", 21: "int2", 23: "int4", 25: "text",
               114: "json", 700: "float4", 701: "float8", 1043: "varchar", 1082: "date",
               1114: "timestamp", 1184: "timestamptz", 1700: "numeric", 2950: "uuid", 3802: "jsonb"}


def iso_time(at: float) -> str:
    """For people: ``2025-01-31 08:00:00 UTC``."""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso_input(at: float) -> str:
    """For a filter field (what ``parse_timestamp`` reads back): ``2025-01-31T08:00:00Z``."""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def time_element(at: float, label: str) -> Html:
    moment = datetime.fromtimestamp(at, UTC).isoformat()
    return fill(Template('<time datetime="$moment" title="$title">$label</time>'),
                moment=moment, title=iso_time(at), label=label)


def ago(at: float, now: float) -> str:
    return f"{format_duration(now - at)} ago"


def statement_preview(subject_kind: str, subject: Mapping[str, Any]) -> str:
    """One line for a queue row: the statement's text, or what a grant asks for."""
    line = grant_line(subject) if subject_kind == "grant" else " ".join(str(subject.get("sql", "")).split())
    return line if len(line) <= STATEMENT_PREVIEW else line[: STATEMENT_PREVIEW - 1] + "…"


def grant_line(subject: Mapping[str, Any]) -> str:
    kinds = ", ".join(subject.get("kinds") or []) or "no kinds"
    tables = ", ".join(subject.get("tables") or [])
    duration = subject.get("duration")
    window = format_duration(float(duration)) if isinstance(duration, int | float) else "?"
    where = f" on {tables}" if tables else ""
    return f"Grant {kinds}{where} for {window}: {subject.get('reason') or 'no reason given'}"


def approvals_count(doc: JSONObject) -> tuple[int, int]:
    """Approvals collected and needed over all steps of a request."""
    steps = doc["steps"]
    return sum(len(step["approved_by"]) for step in steps), sum(step["required"] for step in steps)


def status_label(doc: JSONObject) -> str:
    """``Pending (N/M)`` under quorum or several steps, else the status in words."""
    status = str(doc["status"])
    if status == "pending":
        got, needed = approvals_count(doc)
        return f"Pending ({got}/{needed})" if needed > 1 else "Pending"
    return status.capitalize()


def remaining_after_my_approval(doc: JSONObject) -> str:
    """What approving now leaves to do, in words (shown before and after the vote)."""
    got, needed = approvals_count(doc)
    left = needed - got - 1
    if left <= 0:
        starts = "the grant starts" if doc["kind"] == "grant" else "the statement may run"
        return f"Your approval completes the request: {starts}."
    return f"After your approval, {left} more approval{'s' if left != 1 else ''} will be needed."


def remaining_text(doc: JSONObject) -> str:
    """After a vote: how many approvals the request still needs, and from which step."""
    got, needed = approvals_count(doc)
    left = needed - got
    step = doc["current_step"]
    where = ""
    if step is not None:
        current = doc["steps"][step]
        where = f" (step {step + 1}/{len(doc['steps'])} {current['name']!r})"
    return f"{left} more approval{'s' if left != 1 else ''} needed{where}"


# -- the layout ---------------------------------------------------------------------

_LAYOUT = Template("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title · pgvouch</title>
<link rel="stylesheet" href="$assets/activity-queue.css">
<script src="$assets/activity-queue.js" defer></script>
</head>
<body>
<a class="skip" href="#main">Skip to content</a>
<header class="top">
  <span class="brand">pgvouch</span>
  $nav
</header>
<main id="main" tabindex="-1">
$flashes
$body
</main>
<dialog id="review-dialog" aria-labelledby="review-title"></dialog>
</body>
</html>
""")

_NAV = Template("""<nav aria-label="Sections">
    <a href="/" $queue_current>Activity Queue <span id="pending-badge" class="badge"
       aria-label="$pending_words">$pending</span></a>
    <a href="/grants" $grants_current>Grants</a>
    <a href="/audit" $audit_current>Audit</a>
  </nav>
  <form class="who" method="post" action="/signout">
    <span>Signed in as <strong>$user</strong></span>
    <input type="hidden" name="csrf" value="$csrf">
    <button type="submit" class="link">Sign out</button>
  </form>""")


@dataclass(frozen=True)
class Chrome:
    """What every signed-in page shows around its body."""

    user: str
    csrf: str
    pending: int
    flashes: Sequence[tuple[str, str]] = ()  # (kind: "ok" | "error", message)


def page(title: str, body: Html, chrome: Chrome | None, tab: str = "") -> Html:
    nav = Html("")
    if chrome is not None:
        current = {name: Html('aria-current="page"' if name == tab else "")
                   for name in ("queue", "grants", "audit")}
        nav = fill(_NAV, user=chrome.user, csrf=chrome.csrf, pending=chrome.pending,
                   pending_words=f"{chrome.pending} pending", queue_current=current["queue"],
                   grants_current=current["grants"], audit_current=current["audit"])
    flashes = join(
        fill(Template('<p class="flash $kind" role="$role">$message</p>'), kind=kind, message=message,
             role="alert" if kind == "error" else "status")
        for kind, message in (chrome.flashes if chrome else ())
    )
    return fill(_LAYOUT, title=title, nav=nav, flashes=flashes, body=body, assets=ASSETS)


_BREAK_GLASS = Template('<p class="flash error break-glass" role="alert"><strong>Approvals are OFF for '
                        '$glob</strong> (break-glass by $actor: $reason): statements that need review '
                        'run without it, each audited.</p>')


def break_glass_banner(off: Sequence[tuple[str, str, str]]) -> Html:
    """A red banner per glob whose approvals are off: (glob, who switched it off, why)."""
    return join(fill(_BREAK_GLASS, glob=glob, actor=actor, reason=reason) for glob, actor, reason in off)


def error_body(title: str, message: str, code: str | None = None) -> Html:
    detail = fill(Template(' <code class="code">$code</code>'), code=code) if code else Html("")
    return fill(Template("""<h1>$title</h1>
<p class="flash error" role="alert">$message$detail</p>
<p><a href="/">Back to the Activity Queue</a></p>"""), title=title, message=message, detail=detail)


# -- sign-in --------------------------------------------------------------------------

_SIGNIN = Template("""<section class="signin">
<h1>Sign in to the Activity Queue</h1>
$error
<form method="post" action="/signin">
  <input type="hidden" name="csrf" value="$csrf">
  <label for="token">API token</label>
  <input id="token" name="token" type="password" autocomplete="off" required
         aria-describedby="token-help" autofocus>
  <p id="token-help" class="hint">Your pgvouch API token (an operator mints one with
    <code>pgvouch user token NAME</code>). It is checked once; the browser keeps only a session cookie.</p>
  <button type="submit" class="primary">Sign in</button>
</form>
</section>""")


def signin_body(csrf: str, error: str | None = None) -> Html:
    shown = Html("")
    if error:
        shown = fill(Template('<p class="flash error" role="alert">$error</p>'), error=error)
    return fill(_SIGNIN, csrf=csrf, error=shown)


# -- the queue --------------------------------------------------------------------

_QUEUE = Template("""<h1>Activity Queue</h1>
<form class="filters" method="get" action="/" role="search" aria-label="Filter requests">
  <label for="f-status">Status</label>
  <select id="f-status" name="status">$status_options</select>
  <label for="f-resource">Resource</label>
  <input id="f-resource" name="resource" value="$resource" placeholder="glob, e.g. prod-*"
         spellcheck="false">
  <button type="submit">Filter</button>
  <a href="/" class="reset">Reset</a>
</form>
<p id="live-status" class="hint" role="status" aria-live="polite"></p>
$results""")

_RESULTS = Template("""<div id="queue-results" data-pending="$pending">
<table class="queue">
<caption class="visually-hidden">$caption</caption>
<thead><tr>
  <th scope="col">Request</th><th scope="col">Statement</th><th scope="col">Requester</th>
  <th scope="col">Resource / account</th><th scope="col">Policy</th><th scope="col">Submitted</th>
  <th scope="col">Time left</th><th scope="col">Status</th><th scope="col">Action</th>
</tr></thead>
<tbody>
$rows
</tbody>
</table>
</div>""")

_ROW = Template("""<tr id="row-$id" data-id="$id" data-status="$status">
  <td class="rid"><a href="/requests/$id" data-review>$id</a></td>
  <td class="stmt"><a href="/requests/$id" data-review
      title="Open $id"><code>$preview</code></a></td>
  <td>$requester</td>
  <td>$resource<span class="muted"> / $account</span></td>
  <td class="policy">$policy</td>
  <td>$submitted</td>
  <td>$time_left</td>
  <td><span class="status s-$status">$status_label</span></td>
  <td class="action">$action</td>
</tr>""")

_EMPTY = Template('<tr><td colspan="99" class="empty">$message</td></tr>')


@dataclass(frozen=True)
class QueueFilters:
    status: str | None = None
    resource: str | None = None

    def query(self) -> str:
        pairs = [(key, value) for key, value in (("status", self.status), ("resource", self.resource))
                 if value]
        return f"?{urlencode(pairs)}" if pairs else ""


def queue_body(docs: Sequence[JSONObject], now: float, filters: QueueFilters, pending: int) -> Html:
    options = [fill(Template('<option value="" $selected>All</option>'),
                    selected=Html("selected" if not filters.status else ""))]
    options += [
        fill(Template('<option value="$value" $selected>$label</option>'), value=value,
             label=value.capitalize(), selected=Html("selected" if value == filters.status else ""))
        for value in STATUS_CHOICES
    ]
    return fill(_QUEUE, status_options=join(options), resource=filters.resource or "",
                results=queue_results(docs, now, filters, pending))


def queue_results(docs: Sequence[JSONObject], now: float, filters: QueueFilters, pending: int) -> Html:
    """The table of requests (the fragment the page re-fetches on live updates)."""
    rows = join((queue_row(doc, now) for doc in docs), "\n")
    if not docs:
        message = "No requests match these filters." if filters.query() else "No requests yet."
        rows = fill(_EMPTY, message=message)
    caption = f"{len(docs)} request{'s' if len(docs) != 1 else ''}, newest first"
    return fill(_RESULTS, pending=pending, caption=caption, rows=rows)


def queue_row(doc: JSONObject, now: float) -> Html:
    left = doc["time_left_text"]
    time_left = "—"
    if left is not None:
        time_left = left if doc["status"] == "pending" else f"usable {left}"
    return fill(
        _ROW, id=doc["id"], status=doc["status"], status_label=status_label(doc),
        preview=statement_preview(doc["kind"], doc["subject"]), requester=doc["requester"],
        resource=doc["resource"], account=doc["account"], policy=", ".join(doc["policies"]) or "—",
        submitted=time_element(doc["created_at"], ago(doc["created_at"], now)), time_left=time_left,
        action=row_action(doc),
    )


def row_action(doc: JSONObject) -> Html:
    """Review, or why not: four-eyes, an earlier vote, not an approver of this step."""
    if doc["status"] != "pending":
        return Html('<span class="muted">—</span>')
    viewer = doc["viewer"]
    if viewer["is_requester"]:
        return Html('<span class="note-own">Awaiting another reviewer</span>')
    if viewer["voted"]:
        return Html('<span class="note-done">You\'ve already reviewed</span>')
    if viewer["may_vote"]:
        return fill(Template('<a class="button primary" href="/requests/$id" data-review>Review</a>'),
                    id=doc["id"])
    return Html('<span class="muted">Not an approver of this step</span>')


# -- the review dialog -------------------------------------------------------------

_REVIEW = Template("""<article class="review" aria-labelledby="review-title">
<header class="review-head">
  <h2 id="review-title">$kind $id <span class="status s-$status">$status_label</span></h2>
  <a class="close" href="$next" data-close aria-label="Close">&times;</a>
</header>
$error
<dl class="facts">
  <dt>Requester</dt><dd>$requester</dd>
  <dt>Resource / account</dt><dd>$resource / $account</dd>
  <dt>Policy</dt><dd>$policies</dd>
  <dt>Submitted</dt><dd>$submitted</dd>
  <dt>$expiry_label</dt><dd>$expiry</dd>
  $extra_facts
</dl>
$subject
$steps
$votes
$outcome
$actions
</article>""")

_STATEMENT = Template("""<h3>Statement</h3>
<pre class="sql" tabindex="0" aria-label="SQL statement"><code>$sql</code></pre>
$params
<p class="hint">Kinds: $kinds · Tables: $tables · Database: $database · Role: $role ·
  search_path: $search_path</p>
$preview""")

_GRANT = Template("""<h3>Access window</h3>
<dl class="facts">
  <dt>Kinds</dt><dd>$kinds</dd><dt>Tables</dt><dd>$tables</dd>
  <dt>Duration</dt><dd>$duration</dd><dt>Reason</dt><dd>$reason</dd>
</dl>""")

_PARAMS = Template("""<table class="params">
<caption>Bound parameters</caption>
<thead><tr><th scope="col">#</th><th scope="col">Value</th><th scope="col">Type</th>
<th scope="col">Format</th></tr></thead>
<tbody>$rows</tbody>
</table>""")

_ACTIONS = Template("""<form class="decide" method="post" action="/requests/$id/decide">
  <input type="hidden" name="csrf" value="$csrf">
  <input type="hidden" name="next" value="$next">
  <label for="note-$id">Note for the requester (optional)</label>
  <textarea id="note-$id" name="note" rows="2" maxlength="$max_note"></textarea>
  $quorum
  <div class="buttons">$buttons</div>
</form>""")


def review_body(doc: JSONObject, now: float, *, csrf: str, next_url: str, max_note: int,
                error: tuple[str, str] | None = None) -> Html:
    is_grant = doc["kind"] == "grant"
    status = str(doc["status"])
    if status == "pending":
        expiry_label, expiry = "Expires in", text(doc["time_left_text"] or "0s")
    elif status == "approved" and doc["approved_until"] is not None:
        expiry_label = "Grant ends in" if is_grant else "Approval usable for"
        expiry = text(doc["time_left_text"] or "0s")
    else:
        expiry_label, expiry = "Decided", (
            time_element(doc["decided_at"], iso_time(doc["decided_at"])) if doc["decided_at"]
            else text("—"))
    extra = []
    if doc["executed_at"]:
        extra.append(fill(Template("<dt>Released</dt><dd>$at</dd>"),
                          at=time_element(doc["executed_at"], iso_time(doc["executed_at"]))))
    shown_error = Html("")
    if error is not None:
        shown_error = fill(Template('<p class="flash error" role="alert">$message <code>$code</code></p>'),
                           code=error[0], message=error[1])
    return fill(
        _REVIEW, kind="Grant request" if is_grant else "Request", id=doc["id"], status=status, next=next_url,
        status_label=status_label(doc), error=shown_error, requester=doc["requester"],
        resource=doc["resource"], account=doc["account"],
        policies=", ".join(doc["policies"]) or "—",
        submitted=time_element(doc["created_at"], ago(doc["created_at"], now)),
        expiry_label=expiry_label, expiry=expiry, extra_facts=join(extra),
        subject=grant_block(doc["subject"]) if is_grant
        else statement_block(doc["subject"], doc.get("preview")),
        steps=steps_block(doc), votes=votes_block(doc), outcome=outcome_block(doc),
        actions=actions_block(doc, csrf=csrf, next_url=next_url, max_note=max_note),
    )


def statement_block(subject: Mapping[str, Any], preview: Mapping[str, Any] | None = None) -> Html:
    params = subject.get("params") or []
    rows = join(
        fill(Template('<tr><th scope="row">$$$n</th><td><code>$value</code></td><td>$type</td>'
                      "<td>$format</td></tr>"),
             n=index, value=param_value(param),
             type=_TYPE_NAMES.get(int(param.get("type_oid") or 0), f"oid {param.get('type_oid')}"),
             format=param.get("format", "text"))
        for index, param in enumerate(params, start=1)
    )
    session = subject.get("session") or {}
    preview_block = Html("")
    if preview is not None:
        preview_block = fill(
            Template('<h3>Impact preview</h3><p class="hint">$summary$stale</p>'
                     '<pre class="json" tabindex="0">$plan</pre>'),
            summary=impact.summary(preview), stale=" (stale: refreshed when you approve)"
            if preview.get("stale") else "",
            plan=json.dumps(preview.get("statements"), indent=2, ensure_ascii=False))
    return fill(
        _STATEMENT, sql=highlight_sql(str(subject.get("sql", ""))),
        params=fill(_PARAMS, rows=rows) if params else Html(""),
        kinds=", ".join(subject.get("kinds") or []) or "—",
        tables=", ".join(subject.get("tables") or []) or "—",
        database=session.get("database") or "—", role=session.get("role") or "—",
        search_path=session.get("search_path") or "—", preview=preview_block,
    )


def param_value(param: Mapping[str, Any]) -> str:
    value = param.get("value")
    if value is None:
        return "NULL"
    if param.get("format") == "binary" or param.get("hex"):
        return f"\\x{value}"
    return str(value)


def grant_block(subject: Mapping[str, Any]) -> Html:
    duration = subject.get("duration")
    return fill(
        _GRANT, kinds=", ".join(subject.get("kinds") or []) or "—",
        tables=", ".join(subject.get("tables") or []) or "all",
        duration=format_duration(float(duration)) if isinstance(duration, int | float) else "—",
        reason=subject.get("reason") or "—",
    )


def steps_block(doc: JSONObject) -> Html:
    rows = join(
        fill(Template('<tr class="$css"><th scope="row">$n. $name</th><td>$approvers</td><td>$progress'
                      "</td><td>$approved_by</td><td>$state</td></tr>"),
             css="current" if step["current"] else "", n=step["index"] + 1, name=step["name"],
             approvers=", ".join(step["approvers"]), progress=step["progress"],
             approved_by=", ".join(step["approved_by"]) or "—",
             state="done" if step["done"] else ("collecting" if step["current"] else "waiting"))
        for step in doc["steps"]
    )
    return fill(Template("""<table class="steps">
<caption>Approval steps</caption>
<thead><tr><th scope="col">Step</th><th scope="col">Approvers</th><th scope="col">Approvals</th>
<th scope="col">Approved by</th><th scope="col">State</th></tr></thead>
<tbody>$rows</tbody></table>"""), rows=rows)


def votes_block(doc: JSONObject) -> Html:
    if not doc["votes"]:
        return Html('<h3>Reviewers</h3><p class="muted">Nobody has reviewed this request yet.</p>')
    items = join(
        fill(Template('<li><strong>$user</strong> <span class="vote v-$decision">$past</span> '
                      "step $step · $at$note</li>"),
             user=vote["user"], decision=vote["decision"],
             past="approved" if vote["decision"] == "approve" else "denied", step=vote["step"] + 1,
             at=time_element(vote["at"], iso_time(vote["at"])),
             note=fill(Template('<blockquote>$note</blockquote>'), note=vote["note"]) if vote["note"]
             else Html(""))
        for vote in doc["votes"]
    )
    return fill(Template('<h3>Reviewers</h3><ul class="votes">$items</ul>'), items=items)


def outcome_block(doc: JSONObject) -> Html:
    parts = []
    if doc["note"]:
        parts.append(fill(Template('<p><strong>Note:</strong> $note</p>'), note=doc["note"]))
    if doc["error"]:
        parts.append(fill(Template('<p class="flash error"><strong>Failed:</strong> $error</p>'),
                          error=doc["error"]))
    return join(parts)


def actions_block(doc: JSONObject, *, csrf: str, next_url: str, max_note: int) -> Html:
    """The buttons the viewer may use: the rules come from the workflow via ``doc["viewer"]``."""
    viewer, status = doc["viewer"], doc["status"]
    buttons: list[Html] = []
    quorum = Html("")
    if status == "pending" and viewer["may_vote"]:
        buttons += [Html('<button type="submit" name="decision" value="approve" class="primary">'
                         "Approve</button>"),
                    Html('<button type="submit" name="decision" value="deny" class="danger">'
                         "Deny</button>")]
        quorum = fill(Template('<p class="quorum">$words</p>'), words=remaining_after_my_approval(doc))
    elif status == "pending" and viewer["is_requester"]:
        quorum = Html('<p class="quorum">Awaiting another reviewer: you cannot review your own '
                      "request (four-eyes).</p>")
    elif status == "pending" and viewer["voted"]:
        quorum = Html("<p class=\"quorum\">You've already reviewed this request.</p>")
    if status == "pending" and viewer["is_requester"]:
        buttons.append(Html('<button type="submit" name="decision" value="cancel">Cancel request</button>'))
    if status == "approved" and doc["kind"] == "grant":
        buttons.append(Html('<button type="submit" name="decision" value="revoke" class="danger">'
                            "Revoke grant</button>"))
    close = fill(Template('<a class="button" href="$next" data-close>Close</a>'), next=next_url)
    if not buttons:
        return fill(Template('$quorum<div class="buttons">$close</div>'), quorum=quorum, close=close)
    return fill(_ACTIONS, id=doc["id"], csrf=csrf, next=next_url, max_note=max_note, quorum=quorum,
                buttons=join([*buttons, close], " "))


# -- grants -----------------------------------------------------------------------------


_GRANT_ROW = Template("""<tr><td class="rid"><a href="/requests/$id?next=/grants" data-review>$id</a></td>
<td>$what</td><td>$requester</td><td>$resource<span class="muted"> / $account</span></td>
<td>$time_left</td><td><span class="status s-$status">$status_label</span></td>
<td class="action">$action</td></tr>""")

_REVOKE = Template("""<form method="post" action="/requests/$id/decide">
<input type="hidden" name="csrf" value="$csrf"><input type="hidden" name="next" value="/grants">
<button type="submit" name="decision" value="revoke" class="danger"
        aria-label="Revoke grant $id">Revoke</button>
</form>""")


def grants_body(docs: Sequence[JSONObject], now: float, csrf: str) -> Html:
    """Active and pending grants; an active one has a Revoke button (the service decides who may)."""
    rows = join(
        fill(_GRANT_ROW, id=doc["id"], what=grant_line(doc["subject"]), requester=doc["requester"],
             resource=doc["resource"], account=doc["account"],
             time_left=(doc["time_left_text"] or "—") if doc["status"] != "pending"
             else f"expires in {doc['time_left_text']}",
             status=doc["status"], status_label=status_label(doc),
             action=fill(_REVOKE, id=doc["id"], csrf=csrf) if doc["status"] == "approved"
             else row_action(doc))
        for doc in docs
    )
    if not docs:
        rows = fill(_EMPTY, message="No active or pending grants.")
    return fill(Template("""<h1>Grants</h1>
<p class="hint">Time-boxed access windows, active and pending.</p>
<table class="queue grants">
<caption class="visually-hidden">Active and pending grants</caption>
<thead><tr><th scope="col">Grant</th><th scope="col">What</th><th scope="col">Requester</th>
<th scope="col">Resource / account</th><th scope="col">Time left</th><th scope="col">Status</th>
<th scope="col">Action</th></tr></thead>
<tbody>$rows</tbody></table>"""), rows=rows)


# -- audit ----------------------------------------------------------------------------

@dataclass(frozen=True)
class AuditFilters:
    type: str = ""
    actor: str = ""
    request_id: str = ""
    since: str = ""

    def matches(self, event: AuditEvent) -> bool:
        return ((not self.type or event.type.startswith(self.type))
                and (not self.actor or event.actor == self.actor)
                and (not self.request_id or event.request_id == self.request_id))

    def query(self, after_id: int) -> str:
        pairs = [(key, value) for key, value in (("type", self.type), ("actor", self.actor),
                                                 ("request", self.request_id), ("since", self.since))
                 if value]
        return "?" + urlencode([*pairs, ("after_id", str(after_id))])


def audit_body(events: Sequence[AuditEvent], verification: Verification, filters: AuditFilters,
               next_after_id: int | None) -> Html:
    if verification.ok:
        chain = fill(Template('<p class="chain ok" role="status">✓ Chain verified: $message</p>'),
                     message=verification.message)
    else:
        chain = fill(Template('<p class="chain bad" role="alert">✗ Chain broken at event $bad: $message</p>'),
                     bad=verification.first_bad_id or "?", message=verification.message)
    rows = join(
        fill(Template("""<tr><td>$id</td><td class="when">$at</td><td><code>$type</code></td><td>$actor</td>
<td class="rid">$request</td><td class="data"><code>$data</code></td></tr>"""),
             id=event.id, at=time_element(event.at, iso_time(event.at)), type=event.type, actor=event.actor,
             request=audit_request_link(event.request_id),
             data=json.dumps(event.data, ensure_ascii=False, sort_keys=True))
        for event in events
    )
    if not events:
        rows = Html('<tr><td colspan="6" class="empty">No events match these filters.</td></tr>')
    more = Html("")
    if next_after_id is not None:
        more = fill(Template('<p><a class="button" href="/audit$query">Later events →</a></p>'),
                    query=filters.query(next_after_id))
    return fill(Template("""<h1>Audit log</h1>
$chain
<form class="filters" method="get" action="/audit" role="search" aria-label="Filter audit events">
  <label for="a-type">Type</label>
  <input id="a-type" name="type" value="$type" placeholder="request. or request.approved" spellcheck="false">
  <label for="a-actor">Actor</label>
  <input id="a-actor" name="actor" value="$actor" spellcheck="false">
  <label for="a-request">Request</label>
  <input id="a-request" name="request" value="$request_id" placeholder="R-7KQ2X" spellcheck="false">
  <label for="a-since">Since</label>
  <input id="a-since" name="since" value="$since" placeholder="2025-01-31T08:00Z" spellcheck="false">
  <button type="submit">Filter</button>
  <a href="/audit" class="reset">Reset</a>
</form>
<table class="audit">
<caption class="visually-hidden">Audit events, oldest first</caption>
<thead><tr><th scope="col">#</th><th scope="col">At</th><th scope="col">Type</th><th scope="col">Actor</th>
<th scope="col">Request</th><th scope="col">Data</th></tr></thead>
<tbody>$rows</tbody></table>
$more"""), chain=chain, type=filters.type, actor=filters.actor, request_id=filters.request_id,
                since=filters.since, rows=rows, more=more)


def audit_request_link(request_id: str | None) -> Html:
    if not request_id:
        return Html('<span class="muted">—</span>')
    return fill(Template('<a href="/requests/$id" data-review>$id</a>'), id=request_id)
