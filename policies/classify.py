"""Classify SQL text: one kind per statement, the strictest for the message.

Owns: the public ``classify()`` entry point, its result types, how the two
readings of a statement are combined, SQL-level PREPARE/EXECUTE/DEALLOCATE
resolution against the caller's per-session state, the optional volatility
upgrade, and the caches. Pure apart from the caches (which never change a
result, see below).

Must not: evaluate policies, do I/O, or keep per-session state itself.

How a message is read
    PostgreSQL's own parser (libpg_query via pglast) splits the message and
    reads every statement; a message it rejects is ``unknown``. Each
    statement is then read a second time by sqlglot, from a *neutral text*
    that PostgreSQL's lexer produced (comments removed, literals replaced),
    so string, dollar-quote, E'' and comment tricks cannot make the two
    readings diverge. The statement is ``unknown`` when sqlglot reads a
    different number of statements or a different statement type, or when
    it cannot read a statement that contains a query (SELECT, VALUES, DML).
    Utility statements PostgreSQL describes completely (SET, SAVEPOINT,
    LISTEN, VACUUM, ...) need no second opinion; sqlglot cannot parse several
    of them. When both readings stand, the stricter kind wins; the tables of
    a query are the union of both readings (elsewhere PostgreSQL's alone,
    as sqlglot also names functions and types as tables in DDL), and the
    functions called are PostgreSQL's.

Tables
    Lowercased, schema-qualified only if the statement qualifies them
    (``payments`` stays ``payments``: the schema depends on search_path,
    which the classifier does not guess). ``*`` means "may touch tables not
    listed" (unknown statements, DROP SCHEMA, CASCADE, GRANT ... ALL TABLES).

Prepared statements
    ``PREPARE x AS <stmt>`` is ``session`` when <stmt> is a read, else the
    kind of <stmt>; its :class:`Prepare` effect carries the inner statement.
    ``EXECUTE x`` takes the kind of ``x`` from ``prepared`` (the caller's
    per-session map, see ``policies.prepared``) updated by any PREPARE or
    DEALLOCATE earlier in the same message; an unknown name is ``unknown``.

Caches
    1. exact text → result (recent texts; the proxy sees the same text often);
    2. ``pglast.parser.normalize(sql)`` → result, literal-blind. Not
       ``fingerprint``: it also ignores schema names, aliases and prepared
       statement names (``SELECT * FROM hr.pay`` and ``... public.pay``
       share a fingerprint), which would leak one statement's tables into
       another's decision. Normalize keeps every identifier and only
       replaces literals; since sqlglot reads a text without literals, a
       result can depend on a literal only where PostgreSQL's reading
       looked at one (``set_config('role', ...)``); such results are kept
       out of this cache. Texts longer than 16 KiB are not cached.
    3. *integer form* → the shape's result, for the proxy's hot path only
       (``texts=False``): the text's bytes with every digit turned into
       ``0`` (one C-level translate), so ``... WHERE aid = 17`` and ``...
       WHERE aid = 42`` are one key and a fresh literal skips PostgreSQL's
       normaliser. A form is learnt from a text only when every digit in
       it belongs to a run of 1-9 digits bordered by whitespace, ``( ) , ;
       = < > + - * /`` or the text's ends, and PostgreSQL's lexer confirms
       each run is one integer constant token (not part of a string, a
       comment, an identifier, a parameter or a longer number). A text with
       the same form has the same characters everywhere else and runs of
       the same lengths in the same places; every lexer rule treats all
       decimal digits alike, and those borders start or end no token that
       a digit could extend, so it lexes identically, with integer
       constants where the learnt text had them. Both readings ignore
       integer values (sqlglot reads the neutral text; PostgreSQL's reading
       looks only at string literals), so the result is the same. Integers
       the normaliser keeps (``FETCH 5``, ``varchar(5)``) share a form too;
       a value the server's grammar rejects there (``float(0)``) fails the
       whole message upstream, so nothing runs. Values of another length
       are another form (learnt the same way); texts with digits anywhere
       else (``t1``, ``::int4``) have none and take the other caches.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pglast import ast
from pglast import parser as pg_parser

from policies import lexing, sgreading
from policies.cache import LRU
from policies.kinds import Kind, strictest
from policies.pgreading import PgStatement, read_statement
from policies.reading import ANY_TABLE, Reading
from policies.sideeffects import last_name
from policies.statements import statement_words

TEXT_CACHE_SIZE = 4096
SHAPE_CACHE_SIZE = 10_000
MAX_CACHED_TEXT = 16 * 1024
FORM_CACHE_SIZE = 4096
# Characters that may border a run of digits in a text whose form is learnt:
# no lexer rule extends a digit run across them (see "Caches" above).
_BOUND = frozenset(" \t\n\r(),;=<>+-*/")
_MAX_DIGITS = 9  # any value of 1-9 digits is an int4 constant
_DIGIT_RUN = re.compile(r"[0-9]+")
_ZEROS = bytes.maketrans(b"0123456789", b"0000000000")


def integer_form(sql: str) -> bytes | None:
    """The form key of ``sql``: its UTF-8 bytes with every digit turned into ``0``."""
    try:
        return sql.encode().translate(_ZEROS)
    except UnicodeEncodeError:  # a lone surrogate: no form
        return None


def learnt_form(sql: str) -> bytes | None:
    """``sql``'s integer form when it is learnt: then every text of that form
    classifies as ``sql`` does, under the same session state and function
    facts (see "Caches" above). None when the form is not (or no longer) known."""
    form = integer_form(sql)
    return form if form is not None and form in _FORMS else None


@dataclass(frozen=True, slots=True)
class Prepare:
    """Effect of ``PREPARE name AS ...``: the inner statement, classified."""

    name: str
    statement: StatementInfo


@dataclass(frozen=True, slots=True)
class Deallocate:
    """Effect of ``DEALLOCATE name``; ``name`` is None for ALL (and DISCARD ALL)."""

    name: str | None


@dataclass(frozen=True, slots=True)
class StatementInfo:
    kind: Kind
    tables: tuple[str, ...]
    text: str
    reason: str
    functions: tuple[str, ...] = ()
    effect: Prepare | Deallocate | None = None
    executes: str | None = None


@dataclass(frozen=True, slots=True)
class Classification:
    kind: Kind
    statements: tuple[StatementInfo, ...]
    reason: str

    @property
    def tables(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for statement in self.statements:
            seen.update(dict.fromkeys(statement.tables))
        return tuple(seen)

    @property
    def kinds(self) -> tuple[Kind, ...]:
        return tuple(statement.kind for statement in self.statements)


@dataclass(frozen=True, slots=True)
class _Entry:
    """A cached reading of a text, before session state and volatility apply."""

    statements: tuple[StatementInfo, ...]
    shape_cacheable: bool
    has_execute: bool
    has_functions: bool
    has_tables: bool
    plain: Classification  # the result without session state or volatility


_TEXTS: LRU[str, _Entry] = LRU(TEXT_CACHE_SIZE)
_SHAPES: LRU[str, _Entry] = LRU(SHAPE_CACHE_SIZE)
# texts=False only (the proxy's hot path), never consulted when the caller
# needs the texts: exact text → the entry last returned for it, which may be
# its shape's (whose statement texts are another text's), so a repeated text
# skips normalising; and integer form → the shape's entry (see "Caches"
# above). Plain dicts, emptied when full: a hit is one lookup (and for a form
# one regex substitution), with no lock or recency bookkeeping.
_BLIND: dict[str, _Entry] = {}
_FORMS: dict[bytes, _Entry] = {}


def clear_caches() -> None:
    _TEXTS.clear()
    _SHAPES.clear()
    _BLIND.clear()
    _FORMS.clear()


def cache_stats() -> dict[str, int]:
    return {
        "text_hits": _TEXTS.hits,
        "text_misses": _TEXTS.misses,
        "text_entries": len(_TEXTS),
        "shape_hits": _SHAPES.hits,
        "shape_misses": _SHAPES.misses,
        "shape_entries": len(_SHAPES),
        "form_entries": len(_FORMS),
    }


def classify(
    sql: str,
    *,
    prepared: Mapping[str, StatementInfo] | None = None,
    volatile_functions: frozenset[str] | None = None,
    known_functions: frozenset[str] | None = None,
    volatile_relations: frozenset[str] | None = None,
    standard_conforming_strings: bool = True,
    texts: bool = True,
) -> Classification:
    """Classify every statement of ``sql`` (one simple-protocol Query or one Parse).

    ``prepared``: the session's SQL-level prepared statements (name → inner
    statement), for EXECUTE. ``volatile_functions``: lowercased names of
    volatile non-built-in functions of the resource; a read that calls one
    becomes a write. ``known_functions``: when given, every function name of
    the resource (bare and schema-qualified, lowercased); a read that calls a
    function not in it becomes a write too (it may have been created since
    the names were read). ``volatile_relations``: lowercased names (bare and
    qualified) of relations whose reading runs such a function (a view that
    calls one, a table whose row-level security does); a read that names one
    becomes a write. ``standard_conforming_strings``: the server's current
    value (ParameterStatus); when off, strings are lexed differently from
    the classifier and every statement is ``unknown``. ``texts=False`` (the
    proxy's hot path) may return a classification read from another text of
    the same shape (same kinds, tables and effects by construction of the
    literal-blind key; only ``StatementInfo.text`` differs), which saves
    splitting the new text.
    """
    if not standard_conforming_strings:
        return _single_unknown(
            sql,
            "standard_conforming_strings is off, so the server reads string literals "
            "differently from the classifier",
        )
    entry = _lookup(sql, texts)
    needs_session = entry.has_execute and bool(prepared)
    volatile = volatile_functions or frozenset()
    relations = volatile_relations or frozenset()
    # the cached result itself when nothing here changes it (the proxy's memo of
    # allowed shapes is keyed by that object)
    if not needs_session and (
        not (entry.has_functions or (relations and entry.has_tables))
        or not _volatility_applies(entry.statements, volatile, known_functions, relations)
    ):
        return entry.plain
    return _finish(entry.statements, prepared or {}, volatile, known_functions, relations)


def combined(parts: Sequence[Classification]) -> Classification:
    """One classification for several texts decided together (an extended-protocol batch)."""
    return _classification([statement for part in parts for statement in part.statements])


def unknown(reason: str, text: str = "") -> Classification:
    """The classification of something that runs but has no text to read (a FunctionCall)."""
    return _single_unknown(text, reason)


# -- caches -------------------------------------------------------------------------


def _lookup(sql: str, texts: bool = True) -> _Entry:
    cacheable = len(sql) <= MAX_CACHED_TEXT
    if cacheable and not texts:
        hit = _BLIND.get(sql)
        if hit is None:
            form = integer_form(sql)
            if form is not None:
                hit = _FORMS.get(form)
        if hit is not None:
            return hit
    if cacheable:
        hit = _TEXTS.get(sql)
        if hit is not None:
            if not texts:
                _remember_blind(sql, hit)
            return hit
    try:
        if "\x00" in sql:
            raise ValueError("the text contains a NUL character")
        key = pg_parser.normalize(sql)
    except Exception as exc:
        entry = _rejected(sql, exc)
    else:
        shaped = _SHAPES.get(key) if cacheable else None
        if shaped is not None and not texts:
            if not _learn_form(sql, shaped):
                _remember_blind(sql, shaped)
            return shaped
        retexted = _retexted(shaped, sql) if shaped is not None else None
        if retexted is not None:
            entry = retexted
        else:
            entry = _read_message(sql)
            if cacheable and entry.shape_cacheable:
                _SHAPES.put(key, entry)
                _learn_form(sql, entry)
    if cacheable:
        _TEXTS.put(sql, entry)
    return entry


def _remember_blind(sql: str, entry: _Entry) -> None:
    if len(_BLIND) >= TEXT_CACHE_SIZE:
        _BLIND.clear()
    _BLIND[sql] = entry


def _learn_form(sql: str, shaped: _Entry) -> bool:
    """Remember ``sql``'s integer form for its shape's entry, if PostgreSQL's lexer agrees.

    Every digit of ``sql`` must be in a run of 1-9 digits bordered by
    :data:`_BOUND` characters (or the text's ends) that is exactly one integer
    constant token (see "Caches" above). ASCII only, so the lexer's offsets are
    character offsets. Returns whether the form is known now.
    """
    if not sql.isascii():
        return False
    runs = [match.span() for match in _DIGIT_RUN.finditer(sql)]
    if not runs:
        return False
    form = integer_form(sql)
    if form is None:
        return False
    if form in _FORMS:
        return True
    last = len(sql)
    for start, end in runs:
        if end - start > _MAX_DIGITS or (start > 0 and sql[start - 1] not in _BOUND) \
                or (end < last and sql[end] not in _BOUND):
            return False
    try:
        constants = {(tok.start, tok.end + 1) for tok in pg_parser.scan(sql)
                     if tok.name == "ICONST"}
    except Exception:
        return False
    if any(span not in constants for span in runs):
        return False
    if len(_FORMS) >= FORM_CACHE_SIZE:
        _FORMS.clear()
    _FORMS[form] = shaped
    return True


def _retexted(entry: _Entry, sql: str) -> _Entry | None:
    """``entry`` (read from a text of the same shape) with the texts of ``sql``."""
    texts = pg_parser.split(sql)
    if len(texts) != len(entry.statements):
        return None
    statements = tuple(
        [
            StatementInfo(s.kind, s.tables, text, s.reason, s.functions, s.effect, s.executes)
            for s, text in zip(entry.statements, texts, strict=True)
        ]
    )
    if entry.has_execute:
        plain = _finish(statements, {}, frozenset())
    else:  # kinds and reasons do not depend on the texts
        plain = Classification(entry.plain.kind, statements, entry.plain.reason)
    return _Entry(
        statements=statements,
        shape_cacheable=True,
        has_execute=entry.has_execute,
        has_functions=entry.has_functions,
        has_tables=entry.has_tables,
        plain=plain,
    )


# -- reading a message ------------------------------------------------------------------


def _entry(
    statements: tuple[StatementInfo, ...], *, literal_dependent: bool, shape_cacheable: bool
) -> _Entry:
    has_execute = any(s.executes is not None for s in statements)
    return _Entry(
        statements=statements,
        shape_cacheable=shape_cacheable and not literal_dependent,
        has_execute=has_execute,
        has_functions=any(s.functions for s in statements)
        or any(isinstance(s.effect, Prepare) and s.effect.statement.functions for s in statements),
        has_tables=any(s.tables for s in statements)
        or any(isinstance(s.effect, Prepare) and s.effect.statement.tables for s in statements),
        plain=_finish(statements, {}, frozenset()) if has_execute else _classification(statements),
    )


def _unknown(text: str, reason: str, tables: Sequence[str] = ()) -> StatementInfo:
    names = tuple(dict.fromkeys([*tables, ANY_TABLE]))
    return StatementInfo(Kind.UNKNOWN, names, text, reason)


def _single_unknown(sql: str, reason: str) -> Classification:
    statement = _unknown(sql.strip(), reason)
    return Classification(Kind.UNKNOWN, (statement,), reason)


def _rejected(sql: str, exc: Exception) -> _Entry:
    reason = f"PostgreSQL's parser rejects it: {exc}"
    return _entry((_unknown(sql.strip(), reason),), literal_dependent=False, shape_cacheable=False)


def _read_message(sql: str) -> _Entry:
    try:
        raws = pg_parser.parse_sql(sql)
        texts = pg_parser.split(sql)
    except Exception as exc:
        return _rejected(sql, exc)
    if len(raws) != len(texts):
        reason = "PostgreSQL's statement boundaries could not be matched to its statements"
        statement = _unknown(sql.strip(), reason)
        return _entry((statement,), literal_dependent=False, shape_cacheable=False)
    statements: list[StatementInfo] = []
    literal_dependent = False
    shape_cacheable = True
    for raw, text in zip(raws, texts, strict=True):
        try:
            statement, depends = _read_statement(raw.stmt, text)
        except Exception as exc:  # a classifier bug must fail closed, never open
            statement, depends = _unknown(text, f"classifier error: {exc!r}"), False
            shape_cacheable = False
        statements.append(statement)
        literal_dependent = literal_dependent or depends
        shape_cacheable = shape_cacheable and not isinstance(statement.effect, Prepare)
    return _entry(
        tuple(statements), literal_dependent=literal_dependent, shape_cacheable=shape_cacheable
    )


def _disagreement(
    node_type: str, pg: Reading, sg: sgreading.SgReading | sgreading.SgFailure
) -> str | None:
    """Why the two readings cannot both stand, or None when they agree."""
    if isinstance(sg, sgreading.SgFailure):
        if pg.has_query:
            return f"{sg.reason}; it contains a query, which needs both readings"
        return None
    if sg.word not in statement_words(node_type):
        return f"PostgreSQL reads a {node_type} but sqlglot reads a {sg.word} statement"
    if pg.has_query and not sg.reading.has_query:
        return "sqlglot does not see the query PostgreSQL sees in it"
    return None


def _combined(pg: Reading, sg: sgreading.SgReading | sgreading.SgFailure) -> Reading:
    """PostgreSQL's reading, made stricter by sqlglot's where sqlglot sees more.

    sqlglot's tables count only for queries: in DDL it also reports functions,
    types and databases as tables, while PostgreSQL's reading names exactly
    the relations.
    """
    reading = Reading()
    reading.merge(pg)
    if isinstance(sg, sgreading.SgReading):
        stricter = sg.reading.kind.strictness > pg.kind.strictness
        if stricter:
            for kind, reason in sg.reading.findings:
                reading.add(kind, "sqlglot: " + reason)
        if pg.has_query:
            for name in sg.reading.tables:
                reading.table(name)
    return reading


def _read_statement(node: ast.Node | None, text: str) -> tuple[StatementInfo, bool]:
    pg: PgStatement = read_statement(node)
    toks = lexing.tokens(text)
    sg = sgreading.read_text(lexing.neutral_text(text, toks))
    problem = _disagreement(pg.node_type, pg.reading, sg)
    if problem is not None:
        return _unknown(text, problem, pg.reading.tables), pg.reading.literal_dependent
    reading = _combined(pg.reading, sg)
    if pg.wrapped is None:
        return _info(reading, text, pg), reading.literal_dependent

    start = lexing.wrapped_start(toks, pg.wrapped.keyword)
    if start is None:
        reason = f"cannot find the statement inside {pg.wrapped.keyword}"
        return _unknown(text, reason), False
    inner_text = text[toks[start].start :].strip()
    sg_inner = sgreading.read_text(lexing.neutral_text(text, toks, start))
    problem = _disagreement(pg.wrapped.node_type, pg.wrapped.reading, sg_inner)
    if problem is not None:
        return _unknown(text, problem, pg.wrapped.reading.tables), False
    inner = _combined(pg.wrapped.reading, sg_inner)
    depends = reading.literal_dependent or inner.literal_dependent
    if pg.wrapped.keyword == "PREPARE":
        name = pg.prepare_name or ""
        inner_info = StatementInfo(
            inner.kind, tuple(inner.tables), inner_text, inner.reason, tuple(inner.functions)
        )
        return _prepare_info(name, inner_info, text), depends
    prefix = "runs it: " if pg.wrapped.keyword == "EXPLAIN" else "its query: "
    reading.merge(inner, prefix=prefix)
    return _info(reading, text, pg), depends


def _info(reading: Reading, text: str, pg: PgStatement) -> StatementInfo:
    effect: Deallocate | None = None
    if pg.deallocate_all:
        effect = Deallocate(None)
    elif pg.deallocate is not None:
        effect = Deallocate(pg.deallocate)
    return StatementInfo(
        kind=reading.kind,
        tables=tuple(reading.tables),
        text=text,
        reason=reading.reason,
        functions=tuple(reading.functions),
        effect=effect,
        executes=reading.executes,
    )


def _prepare_info(name: str, inner: StatementInfo, text: str) -> StatementInfo:
    if inner.kind is Kind.READ:
        kind, reason = Kind.SESSION, f"PREPARE {name} of a read"
    else:
        kind, reason = inner.kind, f"PREPARE {name} of a statement that: {inner.reason}"
    return StatementInfo(kind, inner.tables, text, reason, effect=Prepare(name, inner))


# -- session state and volatility -------------------------------------------------------


def _classification(statements: Sequence[StatementInfo]) -> Classification:
    if not statements:
        return Classification(Kind.READ, (), "no statements")
    kind = strictest(s.kind for s in statements)
    index, top = next((i, s) for i, s in enumerate(statements) if s.kind is kind)
    reason = top.reason if len(statements) == 1 else f"statement {index + 1}: {top.reason}"
    return Classification(kind, tuple(statements), reason)


def with_volatility(
    statement: StatementInfo, volatile: frozenset[str], known: frozenset[str] | None = None,
    relations: frozenset[str] = frozenset(),
) -> StatementInfo:
    """``statement`` upgraded to a write if it reads and calls a volatile function.

    With ``known`` (see :func:`classify`), a function missing from it counts as
    volatile; a relation in ``relations`` runs one.
    """
    if statement.kind not in (Kind.READ, Kind.SESSION):
        return statement
    if not statement.functions and not (relations and statement.tables):
        return statement  # the common case: nothing here can run a function
    called = [f for f in statement.functions if f in volatile or last_name(f) in volatile]
    unseen = [] if known is None else [f for f in statement.functions if f not in known]
    running = [t for t in statement.tables if t in relations or last_name(t) in relations]
    if called:
        reason = f"calls {called[0]}(), a volatile function of this resource"
    elif unseen:
        reason = (
            f"calls {unseen[0]}(), which pgvouch cannot vouch for: it is not among this "
            "resource's functions as last read, or they may have changed since, so it may write"
        )
    elif running:
        reason = (
            f"reads {running[0]}, which runs a function of this resource that may write "
            "(a view that calls one, or row-level security that does)"
        )
    else:
        return statement
    return StatementInfo(
        Kind.WRITE,
        statement.tables,
        statement.text,
        reason,
        statement.functions,
        statement.effect,
        statement.executes,
    )


def _volatility_applies(statements: Sequence[StatementInfo], volatile: frozenset[str],
                        known: frozenset[str] | None, relations: frozenset[str]) -> bool:
    if not volatile and known is None and not relations:
        return False
    for statement in statements:
        if with_volatility(statement, volatile, known, relations) is not statement:
            return True
        effect = statement.effect
        if isinstance(effect, Prepare) and with_volatility(
            effect.statement, volatile, known, relations
        ) is not effect.statement:
            return True
    return False


def merge_prepared(old: StatementInfo | None, new: StatementInfo) -> StatementInfo:
    """The entry to keep when ``new`` is prepared under a name that may hold ``old``.

    The proxy cannot always tell which of two PREPAREs of one name the server
    kept (the second fails while the first exists), so the stricter wins.
    """
    if old is None or (old.kind.strictness <= new.kind.strictness and old.tables == new.tables):
        return new
    kind = strictest((old.kind, new.kind))
    tables = tuple(dict.fromkeys((*new.tables, *old.tables)))
    reason = new.reason if new.kind is kind else old.reason
    functions = tuple(dict.fromkeys((*new.functions, *old.functions)))
    return StatementInfo(kind, tables, new.text, reason, functions)


def _executed(statement: StatementInfo, target: StatementInfo | None) -> StatementInfo:
    name = statement.executes
    if target is None:
        reason = f"EXECUTE of {name}, which this session has not prepared as far as pgvouch saw"
        return StatementInfo(
            Kind.UNKNOWN, (*statement.tables, ANY_TABLE), statement.text, reason,
            statement.functions, statement.effect, name,
        )
    kind = strictest((statement.kind, target.kind))
    reason = statement.reason if statement.kind is kind else f"runs {name}: {target.reason}"
    tables = tuple(dict.fromkeys((*statement.tables, *target.tables)))
    functions = tuple(dict.fromkeys((*statement.functions, *target.functions)))
    return StatementInfo(kind, tables, statement.text, reason, functions, statement.effect, name)


def _finish(
    statements: Sequence[StatementInfo],
    prepared: Mapping[str, StatementInfo],
    volatile: frozenset[str],
    known: frozenset[str] | None = None,
    relations: frozenset[str] = frozenset(),
) -> Classification:
    session = dict(prepared)
    out: list[StatementInfo] = []
    for statement in statements:
        current = with_volatility(statement, volatile, known, relations)
        effect = current.effect
        if isinstance(effect, Prepare):
            inner = with_volatility(effect.statement, volatile, known, relations)
            current = _prepare_info(effect.name, inner, current.text)
            session[effect.name] = merge_prepared(session.get(effect.name), inner)
        elif isinstance(effect, Deallocate):
            if effect.name is None:
                session.clear()
            else:
                session.pop(effect.name, None)
        if current.executes is not None:
            target = session.get(current.executes)
            if target is not None:
                target = with_volatility(target, volatile, known, relations)
            current = _executed(current, target)
        out.append(current)
    return _classification(out)
