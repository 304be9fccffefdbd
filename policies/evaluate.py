"""Decide allow / review / deny for a classified message. Pure.

Owns: :func:`evaluate`, the single place where a policy set turns a
classification, an identity, a resource and an account into a
:class:`Decision`, and the explanation of how it got there. The proxy,
``pgvouch policy explain`` and ``pgvouch policy test`` all call it.

Must not: classify, load files, or fall back to anything when the policy set
failed to load: a caller without a valid policy set must refuse the
statement itself (fail closed) rather than call this.

How a decision is made
    Each statement of the message is decided on its own. A policy applies
    when its match block matches (resources, accounts and users are ANDed,
    each a list of globs; users may name ``group:NAME``). Within an
    applicable policy the first rule whose ``when`` matches the statement's
    kind and tables decides for that policy (see ``globs`` for tables). The
    statement's action is the strictest over all policies that decided
    (deny > review > allow). When none decided, ``defaults.unknown`` applies
    to an ``unknown`` statement and ``defaults.action`` to any other: an
    unknown statement is never allowed unless a rule or the defaults say so
    explicitly for ``unknown``. The message's action is the strictest over
    its statements (a message without statements is allowed: nothing runs).

    For review, the request must satisfy the steps of every review rule that
    decided (deduplicated per policy and rule). A JIT grant can stand in only
    if every such rule has ``jit`` (the cap is the smallest
    ``max_duration``); expiry and hold overrides take the smallest value any
    of them sets, and hold mode ``retry`` wins over ``wait``.

Cost
    The proxy evaluates every message, so the decision itself builds no
    text beyond one reason line; ``Verdict.why`` and
    ``Decision.explanation`` are computed when first read, by the same
    matching functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

from policies.classify import Classification, StatementInfo
from policies.globs import any_glob, tables_match, user_matches
from policies.kinds import ALL_KINDS, Kind
from policies.model import Action, HoldOverride, Policy, PolicySet, Rule

_APPLICABLE_MEMO_LIMIT = 4096


@dataclass(frozen=True)
class Identity:
    user: str
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class Verdict:
    """What one policy's rule said about one statement."""

    statement: int  # 0-based index into the classification's statements
    policy: str
    rule: str  # the rule's label: its name or "#N"
    rule_index: int
    action: Action
    source: str  # file:line of the rule
    message: str | None
    matched: Rule = field(repr=False, compare=False)
    subject: StatementInfo = field(repr=False, compare=False)

    @property
    def why(self) -> str:
        return why_rule_matches(self.matched, self.subject)


@dataclass(frozen=True)
class ReviewStep:
    policy: str
    rule: str
    name: str
    approvers: tuple[str, ...]
    required: int


@dataclass(frozen=True)
class Decision:
    action: Action
    policy: str | None  # the deciding policy; None when the defaults decided
    rule: str | None
    rule_index: int | None
    message: str | None
    reason: str  # one line: why this action
    verdicts: tuple[Verdict, ...]
    steps: tuple[ReviewStep, ...] = ()
    expires_after: float | None = None  # None: the configured default
    hold: HoldOverride = field(default_factory=HoldOverride)
    jit_max_duration: float | None = None  # None: no JIT grant can cover this
    # What the decision was made from, for `explanation`.
    inputs: tuple[Classification, Identity, str, str, PolicySet] | None = field(
        default=None, repr=False, compare=False
    )

    @cached_property
    def explanation(self) -> tuple[str, ...]:
        """Every statement, every applicable policy, and what each said."""
        return explain(*self.inputs) if self.inputs is not None else ()


# -- matching ------------------------------------------------------------------------------


def applies(policy: Policy, identity: Identity, resource: str, account: str) -> bool:
    match = policy.match
    if match.resources is not None and not any_glob(resource, match.resources):
        return False
    if match.accounts is not None and not any_glob(account, match.accounts):
        return False
    return match.users is None or user_matches(identity.user, identity.groups, match.users)


def applicable(
    policy_set: PolicySet, identity: Identity, resource: str, account: str
) -> tuple[Policy, ...]:
    key = (resource, account, identity.user, identity.groups)
    found = policy_set.applicable.get(key)
    if found is None:
        found = tuple(p for p in policy_set.policies if applies(p, identity, resource, account))
        if len(policy_set.applicable) >= _APPLICABLE_MEMO_LIMIT:
            policy_set.applicable.clear()
        policy_set.applicable[key] = found
    return found


