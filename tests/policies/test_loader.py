"""Loading policy directories: the schema, and every rejection with file:line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from config.yamlnodes import ConfigError
from policies.kinds import Kind
from policies.loader import load_policies, policy_files, policy_set_from_text
from policies.model import Action, Condition, Defaults

USERS = {"alice": ("developers",), "bob": ("dba",), "carol": ("dba", "security")}

FULL = """\
policies:
  - name: production-writes
    description: Writes on production need a DBA
    match:
      resources: ["prod-*"]
      accounts: ["*-admin", "app"]
      users: ["*", "group:dba"]
    rules:
      - when: {kinds: [read, session]}
        action: allow
      - name: payments
        when: {kinds: [write], tables: ["Public.Payments*"]}
        action: review
        message: Payments need two teams
        approval:
          steps:
            - {name: DBA review, approvers: ["group:dba"], required: 1}
            - {name: Security review, approvers: ["group:security", "bob"], required: 2}
          expires_after: 8h
        jit: {max_duration: 4h}
        hold: {mode: retry, wait_timeout: 5m, approved_ttl: 1h30m}
      - when: {kinds: [destructive, privilege, admin, unknown]}
        action: deny
        message: Not on production
defaults:
  action: allow
  unknown: deny
"""


def test_full_schema_loads() -> None:
    policy_set = policy_set_from_text(FULL, "p.yaml", users=USERS)
    (policy,) = policy_set.policies
    assert policy.name == "production-writes"
    assert policy.description == "Writes on production need a DBA"
    assert policy.source == "p.yaml:2"
    assert policy.match.resources == ("prod-*",)
    assert policy.match.accounts == ("*-admin", "app")
    assert policy.match.users == ("*", "group:dba")
    first, payments, deny = policy.rules
    assert first.when == Condition(kinds=frozenset({Kind.READ, Kind.SESSION}))
    assert first.label == "#1"
    assert payments.label == "payments"
    assert payments.when.tables == ("public.payments*",)  # globs are lowercased
    assert payments.action is Action.REVIEW
    assert payments.message == "Payments need two teams"
    assert payments.approval is not None
    assert [s.name for s in payments.approval.steps] == ["DBA review", "Security review"]
    assert payments.approval.steps[1].approvers == ("group:security", "bob")
    assert payments.approval.steps[1].required == 2
    assert payments.approval.expires_after == 8 * 3600
    assert payments.jit is not None and payments.jit.max_duration == 4 * 3600
    assert payments.hold is not None
    assert (payments.hold.mode, payments.hold.wait_timeout, payments.hold.approved_ttl) == (
        "retry",
        300,
        5400,
    )
    assert deny.action is Action.DENY and deny.source == "p.yaml:22"
    assert policy_set.defaults == Defaults(Action.ALLOW, Action.DENY, "p.yaml:26")


def test_defaults_are_deny_when_no_file_sets_them() -> None:
    policy_set = policy_set_from_text(
        "policies:\n  - name: a\n    match: {resources: [x]}\n    rules: [{action: allow}]\n"
    )
    assert policy_set.defaults == Defaults(Action.DENY, Action.DENY, None)


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_directory_loads_every_yaml_file_but_not_subdirectories(tmp_path: Path) -> None:
    _write(tmp_path, "b.yml", "policies: [{name: b, match: {accounts: [x]}, rules: [{action: deny}]}]")
    _write(tmp_path, "a.yaml", "policies: [{name: a, match: {resources: [x]}, rules: [{action: allow}]}]")
    _write(tmp_path, "defaults.yaml", "defaults: {action: allow}")
    _write(tmp_path, ".hidden.yaml", "this is: [not loaded")
    _write(tmp_path, "notes.txt", "not loaded")
    (tmp_path / "tests").mkdir()
    _write(tmp_path / "tests", "cases.yaml", "tests: []")
    policy_set = load_policies(tmp_path)
    assert [p.name for p in policy_set.policies] == ["a", "b"]
    assert [Path(f).name for f in policy_set.files] == ["a.yaml", "b.yml", "defaults.yaml"]
    assert policy_set.defaults.action is Action.ALLOW


def test_a_single_file_can_be_loaded(tmp_path: Path) -> None:
    path = _write(tmp_path, "one.yaml", FULL)
    assert policy_files(path) == [path]
    assert len(load_policies(path, users=USERS).policies) == 1


def test_missing_and_empty_directories(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such policy directory"):
        load_policies(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"no policy files"):
        load_policies(tmp_path)


def test_duplicate_policy_names_across_files(tmp_path: Path) -> None:
    same = "  - {name: same, match: {resources: [x]}, rules: [{action: allow}]}\n"
    _write(tmp_path, "a.yaml", "policies:\n" + same)
    _write(tmp_path, "b.yaml", "\npolicies:\n" + same)
    with pytest.raises(ConfigError) as info:
        load_policies(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'b.yaml'}:3: duplicate policy name 'same'")
    assert f"{tmp_path / 'a.yaml'}:2" in message


def test_defaults_only_once(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", "defaults: {action: allow}\n")
    _write(tmp_path, "b.yaml", "defaults:\n  action: deny\n")
    with pytest.raises(ConfigError, match=r"b\.yaml:2: defaults are already set at .*a\.yaml:1"):
        load_policies(tmp_path)


POLICY_HEAD = "policies:\n  - name: p\n"
RULES_HEAD = POLICY_HEAD + "    match: {resources: [x]}\n    rules:\n"
MATCH_X = "    match:\n      resources: [x]\n"

ERRORS = [
    # (document, expected "line: message" fragment)
    ("", "1: the file is empty"),
    ("policies: [\n", "invalid YAML"),
    ("polices: []\n", "1: unknown key 'polices'"),
    ("{}\n", "1: expected a 'policies:' list and/or a 'defaults:' block"),
    ("policies:\n  - name: p\n    match: {resources: [x]}\n    rules: [{action: allow}]\n    color: red\n",
     "5: unknown key 'color'"),
    ("policies:\n  - match: {resources: [x]}\n    rules: [{action: allow}]\n",
     "2: missing required key 'name'"),
    (POLICY_HEAD + "    match: {}\n    rules: [{action: allow}]\n",
     "3: match needs resources and/or accounts"),
    (POLICY_HEAD + "    match: {users: [alice]}\n    rules: [{action: allow}]\n",
     "3: match needs resources and/or accounts"),
    (POLICY_HEAD + "    match: {resources: []}\n    rules: [{action: allow}]\n",
     "3: an empty list matches nothing"),
    (POLICY_HEAD + "    match:\n      resources: ['prod-[']\n    rules: [{action: allow}]\n",
     "4: invalid glob 'prod-['"),
    (POLICY_HEAD + MATCH_X + "      users: ['group:']\n    rules: [{action: allow}]\n",
     "5: group: needs a group name"),
    (POLICY_HEAD + MATCH_X + "      users: ['group:db[']\n    rules: [{action: allow}]\n",
     "5: invalid glob 'db['"),
    (POLICY_HEAD + "    match: {resources: [x]}\n    rules: []\n", "4: a policy needs at least one rule"),
    (RULES_HEAD + "      - when: {kinds: [reads]}\n        action: allow\n",
     "5: must be one of read, session, write"),
    (RULES_HEAD + "      - when: {kinds: []}\n        action: allow\n",
     "5: an empty kinds list matches nothing"),
    (RULES_HEAD + "      - when: {}\n        action: allow\n",
     "5: an empty 'when' matches every statement"),
    (RULES_HEAD + "      - when: {tables: ['a[']}\n        action: allow\n",
     "5: invalid glob 'a['"),
    (RULES_HEAD + "      - when: {kind: [read]}\n        action: allow\n",
     "5: unknown key 'kind'"),
    (RULES_HEAD + "      - action: permit\n",
     "5: must be one of allow, review, deny"),
    (RULES_HEAD + "      - when: {kinds: [write]}\n",
     "5: missing required key 'action'"),
    (RULES_HEAD + "      - action: review\n",
     "5: a review rule needs approval"),
    (RULES_HEAD + "      - action: deny\n        jit: {max_duration: 1h}\n",
     "6: jit only applies to rules with action: review"),
    (RULES_HEAD + "      - action: allow\n"
     "        approval: {steps: [{name: s, approvers: [bob]}]}\n",
     "6: approval only applies to rules with action: review"),
    (RULES_HEAD + "      - action: review\n"
     "        approval: {steps: []}\n",
     "6: approval needs at least one step"),
    (RULES_HEAD + "      - action: review\n"
     "        approval:\n          steps:\n            - {name: s, approvers: []}\n",
     "8: a step needs at least one approver"),
    (RULES_HEAD + "      - action: review\n"
     "        approval:\n          steps:\n            - {name: s, approvers: ['group:*']}\n",
     "8: approvers are user names or group:NAME, not globs"),
    (RULES_HEAD + "      - action: review\n"
     "        approval:\n          steps:\n            - {name: s, approvers: [bob], required: 0}\n",
     "8: must be at least 1"),
    (RULES_HEAD + "      - action: review\n"
     "        approval:\n          steps:\n            - {name: s, approvers: [bob]}\n"
     "            - {name: s, approvers: [carol]}\n",
     "9: duplicate step name 's'"),
    (RULES_HEAD + "      - action: review\n"
     "        approval:\n          steps: [{name: s, approvers: [bob]}]\n          expires_after: soon\n",
     "8: invalid duration 'soon'"),
    (RULES_HEAD + "      - action: review\n"
     "        approval: {steps: [{name: s, approvers: [bob]}]}\n        hold: {mode: later}\n",
     "7: must be one of wait, retry"),
    (RULES_HEAD + "      - action: review\n"
     "        approval: {steps: [{name: s, approvers: [bob]}]}\n        jit: {max_duration: 0s}\n",
     "7: must be longer than zero"),
    (RULES_HEAD + "      - action: allow\n      - action: deny\n",
     "6: this rule can never apply: rule #1 before it has no 'when'"),
    ("defaults: {action: review}\n", "1: defaults can be allow or deny"),
    ("defaults: {action: allow, unknown: maybe}\n", "1: must be one of allow, deny"),
    ("defaults: {fallback: allow}\n", "1: unknown key 'fallback'"),
]


@pytest.mark.parametrize(("text", "expected"), ERRORS)
def test_rejections_name_file_and_line(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        policy_set_from_text(text, "policies/p.yaml", users=USERS)
    assert str(info.value).startswith("policies/p.yaml:")
    assert expected in str(info.value)


def _step(approvers: str, required: int) -> str:
    return (
        POLICY_HEAD
        + "    match: {resources: [x]}\n    rules:\n      - action: review\n"
        + "        approval:\n          steps:\n"
        + f"            - name: s\n              approvers: {approvers}\n"
        + f"              required: {required}\n"
    )


def test_required_is_checked_against_the_user_directory() -> None:
    policy_set_from_text(_step("['group:dba']", 2), users=USERS)  # bob and carol
    with pytest.raises(ConfigError) as info:
        policy_set_from_text(_step("['group:dba']", 3), "p.yaml", users=USERS)
    assert str(info.value) == (
        "p.yaml:10: step 's' requires 3 approval(s) but only 2 person(s) could ever approve "
        "it (bob, carol)"
    )
    # A person in two listed groups counts once; unknown users do not count.
    with pytest.raises(ConfigError, match=r"only 2 person\(s\).*not configured users: erin"):
        policy_set_from_text(_step("['group:dba', 'group:security', erin]", 3), users=USERS)
    with pytest.raises(ConfigError, match=r"only 0 person\(s\) could ever approve it \(nobody\)"):
        policy_set_from_text(_step("['group:auditors']", 1), users=USERS)


def test_required_without_a_user_directory() -> None:
    # Plain names can be counted; groups cannot, so those steps are accepted.
    policy_set_from_text(_step("[bob, carol]", 2))
    policy_set_from_text(_step("['group:dba']", 5))
    with pytest.raises(ConfigError, match=r"requires 3 approval\(s\) but only 2"):
        policy_set_from_text(_step("[bob, carol, bob]", 3))
