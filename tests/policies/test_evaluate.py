"""The evaluator: matching, rule order, strictest action, defaults, review details."""

from __future__ import annotations

import pytest

from policies.classify import classify
from policies.evaluate import Decision, Identity, evaluate, statements_under_review
from policies.globs import tables_match, user_matches
from policies.kinds import Kind
from policies.loader import policy_set_from_text
from policies.model import Action, PolicySet

ALICE = Identity("alice", ("developers",))
BOB = Identity("bob", ("dba",))
CAROL = Identity("carol", ("dba", "security"))

POLICIES = """\
policies:
  - name: prod
    match: {resources: ["prod-*"]}
    rules:
      - when: {kinds: [read, session]}
        action: allow
      - name: payments
        when: {kinds: [write], tables: ["public.payments*"]}
        action: review
        message: payments need two teams
        approval:
          steps:
            - {name: DBA, approvers: ["group:dba"], required: 1}
            - {name: Security, approvers: ["group:security"], required: 1}
          expires_after: 4h
        hold: {mode: wait, wait_timeout: 10m}
      - name: writes
        when: {kinds: [write, ddl]}
        action: review
        approval:
          steps: [{name: DBA, approvers: ["group:dba"], required: 1}]
          expires_after: 8h
        jit: {max_duration: 4h}
        hold: {mode: retry, approved_ttl: 20m}
      - when: {kinds: [destructive, privilege, admin, unknown]}
        action: deny
        message: not on production
  - name: admin-account
    match: {resources: ["prod-*"], accounts: ["*-admin"]}
    rules:
      - when: {kinds: [ddl]}
        action: review
        approval:
          steps: [{name: Change board, approvers: [carol], required: 1}]
        jit: {max_duration: 1h}
  - name: hr
    match: {resources: ["prod-*"], users: ["group:develop*", "mallory"]}
    rules:
      - when: {tables: ["hr.salaries"]}
        action: deny
        message: no HR data for developers
  - name: scratch
    match: {resources: ["dev"]}
    rules:
      - name: scratch writes
        when: {kinds: [write, destructive], tables: ["scratch.*"]}
        action: allow
      - when: {kinds: [read]}
        action: allow
defaults:
  action: allow
  unknown: deny
"""

POLICY_SET = policy_set_from_text(POLICIES, "p.yaml")


def decide(
    sql: str,
    identity: Identity = ALICE,
    resource: str = "prod-db",
    account: str = "app",
    policy_set: PolicySet = POLICY_SET,
) -> Decision:
    return evaluate(classify(sql), identity, resource, account, policy_set)


def test_first_matching_rule_decides_within_a_policy() -> None:
    read = decide("SELECT * FROM orders")
    assert (read.action, read.policy, read.rule, read.rule_index) == (Action.ALLOW, "prod", "#1", 0)
    write = decide("UPDATE orders SET a = 1 WHERE id = 1")
    assert (write.action, write.rule) == (Action.REVIEW, "writes")
    payments = decide("UPDATE public.payments SET a = 1 WHERE id = 1")
    assert (payments.action, payments.rule) == (Action.REVIEW, "payments")
    assert payments.message == "payments need two teams"
    drop = decide("DROP TABLE orders")
    assert (drop.action, drop.rule, drop.message) == (Action.DENY, "#4", "not on production")
    assert "not on production" in drop.reason


def test_strictest_action_across_policies_wins() -> None:
    # prod allows the read, hr denies it for developers.
    decision = decide("SELECT * FROM hr.salaries")
    assert (decision.action, decision.policy) == (Action.DENY, "hr")
    assert {(v.policy, v.action) for v in decision.verdicts} == {
        ("prod", Action.ALLOW),
        ("hr", Action.DENY),
    }
    assert decide("SELECT * FROM hr.salaries", identity=BOB).action is Action.ALLOW


def test_match_blocks_are_anded() -> None:
    ddl = "CREATE TABLE t (a int)"
    # app account: only prod's "writes" rule; *-admin account: also the change board.
    plain = decide(ddl, account="app")
    assert [s.policy for s in plain.steps] == ["prod"]
    admin = decide(ddl, account="app-admin")
    assert [(s.policy, s.name) for s in admin.steps] == [
        ("prod", "DBA"),
        ("admin-account", "Change board"),
    ]
    assert decide(ddl, resource="staging-db", account="app-admin").policy is None


def test_users_match_by_name_glob_and_group_glob() -> None:
    sql = "SELECT * FROM hr.salaries"
    assert decide(sql, identity=Identity("mallory")).action is Action.DENY
    assert decide(sql, identity=Identity("zed", ("developers-eu",))).action is Action.DENY
    assert decide(sql, identity=Identity("zed", ("ops",))).action is Action.ALLOW
    assert user_matches("alice", (), ["a*"])
    assert user_matches("x", ("dba",), ["group:dba"])
    assert not user_matches("dba", (), ["group:dba"])


