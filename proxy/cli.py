"""The ``pgvouch`` command line.

Owns: argument parsing and wiring: ``serve``, ``demo``, ``user hash``,
``config check`` and the ``policy`` tools. Each subcommand is a small
function returning an exit code.

Must not: contain proxy or policy logic itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import getpass
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from approvals.approval_mode_cli import add_approval_mode_command
from approvals.cli import add_approval_commands
from approvals.grants_cli import add_grant_commands
from approvals.service import ApprovalService
from config.settings import Settings, load_settings
from config.yamlnodes import ConfigError
from policies.cli import add_policy_commands
from proxy import SPEEDUPS, scram
from proxy.decide import Decider
from proxy.logs import setup_logging

if TYPE_CHECKING:
    from approvals.pg_notify import ChangeListener
    from proxy.function_catalog import FunctionCatalog
    from proxy.policy_decider import LivePolicies
    from proxy.server import ProxyServer
    from proxy.worker_link import WorkerLink

log = logging.getLogger("pgvouch")


def _event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def run_proxy(
    settings: Settings,
    decider: Decider | None = None,
    on_ready: Callable[[], Awaitable[None] | None] | None = None,
    link: WorkerLink | None = None,
) -> None:
    """Run the proxy and its API until SIGTERM/SIGINT, then drain. With ``link``, as one
    of several workers (``proxy.supervisor``)."""
    from approvals import notify
    from approvals.grants import GrantDesk
    from approvals.webhooks import DeliveryWorker
    from proxy.api import start_api
    from proxy.approval_hold import ApprovalReviewer
    from proxy.function_catalog import FunctionCatalog
    from proxy.grant_command import GrantCommands
    from proxy.grant_sessions import GrantSessions
    from proxy.policy_decider import PolicyDecider, load_live_policies
    from proxy.preview import PreviewRunner
    from proxy.server import ProxyServer
    from proxy.statement_audit import StatementAuditor

    proxy = ProxyServer(settings, decider)
    proxy.link = link
    tasks: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloadable: LivePolicies | None = None
    service = None
    previews: PreviewRunner | None = None
    if decider is None:
        if settings.policies:
            reload_hooks: list[Callable[[str], None]] = [
                lambda result: proxy.metrics.policy_reloads.labels(result).inc()
            ]

            def on_reload(result: str) -> None:
                for hook in reload_hooks:
                    hook(result)

            live = load_live_policies(
                settings.policies,
                {name: user.groups for name, user in settings.users.items()},
                on_reload=on_reload,
            )
            reloadable = live
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGHUP, live.reload)
            service = await open_approvals(settings)
            service.listeners.append(proxy.metrics.observe_request)
            if settings.preview.enabled:
                previews = PreviewRunner(service, settings)
                previews.install()
            with contextlib.suppress(Exception):
                pending = await service.store.list(status="pending", resource_glob=None,
                                                   limit=100_000)
                proxy.metrics.requests_pending.set(len(pending))
            proxy.approvals = service
            auditor = StatementAuditor(service.store, reads=settings.audit_reads)

            def audit_reload(result: str) -> None:
                auditor.enqueue({
                    "type": "policy.reloaded" if result == "ok" else "policy.reload_refused",
                    "actor": "system", "path": live.path, "error": live.last_error,
                    "policies": [policy.name for policy in live.current.policies],
                })

            reload_hooks.append(audit_reload)
            grants = GrantDesk(service, settings, lambda: live.current)
            grant_sessions = GrantSessions(proxy, service)
            grant_sessions.install()
            proxy.grants = grants
            reviewer = ApprovalReviewer(service, settings, auditor, on_grant_use=grant_sessions.watch)
            functions = FunctionCatalog(settings.functions) if settings.functions.volatility else None
            proxy.functions = functions
            proxy.decider = PolicyDecider(live, reviewer, auditor, GrantCommands(grants),
                                          functions)
            tasks.append(loop.create_task(grant_sessions.run()))
            tasks.append(loop.create_task(live.watch()))
            tasks.append(loop.create_task(service.run_sweeper(settings.hold.sweep_interval)))
            changes = replica_changes(service)
            if changes is not None:
                share_cancels(proxy, changes)
                tasks.append(loop.create_task(changes.run()))
            tasks.append(loop.create_task(auditor.run()))
            if notify.any_channel(settings):
                worker = DeliveryWorker(service.store, settings, senders=notify.senders(settings),
                                        counter=proxy.metrics.webhook_deliveries)
                tasks.append(loop.create_task(worker.run(interval=1.0)))
            log.info("policies loaded from %s (%d policies)", live.path,
                     len(live.current.policies))
        else:
            log.warning("no `policies:` configured: every statement is ALLOWED (foundation mode)")
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGHUP, lambda: log.info(
                    "SIGHUP: no policies are configured, nothing to reload"))
    if link is not None:
        link_workers(link, proxy, reloadable, stop)
    await proxy.start()
    runner = await start_api(proxy)
    if runner is not None:
        log.info("API on http://%s:%d", settings.api.host, settings.api.port)
    # Everything loaded so far (modules, policies, caches' first entries) lives
    # as long as the process: keep it out of the cyclic collector's generations,
    # so a collection walks only what the sessions allocate.
    gc.collect()
    gc.freeze()
    log.info("relay modules compiled: %s", SPEEDUPS)
    if link is not None:
        link.ready()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        if on_ready is not None:
            result = on_ready()
            if result is not None:
                await result
        await stop.wait()
        log.info("shutting down: draining sessions")
        await proxy.drain()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if runner is not None:
            await runner.cleanup()
        if previews is not None:
            await previews.close()
        if service is not None:
            await service.store.close()
        if link is not None:
            await link.close()
    log.info("stopped")


def link_workers(link: WorkerLink, proxy: ProxyServer, live: LivePolicies | None,
                 stop: asyncio.Event) -> None:
    """One of several workers: what this one tells the others, and answers them."""
    from prometheus_client import generate_latest

    from proxy.console import session_rows

    functions: FunctionCatalog | None = proxy.functions
    if functions is not None:
        catalog = functions
        catalog.on_change = lambda resource: link.note("functions", resource=resource)
        link.notes["functions"] = lambda note: catalog.note_change(str(note["resource"]),
                                                                   shared=False)

    def cancel(note: dict[str, object]) -> None:
        pid, secret = note.get("pid"), note.get("secret")
        if isinstance(pid, int) and isinstance(secret, str) and len(secret) == 8:
            proxy.cancel_from_worker(pid, bytes.fromhex(secret))

    link.notes["cancel"] = cancel
    if live is not None:
        policies = live
        link.notes["reload"] = lambda note: log.info(
            "policies reloaded: %s", "ok" if policies.reload() else "refused")
    link.answers["metrics"] = lambda: generate_latest(proxy.metrics.registry).decode()
    link.answers["sessions"] = lambda: session_rows(proxy)
    link.on_lost = stop.set


def replica_changes(service: ApprovalService) -> ChangeListener | None:
    """On a PostgreSQL store: the listener that wakes this replica's holds on others' changes.

    Register further notification kinds here (``changes.on(kind, handler)``).
    """
    from approvals.pg_notify import REQUEST, ChangeListener
    from approvals.pg_store import PgStore

    store = service.store
    if not isinstance(store, PgStore):
        return None  # SQLite: one process; its own changes wake its holds directly
    changes = ChangeListener(store.dsn, store.channel, on_listening=service.wake_all)
    changes.on(REQUEST, service.wake)
    return changes


def share_cancels(proxy: ProxyServer, changes: ChangeListener) -> None:
    """Replicas behind one address: a cancel request that reaches a replica whose key it
    is not is announced on the store's channel, and the replica that issued it cancels."""
    from approvals.pg_notify import CANCEL
    from approvals.pg_store import PgStore

    store = proxy.approvals.store if proxy.approvals is not None else None
    if not isinstance(store, PgStore):
        return
    shared = store

    async def announce(key: str) -> None:
        await shared.announce(CANCEL, key)

    proxy.announce_cancel = announce
    changes.on(CANCEL, proxy.cancel_announced)


