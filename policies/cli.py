"""``pgvouch policy lint | explain | test``: policy tools for security teams.

Owns: the ``policy`` subcommand (arguments, exit codes, text and JSON
output). Each action loads policies with ``loader`` and decides with
``classify`` + ``evaluate``, the code path the proxy uses.

Must not: hold policy logic of its own.

Exit codes: 0 success; 1 lint found a problem or a policy test failed;
2 the tool could not run (bad arguments, unreadable config, invalid
policies or test files for explain/test).

Runs standalone as ``python -m policies.cli policy ...``; ``proxy/cli.py``
registers the same subcommand with :func:`add_policy_commands`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from config.settings import load_settings
from config.yamlnodes import ConfigError
from policies.classify import Classification, classify
from policies.evaluate import Decision, Identity, evaluate
from policies.loader import UserDirectory, load_policies
from policies.model import PolicySet
from policies.testing import CaseResult, load_cases, run_cases

OK, FAILED, CANNOT_RUN = 0, 1, 2


class _UsageError(Exception):
    pass


def add_policy_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``policy lint|explain|test``; each sets ``func(args) -> exit code``."""
    policy = subparsers.add_parser(
        "policy",
        help="lint, explain and test access policies",
        description="Check policy files, explain a decision, and run policy tests, "
        "with the same code the proxy decides with. Exit codes: 0 ok; 1 lint problem or "
        "failed test; 2 the tool could not run.",
    )
    actions = policy.add_subparsers(dest="policy_action", metavar="ACTION", required=True)

    lint = actions.add_parser("lint", help="load the policies and report the first problem")
    _source_arguments(lint)
    lint.set_defaults(func=run_lint)

    explain = actions.add_parser("explain", help="show the decision for one SQL text, and why")
    _source_arguments(explain)
    explain.add_argument("--resource", required=True)
    explain.add_argument("--account", required=True)
    explain.add_argument("--user", required=True)
    explain.add_argument(
        "--groups", help="comma-separated groups (default: the user's groups in --config)"
    )
    explain.add_argument("--sql", required=True)
    explain.add_argument("--json", action="store_true", help="print JSON")
    explain.set_defaults(func=run_explain)

    test = actions.add_parser("test", help="run policy test files")
    _source_arguments(test)
    test.add_argument("files", nargs="+", metavar="TESTS.yaml")
    test.add_argument("--json", action="store_true", help="print JSON")
    test.set_defaults(func=run_test)


def _source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policies", metavar="DIR", help="policy directory (or one file)")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="pgvouch config: its users resolve group approvers; its policies: is the default DIR",
    )


def _load(args: argparse.Namespace) -> tuple[PolicySet, UserDirectory | None]:
    users: dict[str, tuple[str, ...]] | None = None
    directory: str | None = args.policies
    if args.config:
        settings = load_settings(args.config)
        users = {name: user.groups for name, user in settings.users.items()}
        directory = directory or settings.policies
    if directory is None:
        raise _UsageError("give --policies DIR, or --config FILE whose config sets policies:")
    return load_policies(directory, users=users), users


def run_lint(args: argparse.Namespace) -> int:
    try:
        policy_set, users = _load(args)
    except _UsageError as exc:
        print(f"pgvouch policy lint: {exc}", file=sys.stderr)
        return CANNOT_RUN
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return FAILED
    rules = sum(len(p.rules) for p in policy_set.policies)
    print(
        f"ok: {len(policy_set.policies)} policies, {rules} rules from "
        f"{len(policy_set.files)} file(s); defaults: action {policy_set.defaults.action}, "
        f"unknown {policy_set.defaults.unknown}"
    )
    if users is None:
        print("note: without --config, approvers given as group:NAME were not counted")
    return OK


def run_explain(args: argparse.Namespace) -> int:
    try:
        policy_set, users = _load(args)
    except (_UsageError, ConfigError) as exc:
        print(f"pgvouch policy explain: {exc}", file=sys.stderr)
        return CANNOT_RUN
    identity = Identity(args.user, _groups(args.groups, args.user, users))
    classification = classify(args.sql)
    decision = evaluate(classification, identity, args.resource, args.account, policy_set)
    if args.json:
        print(json.dumps(explain_json(classification, decision, identity), indent=2))
    else:
        print(explain_text(classification, decision, identity))
    return OK


def _groups(
    text: str | None, user: str, users: Mapping[str, Sequence[str]] | None
) -> tuple[str, ...]:
    if text is not None:
        return tuple(g.strip() for g in text.split(",") if g.strip())
    if users is not None and user in users:
        return tuple(users[user])
    return ()


