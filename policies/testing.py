"""Policy unit tests: the files ``pgvouch policy test`` runs.

Owns: the test-file schema and running its cases through exactly the code
path the proxy uses (``classify`` then ``evaluate``).

Must not: print or format results (``cli``), or read anything but the test
files it is given.

Schema::

    tests:
      - name: developers cannot drop production tables
        resource: prod-db
        account: app-admin
        user: alice
        groups: [developers]    # optional when the config names the user
        sql: DROP TABLE accounts
        expect: deny            # allow | review | deny

A case without ``groups`` takes the user's groups from the config; if the
config is not given or does not name the user, the case is an error rather
than silently running with no groups.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from config.yamlnodes import ConfigError, Node, load_file
from policies.classify import classify
from policies.evaluate import Decision, Identity, evaluate
from policies.kinds import Kind
from policies.model import Action, PolicySet

_ACTIONS = tuple(action.value for action in Action)


@dataclass(frozen=True)
class PolicyCase:
    name: str
    resource: str
    account: str
    user: str
    groups: tuple[str, ...] | None
    sql: str
    expect: Action
    source: str  # file:line


@dataclass(frozen=True)
class CaseResult:
    case: PolicyCase
    decision: Decision
    kinds: tuple[Kind, ...]

    @property
    def passed(self) -> bool:
        return self.decision.action is self.case.expect


def load_cases(path: str | Path) -> list[PolicyCase]:
    root = load_file(path)
    document = root.mapping(("tests",), ("tests",))
    items = document["tests"].items()
    if not items:
        raise document["tests"].error("a test file needs at least one test")
    cases = [_case(item) for item in items]
    seen: dict[str, str] = {}
    for case in cases:
        if case.name in seen:
            raise ConfigError(
                f"{case.source}: duplicate test name {case.name!r} (first at {seen[case.name]})"
            )
        seen[case.name] = case.source
    return cases


def _case(node: Node) -> PolicyCase:
    m = node.mapping(
        ("name", "resource", "account", "user", "groups", "sql", "expect"),
        ("name", "resource", "account", "user", "sql", "expect"),
    )
    groups = tuple(m["groups"].str_list()) if "groups" in m else None
    if "groups" in m.entries and groups is None:
        groups = ()
    return PolicyCase(
        name=m["name"].str(),
        resource=m["resource"].str(),
        account=m["account"].str(),
        user=m["user"].str(),
        groups=groups,
        sql=m["sql"].str(),
        expect=Action(m["expect"].choice(_ACTIONS)),
        source=node.where(),
    )


def identity_for(
    case: PolicyCase, users: Mapping[str, Sequence[str]] | None
) -> Identity:
    if case.groups is not None:
        return Identity(case.user, case.groups)
    if users is not None and case.user in users:
        return Identity(case.user, tuple(users[case.user]))
    raise ConfigError(
        f"{case.source}: test {case.name!r} gives no groups and user {case.user!r} is not "
        "in the config (pass --config, or write groups: [] for a user without groups)"
    )


def run_cases(
    cases: Sequence[PolicyCase],
    policy_set: PolicySet,
    users: Mapping[str, Sequence[str]] | None = None,
) -> list[CaseResult]:
    results: list[CaseResult] = []
    for case in cases:
        classification = classify(case.sql)
        identity = identity_for(case, users)
        decision = evaluate(classification, identity, case.resource, case.account, policy_set)
        results.append(CaseResult(case, decision, classification.kinds))
    return results
