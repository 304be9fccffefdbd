"""``pgvouch grant request | list | revoke``: just-in-time grants from a shell.

Owns: those subcommands (arguments, output, exit codes). They call the REST
API (``/api/v1/grants``) with the caller's own token from ``$PGVOUCH_TOKEN``
(``approvals.rest_client``; never printed), so the server applies exactly
the checks every other client gets.

Must not: check grants against policies or decide who may revoke (the
server does).

Exit codes: 0 done; 1 the API refused (denied kind, cap exceeded, not
eligible, ...); 2 the tool could not run (no token, API unreachable, store
unavailable).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from approvals.rest_client import ApiCallError, add_api_argument, client_from

OK, REFUSED, CANNOT_RUN = 0, 1, 2


def add_grant_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    grant = subparsers.add_parser(
        "grant", help="just-in-time grants: ask for a time-boxed window, list, revoke",
        description="A grant lets your statements of the granted kinds (and tables) on one "
        "resource/account run without per-statement review until it ends. It is reviewed like a "
        "statement; its window starts at approval.",
    )
    actions = grant.add_subparsers(dest="grant_action", metavar="ACTION", required=True)
    ask = actions.add_parser("request", help="ask for a grant (you are the requester)")
    ask.add_argument("--resource", required=True)
    ask.add_argument("--account", required=True)
    ask.add_argument("--kinds", required=True, metavar="KINDS", help="comma-separated, e.g. write")
    ask.add_argument("--tables", metavar="GLOBS", help="comma-separated table globs (default: any)")
    ask.add_argument("--duration", required=True, metavar="DURATION", help="e.g. 1h, 30m")
    ask.add_argument("--reason", required=True, metavar="TEXT", help="e.g. an incident number")
    ask.add_argument("--terminate-sessions", action="store_true",
                     help="close your sessions on the resource when the grant ends")
    listing = actions.add_parser("list", help="list grants, newest first")
    listing.add_argument("--active", action="store_true", help="only running grants")
    listing.add_argument("--mine", action="store_true", help="only your own grants")
    revoke = actions.add_parser("revoke", help="end a running grant (its owner or an approver)")
    revoke.add_argument("request_id", metavar="ID")
    revoke.add_argument("--note", metavar="TEXT")
    for action in (ask, listing, revoke):
        add_api_argument(action)
    ask.set_defaults(func=run_request)
    listing.set_defaults(func=run_list)
    revoke.set_defaults(func=run_revoke)


def run_request(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {
        "resource": args.resource, "account": args.account,
        "kinds": [k.strip() for k in args.kinds.split(",") if k.strip()],
        "duration": args.duration, "reason": args.reason,
        "terminate_sessions": args.terminate_sessions,
    }
    if args.tables:
        body["tables"] = [t.strip() for t in args.tables.split(",") if t.strip()]
    try:
        grant = client_from(args).call("POST", "/grants", body)
    except ApiCallError as exc:
        return _failed(exc)
    print(f"{grant['id']}\t{grant['summary']}")
    print(f"may approve: {', '.join(grant['may_vote']) or 'nobody'}", file=sys.stderr)
    return OK


def run_list(args: argparse.Namespace) -> int:
    query = "&".join(name for name, on in (("active=true", args.active), ("mine=true", args.mine)) if on)
    try:
        answer = client_from(args).call("GET", "/grants" + (f"?{query}" if query else ""))
    except ApiCallError as exc:
        return _failed(exc)
    for grant in answer["grants"]:
        subject = grant["subject"]
        tables = ",".join(subject.get("tables") or []) or "*"
        print("\t".join([grant["id"], grant["status"], grant["requester"],
                         f"{grant['resource']}/{grant['account']}", ",".join(subject["kinds"]), tables,
                         grant["time_left_text"] or "-", subject.get("reason", "")]))
    return OK


def run_revoke(args: argparse.Namespace) -> int:
    body = {"note": args.note} if args.note else None
    try:
        grant = client_from(args).call("POST", f"/grants/{args.request_id}/revoke", body)
    except ApiCallError as exc:
        return _failed(exc)
    print(f"{grant['id']}\t{grant['status']}")
    return OK


def _failed(exc: ApiCallError) -> int:
    print(f"pgvouch: {exc}", file=sys.stderr)
    return REFUSED if 400 <= exc.status < 500 and exc.status != 401 else CANNOT_RUN
