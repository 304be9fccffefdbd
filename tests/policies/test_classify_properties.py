"""Property tests: comments and whitespace never change what a statement is."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pglast import parser as pg_parser

from policies.classify import classify, clear_caches
from tests.policies.corpus import CASES, EVASIONS


def _parses(sql: str) -> bool:
    try:
        pg_parser.parse_sql(sql)
    except Exception:
        return False
    return True


# Statements PostgreSQL accepts (a suffix could complete an unterminated one).
STATEMENTS = sorted(
    {
        sql
        for table in (CASES, EVASIONS)
        for rows in table.values()
        for sql, _ in rows
        if _parses(sql)
    }
)

# Comment bodies full of things that look like SQL or like the end of a token.
# No '*' or '/': they could end a block comment early, which is not a comment any more.
_noise = st.lists(
    st.sampled_from([*"abc ;'\"$()-=_\\", "DROP TABLE t", "DELETE", "E'", "$$", "--"]),
    max_size=12,
).map("".join)
_block_body = _noise
_line_body = _noise

_whitespace = st.sampled_from([" ", "\t", "\n", "\r\n", "\f", "  \n\t "])
_block_comment = _block_body.map(lambda s: f"/*{s}*/")
_nested_comment = st.tuples(_block_body, _block_body, _block_body).map(
    lambda p: f"/*{p[0]}/*{p[1]}*/{p[2]}*/"
)
_line_comment = _line_body.map(lambda s: f"--{s}\n")
_separator = st.lists(
    st.one_of(_whitespace, _block_comment, _nested_comment, _line_comment), min_size=1, max_size=3
).map(lambda parts: " ".join(parts))

PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


@PROPERTY_SETTINGS
@given(sql=st.sampled_from(STATEMENTS), before=_separator, after=_separator)
def test_wrapping_in_comments_and_whitespace_keeps_the_kind(
    sql: str, before: str, after: str
) -> None:
    expected = classify(sql)
    wrapped = classify(f"{before}{sql}{after}")
    assert wrapped.kind is expected.kind, (wrapped.reason, expected.reason)
    assert wrapped.tables == expected.tables


def _interleave(sql: str, separators: list[str]) -> str:
    """``sql`` with a separator between every two tokens (not inside continued strings)."""
    tokens = [t for t in pg_parser.scan(sql) if t.name not in ("C_COMMENT", "SQL_COMMENT")]
    out: list[str] = []
    for index, token in enumerate(tokens):
        out.append(sql[token.start : token.end + 1])
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if following is None:
            continue
        gap = sql[token.end + 1 : following.start]
        if token.name == "SCONST" and following.name == "SCONST":
            out.append(gap)  # string continuation across a newline: leave it alone
        else:
            # Spaced: "-" followed by "--" would lex as one comment ("---").
            out.append(f" {separators[index % len(separators)]} ")
    return "".join(out)


@PROPERTY_SETTINGS
@given(sql=st.sampled_from(STATEMENTS), separators=st.lists(_separator, min_size=1, max_size=5))
def test_comments_between_tokens_keep_the_kind(sql: str, separators: list[str]) -> None:
    expected = classify(sql)
    spread = classify(_interleave(sql, separators))
    assert spread.kind is expected.kind, (spread.reason, expected.reason)
    assert spread.tables == expected.tables


@PROPERTY_SETTINGS
@given(sql=st.sampled_from(STATEMENTS), literal=st.integers(min_value=0, max_value=10**9))
def test_cache_state_never_changes_a_result(sql: str, literal: int) -> None:
    clear_caches()
    cold = classify(sql)
    classify(sql.replace("1", str(literal)))  # warm the shape cache with other literals
    warm = classify(sql)
    assert (warm.kind, warm.tables, warm.reason) == (cold.kind, cold.tables, cold.reason)
