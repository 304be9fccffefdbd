"""Token-level helpers built on PostgreSQL's own lexer (libpg_query via pglast).

Owns: turning one statement's text into the *neutral text* sqlglot reads
(comments removed, every literal replaced by a fixed placeholder literal) and
finding where the statement wrapped by EXPLAIN, PREPARE or DECLARE starts.

Why neutral text: PostgreSQL's lexer decides where strings, dollar quotes,
E'' escapes and nested comments begin and end. Giving sqlglot a text in which
those are already gone means sqlglot can no longer be fooled by lexing tricks,
and its reading depends only on what ``pglast.parser.normalize`` keeps (the
cache key), never on literal values.

Must not: decide kinds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pglast import parser as pg_parser

_PLACEHOLDERS = {
    "SCONST": "'0'",
    "USCONST": "'0'",
    "ICONST": "0",
    "FCONST": "0.0",
    "BCONST": "B'0'",
    "XCONST": "X'0'",
}
_COMMENTS = frozenset({"C_COMMENT", "SQL_COMMENT"})
_OPEN = "ASCII_40"
_CLOSE = "ASCII_41"
_EXPLAIN_FLAGS = frozenset({"ANALYZE", "ANALYSE", "VERBOSE"})


class Token(Protocol):
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...  # inclusive
    @property
    def name(self) -> str: ...


def tokens(text: str) -> list[Token]:
    """PostgreSQL's tokens of ``text`` (comments included)."""
    return list(pg_parser.scan(text))


def neutral_text(text: str, toks: Sequence[Token], first: int = 0) -> str:
    """``text`` from token ``first`` on, without comments and with placeholder literals.

    Also the element type of an array cast (``$1::oid[]``, ``CAST(x AS
    regtype[])``) becomes ``text``: sqlglot cannot parse arrays of some
    built-in types, and a type name is never a table or a function.
    """
    replaced = _array_cast_types(toks, first)
    parts: list[str] = []
    pos = toks[first].start if first < len(toks) else len(text)
    for index in range(first, len(toks)):
        tok = toks[index]
        parts.append(text[pos : tok.start])
        if tok.name in _COMMENTS:
            parts.append(" ")
        elif index in replaced:
            parts.append(replaced[index])
        else:
            parts.append(_PLACEHOLDERS.get(tok.name) or text[tok.start : tok.end + 1])
        pos = tok.end + 1
    return "".join(parts)


def _array_cast_types(toks: Sequence[Token], first: int) -> dict[int, str]:
    """Token index → replacement for the type names of array casts."""
    significant = [i for i in _significant(toks) if i >= first]
    replaced: dict[int, str] = {}
    for position, index in enumerate(significant):
        if toks[index].name not in ("TYPECAST", "AS"):
            continue
        run: list[int] = []
        cursor = position + 1
        while cursor < len(significant) and toks[significant[cursor]].name == "IDENT":
            run.append(significant[cursor])
            if cursor + 1 < len(significant) and toks[significant[cursor + 1]].name == "ASCII_46":
                run.append(significant[cursor + 1])
                cursor += 2
            else:
                cursor += 1
        if run and cursor < len(significant) and toks[significant[cursor]].name == "ASCII_91":
            replaced.update(dict.fromkeys(run, ""))
            replaced[run[0]] = "text"
    return replaced


def _significant(toks: Sequence[Token]) -> list[int]:
    return [i for i, tok in enumerate(toks) if tok.name not in _COMMENTS]


def _after_keyword_at_depth0(toks: Sequence[Token], keyword: str, start: int) -> int | None:
    depth = 0
    for i in _significant(toks)[start:]:
        name = toks[i].name
        if name == _OPEN:
            depth += 1
        elif name == _CLOSE:
            depth -= 1
        elif depth == 0 and name == keyword:
            return i + 1
    return None


def wrapped_start(toks: Sequence[Token], wrapper: str) -> int | None:
    """Index of the first token of the statement inside EXPLAIN, PREPARE or DECLARE."""
    significant = _significant(toks)
    if wrapper == "EXPLAIN":
        if len(significant) < 2:
            return None
        pos = 1
        if toks[significant[pos]].name == _OPEN:
            depth = 0
            while pos < len(significant):
                name = toks[significant[pos]].name
                depth += name == _OPEN
                depth -= name == _CLOSE
                pos += 1
                if depth == 0:
                    break
        else:
            while pos < len(significant) and toks[significant[pos]].name in _EXPLAIN_FLAGS:
                pos += 1
        return significant[pos] if pos < len(significant) else None
    if wrapper == "PREPARE":
        found = _after_keyword_at_depth0(toks, "AS", 1)
    elif wrapper == "DECLARE":
        found = _after_keyword_at_depth0(toks, "FOR", 1)
    else:
        raise ValueError(f"not a wrapping statement: {wrapper}")
    if found is None:
        return None
    while found < len(toks) and toks[found].name in _COMMENTS:
        found += 1
    return found if found < len(toks) else None
