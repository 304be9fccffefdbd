"""Glob matching for policy match blocks and table conditions.

Owns: what it means for a resource, account, user or table to match a
policy's globs, including the conservative handling of table names the
classifier cannot pin down.

Must not: know about rules or actions beyond the single ``certain`` switch.

Globs use fnmatch syntax, case-sensitively (resource and account names as
configured; table names and table globs are both lowercase).

Tables. A glob with a dot (``public.pay*``) is matched against the
schema-qualified name; a glob without one (``pay*``) against the table name
in any schema. A statement may name a table without its schema (``pay``):
PostgreSQL resolves it through search_path, which the classifier does not
know, so it *may* be ``public.pay`` or ``hr.pay``. And ``*`` in a
statement's tables means "may touch tables not listed". Two questions
follow, and rules ask the one that makes them stricter:

- deny and review rules ask "may the statement touch a matching table?"
  (an unqualified name matches ``public.pay*`` if its name part could;
  ``*`` matches everything);
- allow rules ask "is every table the statement touches certainly
  matching?" (an unqualified name never certainly matches a dotted glob;
  ``*`` matches nothing; a statement that names no table does not match).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from fnmatch import fnmatchcase, translate
from functools import lru_cache

from policies.reading import ANY_TABLE

GROUP_PREFIX = "group:"


def any_glob(name: str, globs: Iterable[str]) -> bool:
    return any(fnmatchcase(name, glob) for glob in globs)


def user_matches(user: str, groups: Iterable[str], patterns: Iterable[str]) -> bool:
    """``patterns`` holds user globs and ``group:GLOB`` entries."""
    group_list = tuple(groups)
    for pattern in patterns:
        if pattern.startswith(GROUP_PREFIX):
            group_glob = pattern[len(GROUP_PREFIX) :]
            if any(fnmatchcase(group, group_glob) for group in group_list):
                return True
        elif fnmatchcase(user, pattern):
            return True
    return False


def _without_catalog(table: str) -> str:
    """``db.schema.table`` → ``schema.table`` (PostgreSQL only allows the current db)."""
    if table.count(".") < 2:
        return table
    return ".".join(table.split(".")[-2:])


Matcher = Callable[[str], object]


def _matcher(glob: str) -> Matcher:
    return re.compile(translate(glob)).match


@lru_cache(maxsize=4096)
def _plan(glob: str) -> tuple[Matcher, bool, tuple[Matcher, ...]]:
    """For one table glob: its matcher, whether it has a dot, and the
    matchers an unqualified name is tried against.

    Is there a schema S (without dots) such that "S.<table>" matches the
    glob? The dot after S is matched by a '.', '?', '*' or [class] of the
    glob that comes before any literal dot; the rest of the glob (from the
    '*' on) must then match the table name.
    """
    suffixes: list[str] = []
    for position, char in enumerate(glob):
        if "." in glob[:position]:
            break
        if char in ".?":
            suffixes.append(glob[position + 1 :])
        elif char == "*":
            suffixes.append(glob[position:])
        elif char == "[":
            close = glob.find("]", position + 1)
            if close > 0:
                suffixes.append(glob[close + 1 :])
    return _matcher(glob), "." in glob, tuple(_matcher(s) for s in dict.fromkeys(suffixes))


def _certain(table: str, glob: str) -> bool:
    if table == ANY_TABLE:
        return False
    table = _without_catalog(table)
    full, dotted, _ = _plan(glob)
    if not dotted:
        return bool(full(table.rsplit(".", 1)[-1]))
    return "." in table and bool(full(table))


def _possible(table: str, glob: str) -> bool:
    if table == ANY_TABLE or _certain(table, glob):
        return True
    table = _without_catalog(table)
    _, dotted, suffixes = _plan(glob)
    if "." in table or not dotted:
        return False
    return any(match(table) for match in suffixes)


def tables_match(tables: Iterable[str], globs: Iterable[str], *, certain: bool) -> bool:
    """Whether a statement's tables satisfy a rule's table globs (see module doc)."""
    table_list = tuple(tables)
    glob_list = tuple(globs)
    if certain:
        return bool(table_list) and all(
            any(_certain(t, g) for g in glob_list) for t in table_list
        )
    return any(_possible(t, g) for t in table_list for g in glob_list)