def run_test(args: argparse.Namespace) -> int:
    try:
        policy_set, users = _load(args)
        cases = [case for path in args.files for case in load_cases(path)]
        results = run_cases(cases, policy_set, users)
    except (_UsageError, ConfigError) as exc:
        print(f"pgvouch policy test: {exc}", file=sys.stderr)
        return CANNOT_RUN
    passed = sum(r.passed for r in results)
    failed = len(results) - passed
    if args.json:
        print(json.dumps(tests_json(results), indent=2))
    else:
        for result in results:
            print(_result_line(result))
        print(f"{passed} passed, {failed} failed")
    return OK if failed == 0 else FAILED


# -- rendering ----------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def explain_text(
    classification: Classification, decision: Decision, identity: Identity
) -> str:
    lines = [f"decision: {decision.action}"]
    if decision.policy is not None:
        lines.append(f"decided by: policy {decision.policy}, rule {decision.rule}")
    else:
        lines.append("decided by: defaults")
    if decision.message:
        lines.append(f"message: {decision.message}")
    lines.append(f"reason: {decision.reason}")
    groups = ", ".join(identity.groups) or "none"
    lines.append(f"identity: {identity.user} (groups: {groups})")
    if decision.steps:
        lines.append("approval (every step below must be satisfied):")
        for step in decision.steps:
            who = ", ".join(step.approvers)
            lines.append(
                f"  - {step.policy} / {step.name}: {step.required} of {who}"
            )
        if decision.expires_after is not None:
            lines.append(f"  request expires after {_duration(decision.expires_after)}")
        if decision.jit_max_duration is not None:
            lines.append(f"  a JIT grant of up to {_duration(decision.jit_max_duration)} may cover it")
        hold = decision.hold
        overrides = [
            f"{name} {value}"
            for name, value in (
                ("mode", hold.mode),
                ("wait_timeout", _duration(hold.wait_timeout) if hold.wait_timeout else None),
                ("approved_ttl", _duration(hold.approved_ttl) if hold.approved_ttl else None),
            )
            if value
        ]
        if overrides:
            lines.append(f"  hold overrides: {', '.join(overrides)}")
    lines.append(f"statements ({classification.kind}):")
    for number, statement in enumerate(classification.statements, start=1):
        tables = ", ".join(statement.tables) or "none"
        lines.append(f"  {number}. {statement.kind}; tables: {tables}")
        lines.append(f"     why: {statement.reason}")
        lines.append(f"     sql: {statement.text}")
    lines.append("how:")
    lines.extend(f"  {line}" for line in decision.explanation)
    return "\n".join(lines)


def explain_json(
    classification: Classification, decision: Decision, identity: Identity
) -> dict[str, Any]:
    return {
        "action": decision.action.value,
        "policy": decision.policy,
        "rule": decision.rule,
        "message": decision.message,
        "reason": decision.reason,
        "identity": {"user": identity.user, "groups": list(identity.groups)},
        "kind": classification.kind.value,
        "statements": [
            {
                "text": s.text,
                "kind": s.kind.value,
                "tables": list(s.tables),
                "functions": list(s.functions),
                "reason": s.reason,
            }
            for s in classification.statements
        ],
        "verdicts": [
            {
                "statement": v.statement,
                "policy": v.policy,
                "rule": v.rule,
                "action": v.action.value,
                "why": v.why,
                "source": v.source,
            }
            for v in decision.verdicts
        ],
        "steps": [
            {
                "policy": s.policy,
                "rule": s.rule,
                "name": s.name,
                "approvers": list(s.approvers),
                "required": s.required,
            }
            for s in decision.steps
        ],
        "expires_after": decision.expires_after,
        "hold": {
            "mode": decision.hold.mode,
            "wait_timeout": decision.hold.wait_timeout,
            "approved_ttl": decision.hold.approved_ttl,
        },
        "jit_max_duration": decision.jit_max_duration,
        "explanation": list(decision.explanation),
    }


def _result_line(result: CaseResult) -> str:
    case = result.case
    if result.passed:
        return f"PASS {case.name}"
    decision = result.decision
    return (
        f"FAIL {case.name} ({case.source}): expected {case.expect}, got {decision.action} "
        f"[kinds: {', '.join(result.kinds) or 'none'}] — {decision.reason}"
    )


def tests_json(results: Sequence[CaseResult]) -> dict[str, Any]:
    passed = sum(r.passed for r in results)
    return {
        "results": [
            {
                "name": r.case.name,
                "expect": r.case.expect.value,
                "actual": r.decision.action.value,
                "passed": r.passed,
                "kinds": [kind.value for kind in r.kinds],
                "policy": r.decision.policy,
                "rule": r.decision.rule,
                "reason": r.decision.reason,
            }
            for r in results
        ],
        "passed": passed,
        "failed": len(results) - passed,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pgvouch")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_policy_commands(commands)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