def rule_matches(rule: Rule, statement: StatementInfo) -> bool:
    when = rule.when
    if when.kinds is not None and statement.kind not in when.kinds:
        return False
    if when.tables is not None:
        certain = rule.action is Action.ALLOW
        return tables_match(statement.tables, when.tables, certain=certain)
    return True


def why_rule_matches(rule: Rule, statement: StatementInfo) -> str:
    """Why ``rule`` matches ``statement`` (call only when it does)."""
    when = rule.when
    reasons: list[str] = []
    if when.kinds is not None:
        kinds = ", ".join(sorted(when.kinds, key=ALL_KINDS.index))
        reasons.append(f"kind {statement.kind} is in [{kinds}]")
    if when.tables is not None:
        tables = ", ".join(statement.tables) or "none"
        globs = ", ".join(when.tables)
        if rule.action is Action.ALLOW:
            reasons.append(f"every table it names ({tables}) is one of [{globs}]")
        else:
            reasons.append(f"a table it names ({tables}) may be one of [{globs}]")
    return " and ".join(reasons) if reasons else "the rule has no condition"


def _first_rule(policy: Policy, statement: StatementInfo) -> Rule | None:
    for rule in policy.rules:
        if rule_matches(rule, statement):
            return rule
    return None


# -- deciding -------------------------------------------------------------------------------


def evaluate(
    classification: Classification,
    identity: Identity,
    resource: str,
    account: str,
    policy_set: PolicySet,
) -> Decision:
    """The decision for one message; see the module docstring for the rules."""
    inputs = (classification, identity, resource, account, policy_set)
    if not classification.statements:
        return Decision(Action.ALLOW, None, None, None, None, "no statements", (), inputs=inputs)
    policies = applicable(policy_set, identity, resource, account)
    defaults = policy_set.defaults
    verdicts: list[Verdict] = []
    best_action: Action | None = None
    best_verdict: Verdict | None = None
    best_index = 0
    best_default = ""
    for index, statement in enumerate(classification.statements):
        top: Verdict | None = None
        for policy in policies:
            rule = _first_rule(policy, statement)
            if rule is None:
                continue
            verdict = Verdict(
                index, policy.name, rule.label, rule.index, rule.action, rule.source,
                rule.message, rule, statement,
            )
            verdicts.append(verdict)
            if top is None or verdict.action.strictness > top.action.strictness:
                top = verdict
        if top is not None:
            action, default_key = top.action, ""
        elif statement.kind is Kind.UNKNOWN:
            action, default_key = defaults.unknown, "defaults.unknown"
        else:
            action, default_key = defaults.action, "defaults.action"
        if best_action is None or action.strictness > best_action.strictness:
            best_action, best_verdict, best_index, best_default = action, top, index, default_key

    assert best_action is not None  # there is at least one statement
    where = f"statement {best_index + 1}: " if len(classification.statements) > 1 else ""
    kind = classification.statements[best_index].kind
    if best_verdict is not None:
        by = f"policy {best_verdict.policy}, rule {best_verdict.rule}"
        if best_verdict.message:
            by += f": {best_verdict.message}"
    else:
        by = f"{best_default} = {best_action}"
    decision = Decision(
        action=best_action,
        policy=best_verdict.policy if best_verdict else None,
        rule=best_verdict.rule if best_verdict else None,
        rule_index=best_verdict.rule_index if best_verdict else None,
        message=best_verdict.message if best_verdict else None,
        reason=f"{where}{kind} statement → {best_action} by {by}",
        verdicts=tuple(verdicts),
        inputs=inputs,
    )
    if best_action is Action.REVIEW:
        return _with_review(decision, verdicts)
    return decision


_ONLY_READING = frozenset({Kind.READ, Kind.SESSION})