async def open_approvals(settings: Settings) -> ApprovalService:
    """The approvals store and service; a store that is down now heals when it returns."""
    from approvals import notify
    from approvals.store import StoreError, open_store

    store = await open_store(settings.store, connect=False)
    try:
        await store.start()
    except StoreError as exc:
        log.error("approvals store %s is unavailable (%s): statements that need review will be "
                  "refused until it is back", settings.store.split("@")[-1], exc)
    directory = {name: user.groups for name, user in settings.users.items()}
    return ApprovalService(store, directory,
                           webhooks=[(hook.url, hook.events) for hook in settings.webhooks],
                           notifiers=notify.notifiers(settings))


def cmd_serve(args: argparse.Namespace) -> int:
    link = None
    try:
        if args.worker is not None:  # started by the supervisor (workers: above 1)
            from proxy.worker_link import WorkerLink

            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload before the policies load
            link, text, workers = WorkerLink.from_argument(args.worker)
            settings = dataclasses.replace(load_settings(args.config, text), workers=workers)
        else:
            text = read_config(args.config)
            settings = load_settings(args.config, text)
    except ConfigError as exc:
        print(f"pgvouch: {exc}", file=sys.stderr)
        return 2
    if link is not None:
        setup_logging(settings.log_format, settings.log_level, f"worker-{link.index}")
        if settings.pin_workers:  # before the event loop starts its threads: they inherit it
            from proxy.worker_link import pin_to_cpu

            cpu = pin_to_cpu(link.index)
            if cpu is not None:
                logging.getLogger("pgvouch.worker").info("worker-%d runs on CPU %d",
                                                         link.index, cpu)
        if link.index > 0:  # the first worker serves the API (and asks the others)
            settings = dataclasses.replace(settings,
                                           api=dataclasses.replace(settings.api, enabled=False))
    elif settings.workers > 1:
        from proxy.supervisor import Supervisor

        setup_logging(settings.log_format, settings.log_level, "supervisor")
        return asyncio.run(Supervisor(settings, args.config, text).run())
    else:
        setup_logging(settings.log_format, settings.log_level)
        if settings.pin_workers:
            log.warning("pin_workers has no effect with one worker (workers: 1)")
    _event_loop_policy()
    try:
        asyncio.run(run_proxy(settings, link=link))
    except ConfigError as exc:
        print(f"pgvouch: {exc}", file=sys.stderr)
        return 2
    return 0


