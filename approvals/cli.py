"""``pgvouch user token`` and ``pgvouch audit verify | export``: approvals tools for operators.

Owns: those subcommands (arguments, output, exit codes). ``user token``
mints an API token with ``approvals.auth``; the audit commands open the
store named by the config's ``store:`` and use the store's verification and
``approvals.audit.export``, the same code the API uses.

Must not: hold audit, token or store logic of its own.

Exit codes: 0 success; 1 ``audit verify`` found the log tampered with;
2 the tool could not run (bad arguments, unreadable config, store
unavailable).

Runs standalone as ``python -m approvals.cli ...``; ``proxy/cli.py``
registers the same subcommands with :func:`add_approval_commands`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from approvals.api import parse_timestamp
from approvals.audit import export
from approvals.auth import new_token, token_hash
from approvals.store import Store, StoreUnavailable, open_store, sqlite_path
from config.settings import load_settings
from config.yamlnodes import ConfigError

OK, TAMPERED, CANNOT_RUN = 0, 1, 2

def add_approval_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    user_actions: argparse._SubParsersAction[argparse.ArgumentParser] | None = None,
) -> None:
    """Register ``user token`` and ``audit verify|export``; each sets ``func(args) -> exit code``.

    ``user_actions`` is the existing ``user`` command's subparsers (``pgvouch
    user hash`` lives there); without it a ``user`` command is created.
    """
    if user_actions is None:
        user = subparsers.add_parser("user", help="user tools")
        user_actions = user.add_subparsers(dest="action", metavar="ACTION", required=True)
    token = user_actions.add_parser(
        "token",
        help="mint an API token for a user",
        description="Print a new random API token for NAME (shown once: keep it in a secret store), "
        "then the line to put under that user in the config. The config keeps only the hash.",
    )
    token.add_argument("name", metavar="NAME")
    token.set_defaults(func=run_user_token)

    audit = subparsers.add_parser("audit", help="verify and export the audit log")
    actions = audit.add_subparsers(dest="audit_action", metavar="ACTION", required=True)
    verify = actions.add_parser(
        "verify",
        help="check the audit log's hash chain",
        description="Exit 0 if the chain is intact, 1 if an event was edited, deleted or reordered.",
    )
    verify.add_argument("--config", "-c", required=True, metavar="FILE", help="pgvouch config (its store:)")
    verify.set_defaults(func=run_audit_verify)
    export_ = actions.add_parser("export", help="print audit events, one JSON object a line")
    export_.add_argument("--config", "-c", required=True, metavar="FILE", help="pgvouch config (its store:)")
    export_.add_argument("--since", metavar="TIME", help="unix seconds or ISO 8601 (UTC unless it says)")
    export_.add_argument("--format", choices=("jsonl",), default="jsonl")
    export_.set_defaults(func=run_audit_export)


def run_user_token(args: argparse.Namespace) -> int:
    token = new_token()
    print(f"API token for {args.name} (shown once; keep it secret):", file=sys.stderr)
    print(token)
    print(f"Put this under `- name: {args.name}` in the config's users:", file=sys.stderr)
    print(f"api_token_sha256: {token_hash(token)}")
    return OK


def run_audit_verify(args: argparse.Namespace) -> int:
    async def verify(store: Store) -> int:
        result = await store.verify_audit()
        if result.ok:
            print(f"audit log OK: {result.message}")
            return OK
        print(f"audit log TAMPERED at event #{result.first_bad_id}: {result.message}")
        return TAMPERED

    return _with_store(args.config, verify)


def run_audit_export(args: argparse.Namespace) -> int:
    try:
        since = None if args.since is None else parse_timestamp(args.since)
    except ValueError as exc:
        print(f"pgvouch: --since: {exc}", file=sys.stderr)
        return CANNOT_RUN

    async def dump(store: Store) -> int:
        async for line in export(store, since=since, format=args.format):
            sys.stdout.write(line)
        sys.stdout.flush()
        return OK

    return _with_store(args.config, dump)


def _with_store(config: str, work: Callable[[Store], Awaitable[int]]) -> int:
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        print(f"pgvouch: {exc}", file=sys.stderr)
        return CANNOT_RUN

    try:
        missing = settings.store.startswith("sqlite:") and not Path(sqlite_path(settings.store)).is_file()
    except ValueError as exc:
        print(f"pgvouch: {exc}", file=sys.stderr)
        return CANNOT_RUN
    if missing:  # opening would create an empty store that "verifies"
        print(f"pgvouch: no store at {sqlite_path(settings.store)} (the config's store:)", file=sys.stderr)
        return CANNOT_RUN

    async def run() -> int:
        store = await open_store(settings.store)
        try:
            return await work(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except (StoreUnavailable, ValueError) as exc:
        print(f"pgvouch: the store is unavailable: {exc}", file=sys.stderr)
        return CANNOT_RUN


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pgvouch", description="pgvouch approvals tools")
    add_approval_commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