def may_write(policy_set: PolicySet, identity: Identity, resource: str, account: str) -> bool:
    """Whether anything but reads and session control could ever run for this identity here.

    Structural and deliberately generous: true when the defaults, or any rule of
    an applicable policy, allow or review some other kind (for any table). When
    false, no write can be allowed or approved, so the proxy may have the server
    refuse writes too (``default_transaction_read_only``): a write the
    classifier cannot see (a function reached through an operator, a cast, a
    cursor) then fails in PostgreSQL instead of running.
    """
    defaults = policy_set.defaults
    if defaults.action is not Action.DENY or defaults.unknown is not Action.DENY:
        return True
    for policy in applicable(policy_set, identity, resource, account):
        for rule in policy.rules:
            if rule.action is Action.DENY:
                continue
            kinds = rule.when.kinds
            if kinds is None or not kinds <= _ONLY_READING:
                return True
    return False


def statements_under_review(decision: Decision, count: int) -> frozenset[int]:
    """Indexes of the ``count`` statements a review ``decision`` is about.

    A statement is under review when a policy's rule said review for it
    (nothing said deny: the decision would be deny). One that no policy
    decided counts too (the defaults decided it, which this does not
    re-derive: the strict reading). The others were allowed on their own.
    """
    decided = {v.statement for v in decision.verdicts}
    reviewed = {v.statement for v in decision.verdicts if v.action is Action.REVIEW}
    return frozenset(reviewed | (set(range(count)) - decided))


def _smallest(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _with_review(decision: Decision, verdicts: list[Verdict]) -> Decision:
    seen: set[tuple[str, int]] = set()
    rules: list[tuple[str, Rule]] = []
    for verdict in verdicts:
        key = (verdict.policy, verdict.rule_index)
        if verdict.action is Action.REVIEW and key not in seen:
            seen.add(key)
            rules.append((verdict.policy, verdict.matched))
    steps = tuple(
        ReviewStep(policy, rule.label, step.name, step.approvers, step.required)
        for policy, rule in rules
        if rule.approval is not None
        for step in rule.approval.steps
    )
    holds = [rule.hold for _, rule in rules if rule.hold is not None]
    modes = {hold.mode for hold in holds if hold.mode}
    hold = HoldOverride(
        mode="retry" if "retry" in modes else ("wait" if modes else None),
        wait_timeout=_smallest(h.wait_timeout for h in holds),
        approved_ttl=_smallest(h.approved_ttl for h in holds),
    )
    jits = [rule.jit for _, rule in rules]
    jit_cap = None if any(j is None for j in jits) else _smallest(j.max_duration for j in jits if j)
    return Decision(
        action=decision.action,
        policy=decision.policy,
        rule=decision.rule,
        rule_index=decision.rule_index,
        message=decision.message,
        reason=decision.reason,
        verdicts=decision.verdicts,
        steps=steps,
        expires_after=_smallest(r.approval.expires_after for _, r in rules if r.approval),
        hold=hold,
        jit_max_duration=jit_cap,
        inputs=decision.inputs,
    )


# -- explaining --------------------------------------------------------------------------------


def explain(
    classification: Classification,
    identity: Identity,
    resource: str,
    account: str,
    policy_set: PolicySet,
) -> tuple[str, ...]:
    """Lines saying, for every statement, what every applicable policy decided and why."""
    policies = applicable(policy_set, identity, resource, account)
    who = f"user {identity.user} on resource {resource} as account {account}"
    if policies:
        lines = [f"policies that apply to {who}: {', '.join(p.name for p in policies)}"]
    else:
        lines = [f"no policy applies to {who}"]
    if not classification.statements:
        lines.append("the message holds no statement; nothing runs")
    defaults = policy_set.defaults
    where = f" ({defaults.source})" if defaults.source else " (built in)"
    for index, statement in enumerate(classification.statements):
        tables = ", ".join(statement.tables) or "no tables"
        lines.append(f"statement {index + 1} ({statement.kind}; {tables}): {statement.reason}")
        decided = False
        for policy in policies:
            rule = _first_rule(policy, statement)
            if rule is None:
                lines.append(f"  policy {policy.name}: no rule matches this {statement.kind} statement")
                continue
            decided = True
            why = why_rule_matches(rule, statement)
            lines.append(f"  policy {policy.name}, rule {rule.label} → {rule.action}: {why}")
        if not decided:
            unknown = statement.kind is Kind.UNKNOWN
            key = "defaults.unknown" if unknown else "defaults.action"
            action = defaults.unknown if unknown else defaults.action
            lines.append(f"  no rule decides it → {key} = {action}{where}")
    return tuple(lines)