def read_config(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    setup_logging("plain", "INFO")
    _event_loop_policy()
    return run_demo(port=args.port, api_port=args.api_port)


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"pgvouch: {exc}", file=sys.stderr)
        return 2
    print(
        f"{args.config}: OK ({len(settings.resources)} resource(s), "
        f"{len(settings.users)} user(s))"
    )
    return 0


def cmd_user_hash(args: argparse.Namespace) -> int:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if password != getpass.getpass("Again: "):
            print("pgvouch: the passwords do not match", file=sys.stderr)
            return 2
    if not password:
        print("pgvouch: empty password", file=sys.stderr)
        return 2
    print(scram.make_verifier(password, iterations=args.iterations).encode())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgvouch", description="PostgreSQL access proxy")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", "-c", required=True, help="the YAML configuration file")
    serve.add_argument("--worker", help=argparse.SUPPRESS)  # INDEX:CONTROL_FD:CHANNEL_FD
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="the proxy in front of a throwaway local PostgreSQL")
    demo.add_argument("--port", type=int, default=6432)
    demo.add_argument("--api-port", type=int, default=8432)
    demo.set_defaults(func=cmd_demo)

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="action", required=True)
    check = config_sub.add_parser("check", help="validate a configuration file")
    check.add_argument("config")
    check.set_defaults(func=cmd_config_check)

    user = sub.add_parser("user", help="user tools")
    user_sub = user.add_subparsers(dest="action", required=True)
    hash_ = user_sub.add_parser("hash", help="print a SCRAM-SHA-256 verifier for a password")
    hash_.add_argument("--password-stdin", action="store_true",
                       help="read the password from standard input instead of prompting")
    hash_.add_argument("--iterations", type=int, default=scram.DEFAULT_ITERATIONS)
    hash_.set_defaults(func=cmd_user_hash)
    add_policy_commands(sub)
    add_approval_commands(sub, user_actions=user_sub)
    add_approval_mode_command(sub)
    add_grant_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