def test_defaults_apply_when_no_rule_decides() -> None:
    nothing = decide("SELECT 1", resource="staging")
    assert (nothing.action, nothing.policy) == (Action.ALLOW, None)
    assert "defaults.action = allow" in nothing.reason
    assert any("no policy applies" in line for line in nothing.explanation)
    # The dev policy applies but has no rule for session statements.
    session = decide("SET work_mem = '1MB'", resource="dev")
    assert session.action is Action.ALLOW and session.policy is None


def test_unknown_falls_back_to_defaults_unknown() -> None:
    decision = decide("DO $$ BEGIN END $$", resource="staging")
    assert decision.action is Action.DENY
    assert "defaults.unknown = deny" in decision.reason
    lenient = policy_set_from_text("defaults: {action: allow, unknown: allow}\n")
    assert decide("DO $$ BEGIN END $$", policy_set=lenient).action is Action.ALLOW
    strict = policy_set_from_text("defaults: {action: allow}\n")
    assert decide("CALL p()", policy_set=strict).action is Action.DENY


def test_allow_rules_with_tables_need_every_table_certain() -> None:
    assert decide("UPDATE scratch.t SET a = 1", resource="dev").action is Action.ALLOW
    assert decide("DELETE FROM scratch.t", resource="dev").rule == "scratch writes"
    # A table outside scratch in the same statement: the allow rule does not apply.
    mixed = "WITH d AS (DELETE FROM public.important RETURNING *) INSERT INTO scratch.t SELECT * FROM d"
    assert decide(mixed, resource="dev").action is Action.ALLOW  # defaults allow here...
    assert decide(mixed, resource="dev").policy is None  # ...but not through the scratch rule
    # An unqualified name is not certainly in scratch; a statement without tables neither.
    assert decide("UPDATE t SET a = 1 WHERE id = 1", resource="dev").policy is None
    assert decide("SELECT setval('scratch.s', 1)", resource="dev").policy is None


def test_deny_and_review_rules_with_tables_take_any_possible_table() -> None:
    # `salaries` may be hr.salaries through search_path.
    assert decide("SELECT * FROM salaries").action is Action.DENY
    assert decide("SELECT * FROM orders").action is Action.ALLOW
    assert decide("SELECT * FROM mydb.hr.salaries").action is Action.DENY
    assert decide("UPDATE payments SET a = 1 WHERE id = 1").rule == "payments"
    assert decide("UPDATE billing.payments SET a = 1 WHERE id = 1").rule == "writes"


def test_star_tables_match_deny_rules_but_never_allow_rules() -> None:
    assert tables_match(["*"], ["hr.salaries"], certain=False)
    assert not tables_match(["*"], ["scratch.*"], certain=True)
    assert not tables_match([], ["scratch.*"], certain=True)
    assert not tables_match([], ["hr.*"], certain=False)


@pytest.mark.parametrize(
    ("table", "glob", "possible", "certain"),
    [
        ("public.payments", "public.payments*", True, True),
        ("payments", "public.payments*", True, False),
        ("payments", "payments", True, True),
        ("hr.payments", "payments", True, True),  # no dot: any schema
        ("orders", "hr.reviews*", False, False),
        ("orders", "hr.*", True, False),
        ("orders", "h?.orders", True, False),
        ("orders", "*.orders", True, False),
        ("orders", "*orders", True, True),
        ("orders", "[a-z]*.ord*", True, False),
        ("db.hr.salaries", "hr.salaries", True, True),
        ("x.orders", "hr.*", False, False),
    ],
)
def test_table_glob_semantics(table: str, glob: str, possible: bool, certain: bool) -> None:
    assert tables_match([table], [glob], certain=False) is possible
    assert tables_match([table], [glob], certain=True) is certain


def test_each_statement_is_decided_on_its_own() -> None:
    decision = decide("SELECT * FROM orders; UPDATE orders SET a = 1 WHERE id = 1; SHOW x")
    assert decision.action is Action.REVIEW
    assert decision.reason.startswith("statement 2: write statement → review")
    assert [v.statement for v in decision.verdicts] == [0, 1, 2]
    assert decide("SELECT 1; DROP TABLE t").action is Action.DENY


def test_review_collects_steps_from_every_review_rule_once() -> None:
    sql = (
        "UPDATE public.payments SET a = 1 WHERE id = 1; "
        "UPDATE orders SET a = 1 WHERE id = 2; "
        "UPDATE orders SET a = 2 WHERE id = 3"
    )
    decision = decide(sql)
    assert decision.action is Action.REVIEW
    assert [(s.rule, s.name) for s in decision.steps] == [
        ("payments", "DBA"),
        ("payments", "Security"),
        ("writes", "DBA"),
    ]
    assert decision.expires_after == 4 * 3600  # the smallest
    assert decision.jit_max_duration is None  # the payments rule has no jit
    assert decision.hold.mode == "retry"  # retry wins over wait
    assert decision.hold.wait_timeout == 600
    assert decision.hold.approved_ttl == 1200


