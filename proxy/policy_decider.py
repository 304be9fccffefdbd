"""Policies in the proxy: the decider behind ``decide()``, and policy reloads.

Owns: turning a session's unit into a classification (tracking SQL-level
PREPARE per session so EXECUTE takes the prepared statement's kind), asking
``policies.evaluate`` for the decision, and mapping it to what the session
does: allow, deny (SQLSTATE 42501 naming the policy), or review (held for
approval when an approvals service is configured, else refused with PV001).
It also owns the live policy set: loading it, reloading it on SIGHUP or when
a file changes, and keeping the old set when a new one does not load.
SQL the proxy answers itself (``pgvouch.request_access``, see
``proxy.grant_command``) is handed to ``commands`` before anything else.

Must not: classify or evaluate itself (``policies`` does), or touch sockets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Final, Protocol, cast

from config.yamlnodes import ConfigError
from policies.classify import (
    Classification,
    StatementInfo,
    classify,
    combined,
    integer_form,
    learnt_form,
    unknown,
)
from policies.evaluate import Decision as PolicyDecision
from policies.evaluate import Identity, evaluate, may_write
from policies.kinds import Kind
from policies.loader import load_policies, policy_files
from policies.model import Action, PolicySet
from policies.prepared import after_statement
from proxy import sqlstate
from proxy.decide import ALLOW, Decision, Hold, SessionInfo, Unit, deny
from proxy.statement_audit import AuditedAllow, StatementAuditor, statement_event

log = logging.getLogger("pgvouch.policy")

_DECISION_CACHE: Final = 4096
# Not audited unless audit.reads is on: reads, and transaction/session control.
_UNAUDITED: Final = frozenset({Kind.READ, Kind.SESSION})
# Statements that may create functions or change their volatility (see proxy.function_catalog).
_MAY_CHANGE_FUNCTIONS: Final = frozenset({Kind.DDL, Kind.UNKNOWN})


class LivePolicies:
    """The policy set in force; replaced only by a set that loaded cleanly."""

    def __init__(self, path: str, users: Mapping[str, tuple[str, ...]],
                 on_reload: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.users = dict(users)
        self._on_reload = on_reload
        self.current: PolicySet = load_policies(path, users=self.users)  # raises: fail closed
        self._signature = self._files_signature()
        self.last_error: str | None = None

    def _files_signature(self) -> tuple[tuple[str, float, int], ...]:
        result = []
        for file in policy_files(self.path):
            try:
                stat = file.stat()
            except OSError:
                continue
            result.append((str(file), stat.st_mtime, stat.st_size))
        return tuple(result)

    def reload(self) -> bool:
        """Load the directory again; on any error keep the current set."""
        self._signature = self._files_signature()
        try:
            fresh = load_policies(self.path, users=self.users)
        except ConfigError as exc:
            self.last_error = str(exc)
            log.error("policy reload refused, the previous policies stay in force: %s", exc)
            if self._on_reload:
                self._on_reload("error")
            return False
        self.current = fresh
        self.last_error = None
        log.info("policies reloaded from %s (%d policies)", self.path, len(fresh.policies))
        if self._on_reload:
            self._on_reload("ok")
        return True

    def changed_on_disk(self) -> bool:
        return self._files_signature() != self._signature

    async def watch(self, interval: float = 2.0) -> None:
        """Reload when a policy file is added, removed or modified."""
        while True:
            await asyncio.sleep(interval)
            if self.changed_on_disk():
                self.reload()


class Reviewer(Protocol):
    """The approvals side: turns a review decision into a hold (or a refusal)."""

    def review(self, session: SessionInfo, unit: Unit, classification: Classification,
               decision: PolicyDecision) -> Decision: ...


class Commands(Protocol):
    """SQL the proxy answers itself (``proxy.grant_command``): a decision, or None for ordinary SQL."""

    def intercept(self, session: SessionInfo, unit: Unit) -> Decision | None: ...


# (volatile functions, known functions, relations that run volatile functions)
FunctionFacts = tuple[frozenset[str], frozenset[str], frozenset[str]]
_NO_FACTS: FunctionFacts = (frozenset(), frozenset(), frozenset())  # every function call may write
_CHANGED: Final = "functions_changed"  # session.state: this session let through DDL, DO or CALL
# session.state: a _Shortcut (see PolicyDecider.decide)
_LAST: Final = "last_allowed"
_SHORTCUT_FORMS: Final = 32  # integer forms a session's shortcut keeps, each of at most:
_SHORTCUT_FORM_BYTES: Final = 2048


class _Shortcut:
    """One-statement units the policies allowed without an audit event in a session,
    under one policy set and one object of function facts: the last text object, and
    the learnt integer forms of such texts (see ``policies.classify``)."""

    __slots__ = ("facts", "forms", "policy_set", "text")

    def __init__(self, policy_set: PolicySet, facts: object) -> None:
        self.policy_set = policy_set
        self.facts = facts
        self.text: str | None = None
        self.forms: set[bytes] = set()


class FunctionView(Protocol):
    """A resource's functions for the classifier (``proxy.function_catalog.FunctionCatalog``)."""

    def view(self, resource: str) -> FunctionFacts | None: ...
    def strict(self, resource: str) -> FunctionFacts: ...
    def note_change(self, resource: str) -> None: ...


