"""``pgvouch approval-mode off | on | status``: break-glass from a shell.

Owns: those subcommands (arguments, output, exit codes). They talk to the
REST API (``POST/GET /api/v1/approval-mode``) with the caller's own token
from ``$PGVOUCH_TOKEN`` (``approvals.rest_client``), so the server checks
that the caller is an owner, audits the switch under their name and
announces it, exactly as for any other API client. (Opening the store
directly, as ``pgvouch audit`` does, would let anyone who can read the
config switch approvals off without being an owner.)

Must not: decide who may switch or what a switch does (``approvals.approval_mode``
on the server does).

Exit codes: 0 done; 1 the API refused (not an owner, no reason, not off);
2 the tool could not run (no token, API unreachable, store unavailable).
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

from approvals.rest_client import ApiCallError, add_api_argument, client_from

OK, REFUSED, CANNOT_RUN = 0, 1, 2


def add_approval_mode_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    mode = subparsers.add_parser(
        "approval-mode",
        help="break-glass: switch approvals off (or back on) for resources (owners only)",
        description="While approvals are off for a resource, statements that would be held for "
        "review run directly, each audited; deny rules still apply. Switching off expires the "
        "pending requests on those resources. Every switch is audited and announced.",
    )
    actions = mode.add_subparsers(dest="mode_action", metavar="ACTION", required=True)
    off = actions.add_parser("off", help="switch approvals off for a resource glob")
    off.add_argument("--resources", required=True, metavar="GLOB", help="e.g. 'prod-*'")
    off.add_argument("--reason", required=True, metavar="TEXT", help="why (audited and announced)")
    on = actions.add_parser("on", help="switch approvals back on for a glob switched off")
    on.add_argument("--resources", required=True, metavar="GLOB", help="the glob that was switched off")
    on.add_argument("--reason", metavar="TEXT", help="optional note (audited and announced)")
    status = actions.add_parser("status", help="show where approvals are off")
    for action in (off, on, status):
        add_api_argument(action)
    off.set_defaults(func=run_switch, enabled=False)
    on.set_defaults(func=run_switch, enabled=True)
    status.set_defaults(func=run_status)


def run_switch(args: argparse.Namespace) -> int:
    body = {"resources": args.resources, "enabled": args.enabled, "reason": args.reason}
    try:
        answer = client_from(args).call("POST", "/approval-mode", body)
    except ApiCallError as exc:
        return _failed(exc)
    mode = answer["mode"]
    if mode["enabled"]:
        print(f"approvals are ON again for {mode['resources']}")
    else:
        print(f"approvals are OFF for {mode['resources']}: statements that need review run "
              f"directly (audited); reason: {mode['reason']}")
        expired = answer.get("expired") or []
        print(f"expired {len(expired)} pending request(s){': ' + ', '.join(expired) if expired else ''}")
    return OK


def run_status(args: argparse.Namespace) -> int:
    try:
        answer = client_from(args).call("GET", "/approval-mode")
    except ApiCallError as exc:
        return _failed(exc)
    modes: list[dict[str, Any]] = answer["modes"]
    off = [mode for mode in modes if not mode["enabled"]]
    if not off:
        print("approvals are on everywhere")
    for mode in modes:
        state = "on " if mode["enabled"] else "OFF"
        when = datetime.fromtimestamp(mode["changed_at"], UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        reason = f": {mode['reason']}" if mode["reason"] else ""
        print(f"{state} {mode['resources']}  since {when} by {mode['changed_by']}{reason}")
    return OK


def _failed(exc: ApiCallError) -> int:
    print(f"pgvouch: {exc}", file=sys.stderr)
    refused = 400 <= exc.status < 500 and exc.status != 401
    return REFUSED if refused else CANNOT_RUN
