"""The policy set as immutable data.

Owns: the typed shape of a loaded policy set (policies, their match blocks
and ordered rules, approval steps, JIT caps, hold overrides, defaults), with
the file:line each came from so decisions can point back at the YAML.

Must not: read files (``loader``) or decide anything (``evaluate``).

Schema (one or more YAML files, see ``loader``)::

    policies:
      - name: production-writes          # unique across all files
        description: ...                 # optional
        match:                           # resources and/or accounts (globs); all ANDed
          resources: ["prod-*"]
          accounts: ["*-admin", "app"]
          users: ["alice", "ops-*", "group:dba"]   # optional; names, globs, group:NAME
        rules:                           # in order; the first whose `when` matches decides
          - name: payments need two teams          # optional label for explain/test output
            when: {kinds: [write], tables: ["public.payments*"]}   # both optional
            action: review               # allow | review | deny
            message: ...                 # optional, shown to the client
            approval:                    # review only (required there)
              steps: [{name: DBA review, approvers: ["group:dba"], required: 1}]
              expires_after: 8h          # optional
            jit: {max_duration: 4h}      # review only: a JIT grant may cover this rule
            hold: {mode: wait, wait_timeout: 10m, approved_ttl: 1h}   # review only
    defaults:                            # at most once across all files
      action: allow                      # statements no rule decides (default: deny)
      unknown: deny                      # `unknown` statements no rule decides (default: deny)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from policies.kinds import Kind


class Action(StrEnum):
    ALLOW = "allow"
    REVIEW = "review"
    DENY = "deny"

    @property
    def strictness(self) -> int:
        return _ACTION_ORDER[self]


_ACTION_ORDER = {Action.ALLOW: 0, Action.REVIEW: 1, Action.DENY: 2}

HOLD_MODES = ("wait", "retry")


@dataclass(frozen=True)
class ApprovalStep:
    name: str
    approvers: tuple[str, ...]  # user names and "group:NAME"
    required: int
    source: str  # file:line


@dataclass(frozen=True)
class Approval:
    steps: tuple[ApprovalStep, ...]
    expires_after: float | None = None  # seconds; None: the configured default


@dataclass(frozen=True)
class Jit:
    max_duration: float  # seconds


@dataclass(frozen=True)
class HoldOverride:
    """Per-rule overrides of the config's ``hold:`` block; None keeps the config's value."""

    mode: str | None = None
    wait_timeout: float | None = None
    approved_ttl: float | None = None


@dataclass(frozen=True)
class Condition:
    """A rule's ``when``: None means "any"."""

    kinds: frozenset[Kind] | None = None
    tables: tuple[str, ...] | None = None  # lowercased globs


@dataclass(frozen=True)
class Rule:
    index: int  # 0-based position in the policy's rules
    when: Condition
    action: Action
    source: str  # file:line
    name: str | None = None
    message: str | None = None
    approval: Approval | None = None
    jit: Jit | None = None
    hold: HoldOverride | None = None

    @property
    def label(self) -> str:
        return self.name if self.name else f"#{self.index + 1}"


@dataclass(frozen=True)
class Match:
    resources: tuple[str, ...] | None = None
    accounts: tuple[str, ...] | None = None
    users: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Policy:
    name: str
    match: Match
    rules: tuple[Rule, ...]
    source: str  # file:line
    description: str | None = None


@dataclass(frozen=True)
class Defaults:
    action: Action = Action.DENY
    unknown: Action = Action.DENY
    source: str | None = None  # None: built in, no file set them


@dataclass(frozen=True, eq=False)
class PolicySet:
    policies: tuple[Policy, ...]
    defaults: Defaults
    files: tuple[str, ...] = ()
    # Which policies apply to (resource, account, user, groups): filled by
    # ``evaluate`` as it goes; the set itself never changes.
    applicable: dict[tuple[str, str, str, tuple[str, ...]], tuple[Policy, ...]] = field(
        default_factory=dict, repr=False
    )