class _NotingHold:
    """A hold that reports when its statement has run (it may have changed functions)."""

    def __init__(self, inner: Hold, ran: Callable[[], None]) -> None:
        self.inner = inner
        self.ran = ran
        self.heartbeat_interval = inner.heartbeat_interval

    def start(self) -> Awaitable[Decision | str]:
        return self.inner.start()

    def outcome(self) -> Awaitable[Decision]:
        return self.inner.outcome()

    def heartbeat(self) -> str | None:
        return self.inner.heartbeat()

    def cancel(self, reason: str) -> None:
        self.inner.cancel(reason)

    def finished(self, ok: bool, error: str | None) -> None:
        self.inner.finished(ok, error)
        self.ran()


def describe_steps(decision: PolicyDecision) -> str:
    return "; ".join(
        f"{step.name}: {step.required} of {', '.join(step.approvers)}" for step in decision.steps
    )


class PolicyDecider:
    def __init__(self, policies: LivePolicies, reviewer: Reviewer | None = None,
                 auditor: StatementAuditor | None = None, commands: Commands | None = None,
                 functions: FunctionView | None = None) -> None:
        self.policies = policies
        self.reviewer = reviewer
        self.auditor = auditor
        self.commands = commands  # pgvouch's own commands (pgvouch.request_access): looked at first
        self.functions = functions  # each resource's functions, when volatility is looked up
        self._decisions: dict[tuple[object, ...], tuple[PolicySet, PolicyDecision]] = {}
        self._allowed: dict[int, tuple[Classification, PolicySet, tuple[object, ...]]] = {}

    def read_only(self, user: str, groups: tuple[str, ...], resource: str, account: str) -> bool:
        """Whether the server should refuse writes in this session too: the policies in
        force could never allow or approve one (``policies.evaluate.may_write``)."""
        return not may_write(self.policies.current, Identity(user, groups), resource, account)

    def classify_unit(self, session: SessionInfo, unit: Unit) -> Classification:
        prepared: dict[str, StatementInfo] = session.state.setdefault("prepared", {})  # type: ignore[assignment]
        volatile: frozenset[str] | None = None
        known: frozenset[str] | None = None
        relations: frozenset[str] | None = None
        functions = self.functions
        if functions is not None:
            # a session that changed functions itself cannot be vouched for by any read
            # of the catalog; a resource never read (no session should exist) neither
            seen = (functions.strict(session.resource) if _CHANGED in session.state
                    else functions.view(session.resource))
            volatile, known, relations = seen if seen is not None else _NO_FACTS
        parts: list[Classification] = []
        for statement in unit.statements:
            if statement.sql is None:
                what = ("a FunctionCall" if statement.via == "function-call"
                        else "an Execute of a portal the proxy cannot tell")
                parts.append(unknown(f"{what} cannot be classified"))
                continue
            classification = classify(statement.sql, prepared=prepared, volatile_functions=volatile,
                                      known_functions=known, volatile_relations=relations,
                                      texts=False)
            for info in classification.statements:
                if info.effect is not None:
                    prepared = after_statement(prepared, info, confirmed=False)
            parts.append(classification)
        session.state["prepared"] = prepared
        return parts[0] if len(parts) == 1 else combined(parts)

    def _evaluate(self, session: SessionInfo, classification: Classification) -> PolicyDecision:
        """``evaluate``, memoised: it depends only on each statement's kind and tables."""
        policy_set = self.policies.current
        key = (id(policy_set), session.user, session.groups, session.resource, session.account,
               tuple([(s.kind, s.tables) for s in classification.statements]))
        cached = self._decisions.get(key)
        if cached is not None and cached[0] is policy_set:
            return cached[1]
        decision = evaluate(classification, Identity(session.user, session.groups),
                            session.resource, session.account, policy_set)
        if len(self._decisions) >= _DECISION_CACHE:
            self._decisions.clear()
        self._decisions[key] = (policy_set, decision)
        return decision

    def _facts(self, session: SessionInfo) -> object:
        """What the function facts of this session are now, as an object to compare by
        identity (a new view object whenever the catalog was read or a change noted)."""
        functions = self.functions
        if functions is None:
            return None
        if _CHANGED in session.state:
            return session  # (such a session keeps no shortcut, see _remember)
        return functions.view(session.resource)

    def decide(self, session: SessionInfo, unit: Unit) -> Decision:
        # The session's shortcut: under the same policy set and function facts, the
        # very text object the policies allowed last time (a prepared statement
        # executed again, an unnamed Parse the client repeats) classifies the same
        # way; so does a text of a learnt integer form it allowed before (the same
        # statement with other integer values, see policies.classify).
        statements = unit.statements
        if len(statements) == 1:
            short = cast("_Shortcut | None", session.state.get(_LAST))
            if short is not None and short.policy_set is self.policies.current \
                    and short.facts is self._facts(session):
                sql = statements[0].sql
                if sql is not None and (sql is short.text
                                        or (short.forms and integer_form(sql) in short.forms)):
                    return ALLOW
        classification = self.classify_unit(session, unit)
        result = self._decide(session, unit, classification)
        functions = self.functions
        if functions is None or result.action == "deny":
            return result
        # (a read or session statement is the strictest kind of its unit: nothing to look at)
        changes = classification.kind not in _UNAUDITED and any(
            s.kind in _MAY_CHANGE_FUNCTIONS for s in classification.statements)
        if changes:
            session.state[_CHANGED] = True
        elif _CHANGED not in session.state:
            return result
        # What this session changed becomes visible to the catalog's connection when
        # its transaction commits: every statement it sends keeps the window open.
        resource = session.resource
        functions.note_change(resource)
        if result.hold is not None:
            hold = _NotingHold(result.hold, lambda: functions.note_change(resource))
            result = dataclasses.replace(result, hold=hold)
        return result

    def _remember(self, session: SessionInfo, unit: Unit, classification: Classification,
                  policy_set: PolicySet) -> None:
        """Keep the session's shortcut (see decide) for a unit the policies allowed unaudited."""
        if _CHANGED in session.state:
            # no function call is vouched for in such a session, and each of its
            # statements must note a change (see decide): never a shortcut
            return
        sql = unit.statements[0].sql if len(unit.statements) == 1 else None
        if sql is None or any(s.effect is not None or s.executes is not None
                              for s in classification.statements):
            return  # session state (PREPARE, EXECUTE, DEALLOCATE) takes part: no shortcut
        facts = self._facts(session)
        short = cast("_Shortcut | None", session.state.get(_LAST))
        if short is None or short.policy_set is not policy_set or short.facts is not facts:
            short = _Shortcut(policy_set, facts)
            session.state[_LAST] = short
        short.text = sql
        if len(short.forms) < _SHORTCUT_FORMS and len(sql) <= _SHORTCUT_FORM_BYTES:
            form = learnt_form(sql)
            if form is not None:
                short.forms.add(form)

    def _decide(self, session: SessionInfo, unit: Unit, classification: Classification) -> Decision:
        auditor = self.auditor
        policy_set = self.policies.current
        identity = (session.user, session.groups, session.resource, session.account)
        # The hot path: a statement shape this identity was already allowed
        # (unaudited) under this very policy set. Classifications come from the
        # classifier's caches, so the same object stands for the same shape;
        # the memo keeps the object alive, so its id cannot be reused.
        memo = self._allowed.get(id(classification))
        if memo is not None and memo[0] is classification and memo[1] is policy_set \
                and memo[2] == identity:
            self._remember(session, unit, classification, policy_set)
            return ALLOW
        # pgvouch's own commands come next: a shape in the memo above was looked
        # at here when first seen (identifiers are part of the shape), and the
        # memo only ever holds shapes this hook let through.
        if self.commands is not None:
            command = self.commands.intercept(session, unit)
            if command is not None:
                return command
        decision = self._evaluate(session, classification)
        if decision.action is Action.ALLOW:
            unaudited = all(s.kind in _UNAUDITED for s in classification.statements)
            if auditor is None or (unaudited and not auditor.reads):
                if len(self._allowed) >= _DECISION_CACHE:
                    self._allowed.clear()
                self._allowed[id(classification)] = (classification, policy_set, identity)
                self._remember(session, unit, classification, policy_set)
                return ALLOW
            if unaudited:
                auditor.enqueue(statement_event("statement.allowed", session, unit,
                                                classification, decision.policy, decision.reason))
                return ALLOW
            event = statement_event("statement.allowed", session, unit, classification,
                                    decision.policy, decision.reason)
            return Decision("hold", policy=decision.policy, hold=AuditedAllow(auditor, event))
        kinds = ", ".join(sorted({s.kind.value for s in classification.statements})) or "none"
        if decision.action is Action.DENY:
            who = f'policy "{decision.policy}"' if decision.policy else "the default policy"
            text = decision.message or "this statement is not allowed"
            if auditor is not None:
                auditor.enqueue(statement_event("statement.denied", session, unit, classification,
                                                decision.policy, decision.reason))
            return deny(
                f"pgvouch: denied by {who}: {text}",
                code=sqlstate.POLICY_DENIED,
                detail=f"Statement kind: {kinds} ({classification.reason}). {decision.reason}",
                policy=decision.policy,
            )
        if self.reviewer is not None:
            return self.reviewer.review(session, unit, classification, decision)
        return deny(
            f'pgvouch: approval required by policy "{decision.policy}": '
            f"{decision.message or 'this statement needs review'}",
            code=sqlstate.APPROVAL_REQUIRED,
            detail=f"Statement kind: {kinds} ({classification.reason}). "
                   f"Steps: {describe_steps(decision)}.",
            hint="This proxy has no approvals store configured, so the statement cannot be held.",
            policy=decision.policy,
        )


def load_live_policies(path: str, users: Mapping[str, tuple[str, ...]],
                       on_reload: Callable[[str], None] | None = None) -> LivePolicies:
    if not Path(path).is_dir():
        raise ConfigError(f"{path}: the policies directory does not exist")
    return LivePolicies(path, users, on_reload)