def test_jit_cap_is_the_smallest_when_every_rule_has_one() -> None:
    one = decide("CREATE TABLE t (a int)")
    assert one.jit_max_duration == 4 * 3600
    both = decide("CREATE TABLE t (a int)", account="app-admin")
    assert both.jit_max_duration == 3600
    assert both.expires_after == 8 * 3600


def test_allow_and_deny_carry_no_review_details() -> None:
    for sql in ("SELECT 1", "DROP TABLE t"):
        decision = decide(sql)
        assert decision.steps == ()
        assert decision.jit_max_duration is None


def test_empty_message_is_allowed() -> None:
    decision = decide("-- nothing", resource="staging", policy_set=policy_set_from_text(
        "defaults: {action: deny}\n"
    ))
    assert decision.action is Action.ALLOW
    assert decision.reason == "no statements"


def test_explanation_shows_every_applicable_policy() -> None:
    decision = decide("SELECT * FROM hr.salaries")
    text = "\n".join(decision.explanation)
    assert "policies that apply to user alice on resource prod-db as account app: prod, hr" in text
    assert "policy prod, rule #1 → allow: kind read is in [read, session]" in text
    assert "policy hr, rule #1 → deny: a table it names (hr.salaries) may be one of" in text
    session = decide("SHOW work_mem", identity=Identity("mallory"))
    assert "policy hr: no rule matches this read statement" in "\n".join(session.explanation)


def test_which_statements_a_review_is_about() -> None:
    both = decide("BEGIN; UPDATE public.orders SET x = 1 WHERE id = 1; SELECT 1; COMMIT")
    assert both.action is Action.REVIEW
    assert statements_under_review(both, 4) == frozenset({1})
    two = decide("UPDATE public.orders SET x = 1 WHERE id = 1; CREATE TABLE t (x int)")
    assert statements_under_review(two, 2) == frozenset({0, 1})
    # a statement no policy's rule decided (the defaults did) counts, the strict reading
    assert statements_under_review(decide("UPDATE t SET x = 1 WHERE id = 1", resource="dev"), 1) \
        == frozenset({0})


# -- may_write: sessions the server keeps read-only ------------------------------------

_READS = """
policies:
  - name: reads
    match: {resources: ["prod-*"]}
    rules:
      - when: {kinds: [read, session]}
        action: allow
      - when: {kinds: [write]}
        action: deny
  - name: dba
    match: {resources: ["prod-*"], users: ["group:dba"]}
    rules:
      - when: {kinds: [write], tables: ["events"]}
        action: review
        approval: {steps: [{name: DBA, approvers: ["group:dba"], required: 1}]}
"""


def test_may_write_only_when_some_rule_or_default_could_let_a_write_run() -> None:
    from policies.evaluate import may_write

    policies = policy_set_from_text(_READS)
    alice, bob = Identity("alice", ("developers",)), Identity("bob", ("dba",))
    assert not may_write(policies, alice, "prod-db", "app")
    assert may_write(policies, bob, "prod-db", "app")  # review on one table is enough
    everything = policy_set_from_text(_READS.replace("kinds: [read, session]}", 'tables: ["*"]}'))
    assert may_write(everything, alice, "prod-db", "app")  # a rule without kinds
    assert may_write(policy_set_from_text("defaults: {action: allow}\n"), alice, "x", "y")
    assert may_write(policy_set_from_text("defaults: {unknown: allow}\n"), alice, "x", "y")
    assert not may_write(policy_set_from_text("defaults: {action: deny}\n"), alice, "x", "y")


@pytest.mark.parametrize(("sql", "kind"), [
    ("BEGIN READ WRITE", Kind.WRITE),
    ("BEGIN READ ONLY", Kind.SESSION),
    ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE", Kind.WRITE),
    ("SET TRANSACTION READ WRITE", Kind.WRITE),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE", Kind.WRITE),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", Kind.SESSION),
    ("SET default_transaction_read_only = off", Kind.WRITE),
    ("SET default_transaction_read_only = 0", Kind.WRITE),
    ("SET default_transaction_read_only = 1", Kind.SESSION),
    ("SET default_transaction_read_only = on", Kind.SESSION),
    ("SET LOCAL transaction_read_only = no", Kind.WRITE),
    ("RESET default_transaction_read_only", Kind.SESSION),
    ("SELECT set_config('transaction_read_only', 'off', false)", Kind.WRITE),
])
def test_asking_for_read_write_is_a_write(sql: str, kind: Kind) -> None:
    from policies.classify import clear_caches

    assert classify(sql).kind is kind
    # never shared by shape: = 1 and = 0 differ only in a literal
    clear_caches()
    classify("SET default_transaction_read_only = 1", texts=False)
    assert classify("SET default_transaction_read_only = 0", texts=False).kind is Kind.WRITE
