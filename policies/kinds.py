"""Statement kinds and how strict each one is.

Owns: the closed set of kinds a statement can have and their strictness
order, the one thing every other part of pgvouch compares kinds by.

Must not: know how a statement gets its kind (that is ``classify``) or what a
policy does with it (that is ``evaluate``).

The order, from least to most strict, follows the damage a statement can do::

    read < session < write < ddl < destructive < privilege < admin < unknown

``session`` sits above ``read`` because it changes how later statements
behave (search_path, settings); ``privilege`` sits above ``destructive``
because a privilege change enables every other kind later, for anyone;
``admin`` acts beyond one database (server files, programs, other sessions,
the server configuration); ``unknown`` is the strictest because the
classifier cannot vouch for what the statement does.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class Kind(StrEnum):
    READ = "read"
    SESSION = "session"
    WRITE = "write"
    DDL = "ddl"
    DESTRUCTIVE = "destructive"
    PRIVILEGE = "privilege"
    ADMIN = "admin"
    UNKNOWN = "unknown"

    @property
    def strictness(self) -> int:
        return _ORDER[self]


_ORDER: dict[Kind, int] = {kind: rank for rank, kind in enumerate(Kind)}

ALL_KINDS: tuple[Kind, ...] = tuple(Kind)


def strictest(kinds: Iterable[Kind]) -> Kind:
    """The strictest of ``kinds``; ``read`` for none (nothing runs)."""
    result = Kind.READ
    for kind in kinds:
        if _ORDER[kind] > _ORDER[result]:
            result = kind
    return result
