"""Load a policy set from a directory of YAML files, rejecting mistakes with file:line.

Owns: reading policy files into :mod:`policies.model`, and every load-time
check: unknown keys, empty matches, invalid globs, unknown kinds or actions,
duplicate policy names across files, more than one ``defaults`` block,
review rules without approval steps, approval/jit/hold on rules that are not
``review``, rules made unreachable by an earlier catch-all rule, and
approval steps whose ``required`` exceeds the people who could ever approve.

Must not: evaluate statements, or read anything but the policy files.

Which files: every ``*.yaml`` and ``*.yml`` directly inside the directory,
in name order, skipping hidden files; subdirectories are ignored, so policy
tests can live next to the policies (``config/policies/tests/``). A path to
a single file loads just that file.

Who can approve: ``users`` maps each configured user to their groups (from
the config's ``users:``). With it, ``group:NAME`` approvers are resolved and
approvers who are not configured users do not count. Without it (no config
given to ``pgvouch policy lint``), only steps listing plain user names and no
groups can be checked.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from config.yamlnodes import ConfigError, Node, check_glob, load_file, load_text
from policies.globs import GROUP_PREFIX
from policies.kinds import Kind
from policies.model import (
    HOLD_MODES,
    Action,
    Approval,
    ApprovalStep,
    Condition,
    Defaults,
    HoldOverride,
    Jit,
    Match,
    Policy,
    PolicySet,
    Rule,
)

UserDirectory = Mapping[str, Sequence[str]]

_KIND_NAMES = tuple(kind.value for kind in Kind)
_ACTIONS = tuple(action.value for action in Action)
_GLOB_CHARS = frozenset("*?[]")


def load_policies(path: str | Path, *, users: UserDirectory | None = None) -> PolicySet:
    """Load the policy directory (or single file) at ``path``."""
    return load_policy_files(policy_files(path), users=users)


def policy_files(path: str | Path) -> list[Path]:
    """The files a policy directory contributes, in load order."""
    root = Path(path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ConfigError(f"{root}: no such policy directory")
    files = sorted(
        entry
        for entry in root.iterdir()
        if entry.is_file() and entry.suffix in (".yaml", ".yml") and not entry.name.startswith(".")
    )
    if not files:
        raise ConfigError(f"{root}: no policy files (*.yaml, *.yml) in this directory")
    return files


def load_policy_files(
    paths: Sequence[str | Path], *, users: UserDirectory | None = None
) -> PolicySet:
    return _build([load_file(p) for p in paths], users)


def policy_set_from_text(
    text: str, name: str = "<policies>", *, users: UserDirectory | None = None
) -> PolicySet:
    """Load one policy document given as text (tests, tools)."""
    return _build([load_text(text, name)], users)


def _build(roots: list[Node], users: UserDirectory | None) -> PolicySet:
    policies: list[Policy] = []
    seen: dict[str, str] = {}
    defaults: Defaults | None = None
    for root in roots:
        document = root.mapping(("policies", "defaults"))
        if "policies" not in document and "defaults" not in document:
            raise root.error("expected a 'policies:' list and/or a 'defaults:' block")
        if "policies" in document:
            for item in document["policies"].items():
                policy = _policy(item, users)
                if policy.name in seen:
                    raise item.error(
                        f"duplicate policy name {policy.name!r} (first defined at {seen[policy.name]})"
                    )
                seen[policy.name] = policy.source
                policies.append(policy)
        if "defaults" in document:
            node = document["defaults"]
            if defaults is not None:
                raise node.error(f"defaults are already set at {defaults.source}")
            defaults = _defaults(node)
    return PolicySet(
        policies=tuple(policies),
        defaults=defaults or Defaults(),
        files=tuple(root.file for root in roots),
    )


def _defaults(node: Node) -> Defaults:
    m = node.mapping(("action", "unknown"))
    allowed = (Action.ALLOW.value, Action.DENY.value)

    def choice(key: str) -> Action:
        if key not in m:
            return Action.DENY
        value = m[key].str()
        if value == Action.REVIEW.value:
            raise m[key].error(
                "defaults can be allow or deny; review needs approval steps, which belong to a rule"
            )
        return Action(m[key].choice(allowed))

    return Defaults(action=choice("action"), unknown=choice("unknown"), source=node.where())


def _policy(node: Node, users: UserDirectory | None) -> Policy:
    m = node.mapping(("name", "description", "match", "rules"), ("name", "match", "rules"))
    rules_node = m["rules"]
    items = rules_node.items()
    if not items:
        raise rules_node.error("a policy needs at least one rule")
    rules: list[Rule] = []
    for index, item in enumerate(items):
        if rules and rules[-1].when == Condition():
            raise item.error(
                f"this rule can never apply: rule {rules[-1].label} before it has no 'when' "
                "and matches every statement"
            )
        rules.append(_rule(item, index, users))
    return Policy(
        name=m["name"].str(),
        match=_match(m["match"]),
        rules=tuple(rules),
        source=node.where(),
        description=m["description"].str() if "description" in m else None,
    )


def _globs(node: Node) -> tuple[str, ...]:
    items = node.items()
    if not items:
        raise node.error("an empty list matches nothing; remove the key or add a pattern")
    return tuple(check_glob(item) for item in items)


def _user_patterns(node: Node) -> tuple[str, ...]:
    items = node.items()
    if not items:
        raise node.error("an empty list matches nobody; remove the key or add a pattern")
    patterns: list[str] = []
    for item in items:
        pattern = item.str()
        if pattern.startswith(GROUP_PREFIX):
            group = pattern[len(GROUP_PREFIX) :]
            if not group:
                raise item.error("group: needs a group name, e.g. group:dba")
            _check_group_glob(item, group)
        else:
            check_glob(item)
        patterns.append(pattern)
    return tuple(patterns)


def _check_group_glob(item: Node, pattern: str) -> None:
    if pattern.count("[") != pattern.count("]"):
        raise item.error(f"invalid glob {pattern!r}: unbalanced brackets")
    try:
        re.compile(fnmatch.translate(pattern))
    except re.error as exc:
        raise item.error(f"invalid glob {pattern!r}: {exc}") from None


def _match(node: Node) -> Match:
    m = node.mapping(("resources", "accounts", "users"))
    if "resources" not in m and "accounts" not in m:
        raise m.error(
            "match needs resources and/or accounts; an empty match would apply everywhere"
        )
    return Match(
        resources=_globs(m["resources"]) if "resources" in m else None,
        accounts=_globs(m["accounts"]) if "accounts" in m else None,
        users=_user_patterns(m["users"]) if "users" in m else None,
    )


def _rule(node: Node, index: int, users: UserDirectory | None) -> Rule:
    m = node.mapping(
        ("name", "when", "action", "message", "approval", "jit", "hold"), ("action",)
    )
    action = Action(m["action"].choice(_ACTIONS))
    if action is not Action.REVIEW:
        for key in ("approval", "jit", "hold"):
            if key in m:
                raise m[key].error(f"{key} only applies to rules with action: review")
    approval = _approval(m["approval"], users) if "approval" in m else None
    if action is Action.REVIEW and approval is None:
        raise m["action"].error("a review rule needs approval: {steps: [...]}")
    return Rule(
        index=index,
        when=_when(m["when"]) if "when" in m else Condition(),
        action=action,
        source=node.where(),
        name=m["name"].str() if "name" in m else None,
        message=m["message"].str() if "message" in m else None,
        approval=approval,
        jit=_jit(m["jit"]) if "jit" in m else None,
        hold=_hold(m["hold"]) if "hold" in m else None,
    )


def _when(node: Node) -> Condition:
    m = node.mapping(("kinds", "tables"))
    if "kinds" not in m and "tables" not in m:
        raise m.error("an empty 'when' matches every statement; remove it to say so")
    kinds: frozenset[Kind] | None = None
    if "kinds" in m:
        items = m["kinds"].items()
        if not items:
            raise m["kinds"].error("an empty kinds list matches nothing")
        kinds = frozenset(Kind(item.choice(_KIND_NAMES)) for item in items)
    tables = tuple(glob.lower() for glob in _globs(m["tables"])) if "tables" in m else None
    return Condition(kinds=kinds, tables=tables)


def _positive_duration(node: Node) -> float:
    seconds = node.duration()
    if seconds <= 0:
        raise node.error("must be longer than zero")
    return seconds


def _approval(node: Node, users: UserDirectory | None) -> Approval:
    m = node.mapping(("steps", "expires_after"), ("steps",))
    items = m["steps"].items()
    if not items:
        raise m["steps"].error("approval needs at least one step")
    steps: list[ApprovalStep] = []
    for item in items:
        step = _step(item, users)
        if any(existing.name == step.name for existing in steps):
            raise item.error(f"duplicate step name {step.name!r}")
        steps.append(step)
    expires = _positive_duration(m["expires_after"]) if "expires_after" in m else None
    return Approval(steps=tuple(steps), expires_after=expires)


def _step(node: Node, users: UserDirectory | None) -> ApprovalStep:
    m = node.mapping(("name", "approvers", "required"), ("name", "approvers"))
    approvers_node = m["approvers"]
    approvers: list[str] = []
    for item in approvers_node.items():
        approver = item.str()
        name = approver.removeprefix(GROUP_PREFIX)
        if not name:
            raise item.error("group: needs a group name, e.g. group:dba")
        if _GLOB_CHARS & set(name):
            raise item.error(
                f"approvers are user names or group:NAME, not globs (got {approver!r})"
            )
        approvers.append(approver)
    if not approvers:
        raise approvers_node.error("a step needs at least one approver")
    required = m["required"].int(minimum=1) if "required" in m else 1
    step = ApprovalStep(
        name=m["name"].str(), approvers=tuple(approvers), required=required, source=node.where()
    )
    _check_reachable(step, m.get("required") or node, users)
    return step


def _check_reachable(step: ApprovalStep, where: Node, users: UserDirectory | None) -> None:
    people = [a for a in step.approvers if not a.startswith(GROUP_PREFIX)]
    groups = [a[len(GROUP_PREFIX) :] for a in step.approvers if a.startswith(GROUP_PREFIX)]
    if users is None:
        if groups or step.required <= len(set(people)):
            return  # groups cannot be resolved without the config's users
        eligible = sorted(set(people))
        unknown: list[str] = []
    else:
        eligible = sorted(
            {p for p in people if p in users}
            | {user for user, member_of in users.items() if set(groups) & set(member_of)}
        )
        unknown = sorted({p for p in people if p not in users})
        if step.required <= len(eligible):
            return
    who = ", ".join(eligible) if eligible else "nobody"
    message = (
        f"step {step.name!r} requires {step.required} approval(s) but only "
        f"{len(eligible)} person(s) could ever approve it ({who})"
    )
    if unknown:
        message += f"; not configured users: {', '.join(unknown)}"
    raise where.error(message)


def _jit(node: Node) -> Jit:
    m = node.mapping(("max_duration",), ("max_duration",))
    return Jit(max_duration=_positive_duration(m["max_duration"]))


def _hold(node: Node) -> HoldOverride:
    m = node.mapping(("mode", "wait_timeout", "approved_ttl"))
    return HoldOverride(
        mode=m["mode"].choice(HOLD_MODES) if "mode" in m else None,
        wait_timeout=_positive_duration(m["wait_timeout"]) if "wait_timeout" in m else None,
        approved_ttl=_positive_duration(m["approved_ttl"]) if "approved_ttl" in m else None,
    )
