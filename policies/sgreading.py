"""sqlglot's reading of a statement: the second opinion.

Owns: parsing one statement's *neutral text* (see ``lexing``) with sqlglot's
PostgreSQL dialect and walking the tree for what it does: writes anywhere in
it (writable CTEs), UPDATE/DELETE without a row condition, SELECT INTO, row
locks, side-effecting function calls, DROP/TRUNCATE/GRANT and friends, COPY
to or from server files, and the tables it names (CTE names excluded by
scope). It also names the statement's leading keyword as sqlglot sees it, so
``classify`` can check that both parsers read the same kind of statement.

Must not: decide anything alone. sqlglot falls back to an opaque ``Command``
(or a bare identifier) for many PostgreSQL utility statements; such a
reading carries no findings and only its leading keyword is compared.
``set_config`` is left to PostgreSQL's reading, which sees the real literal.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from sqlglot import exp
from sqlglot.dialects.dialect import Dialect

from policies.kinds import Kind
from policies.reading import ANY_TABLE, Reading
from policies.sideeffects import SET_CONFIG, function_effect, last_name

# sqlglot logs a warning for every statement it keeps as an opaque Command;
# for a proxy that is noise on every SHOW or SET ROLE.
logging.getLogger("sqlglot").setLevel(logging.ERROR)

_POSTGRES = Dialect.get_or_raise("postgres")

_QUERY_WORDS = {
    exp.Select: "SELECT",
    exp.Union: "SELECT",
    exp.Intersect: "SELECT",
    exp.Except: "SELECT",
    exp.Subquery: "SELECT",
    exp.Values: "VALUES",
    exp.Transaction: "BEGIN",
    exp.Commit: "COMMIT",
    exp.Rollback: "ROLLBACK",
    exp.TruncateTable: "TRUNCATE",
}


@dataclass
class SgReading:
    word: str
    reading: Reading


@dataclass
class SgFailure:
    reason: str


def _word(tree: exp.Expression) -> str:
    if isinstance(tree, exp.Command):
        return str(tree.this).upper()
    if isinstance(tree, exp.Alias) and isinstance(tree.this, exp.Column):
        return tree.this.name.upper()
    if isinstance(tree, exp.Column):
        return tree.name.upper()
    for cls, word in _QUERY_WORDS.items():
        if isinstance(tree, cls):
            return word
    return type(tree).__name__.upper()


def read_text(text: str) -> SgReading | SgFailure:
    """sqlglot's reading of the neutral text of exactly one statement."""
    try:
        trees = _POSTGRES.parse(text)
    except Exception as exc:  # sqlglot raises several error types; all mean "cannot read"
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return SgFailure(f"sqlglot cannot parse it ({first_line})")
    statements = [
        t for t in trees if isinstance(t, exp.Expression) and not isinstance(t, exp.Semicolon)
    ]
    if len(statements) != 1:
        return SgFailure(f"sqlglot reads {len(statements)} statements where PostgreSQL reads one")
    tree = statements[0]
    reading = Reading()
    _Walker(reading).run(tree)
    return SgReading(_word(tree), reading)


def _table_name(table: exp.Table) -> str | None:
    if not isinstance(table.this, exp.Identifier):
        return None
    parts = [part for part in (table.catalog, table.db, table.name) if part]
    return ".".join(parts).lower()


def _with_clause(node: exp.Expression) -> exp.With | None:
    for key in ("with_", "with"):
        found = node.args.get(key)
        if isinstance(found, exp.With):
            return found
    return None


def _has_column(node: exp.Expression | None) -> bool:
    return node is not None and node.find(exp.Column) is not None


class _Walker:
    """Walks a tree breadth-first with an explicit queue (no recursion limit)."""

    def __init__(self, reading: Reading) -> None:
        self.reading = reading

    def run(self, tree: exp.Expression) -> None:
        pending: deque[tuple[exp.Expression, frozenset[str], bool]] = deque()
        pending.append((tree, frozenset(), True))
        while pending:
            node, ctes, executing = pending.popleft()
            with_clause = _with_clause(node)
            if with_clause is not None:
                recursive = bool(with_clause.args.get("recursive"))
                names = [cte.alias_or_name.lower() for cte in with_clause.expressions]
                for index, cte in enumerate(with_clause.expressions):
                    visible = names if recursive else names[:index]
                    pending.append((cte.this, ctes | frozenset(visible), executing))
                ctes = ctes | frozenset(names)
            children_execute = self.judge(node, ctes, executing)
            for child in node.iter_expressions():
                if child is not with_clause:
                    pending.append((child, ctes, children_execute))

    def judge(self, node: exp.Expression, ctes: frozenset[str], executing: bool) -> bool:
        """Record what ``node`` itself does; return whether its children execute."""
        add = self.reading.add
        if isinstance(node, exp.Table):
            name = _table_name(node)
            is_cte = not node.db and not node.catalog and node.name.lower() in ctes
            if name is not None and not is_cte:
                self.reading.table(name)
            return executing
        if not executing:
            return False
        if isinstance(node, exp.Anonymous):
            name = node.name.lower()
            self.reading.function(name)
            effect = function_effect(name)
            if effect is not None and last_name(name) != SET_CONFIG:
                add(effect[0], f"calls {name}(): {effect[1]}")
        elif isinstance(node, exp.Select | exp.Values):
            self.reading.has_query = True
            add(Kind.READ, "a query that only reads")
            if node.args.get("into") is not None:
                add(Kind.WRITE, "SELECT INTO creates and fills a table")
            if node.args.get("locks"):
                add(Kind.WRITE, "FOR UPDATE/SHARE locks rows (needs UPDATE privilege)")
        elif isinstance(node, exp.Insert):
            self.reading.has_query = True
            add(Kind.WRITE, "INSERT writes rows")
        elif isinstance(node, exp.Update | exp.Delete):
            self.update_or_delete(node)
        elif isinstance(node, exp.Merge):
            self.merge(node)
        elif isinstance(node, exp.Drop):
            self.drop(node)
        elif isinstance(node, exp.Create):
            return self.create(node)
        elif isinstance(node, exp.Alter):
            add(Kind.DDL, "ALTER changes the schema")
        elif isinstance(node, exp.Grant | exp.Revoke):
            add(Kind.PRIVILEGE, "GRANT/REVOKE changes privileges")
        elif isinstance(node, exp.TruncateTable):
            add(Kind.DESTRUCTIVE, "TRUNCATE removes every row")
        elif isinstance(node, exp.Copy):
            self.copy(node)
        elif isinstance(node, exp.Comment):
            add(Kind.DDL, "COMMENT ON changes metadata")
        elif isinstance(node, exp.Set | exp.Transaction | exp.Commit | exp.Rollback):
            add(Kind.SESSION, "session or transaction control")
        elif isinstance(node, exp.Analyze):
            add(Kind.ADMIN, "ANALYZE is maintenance")
        return True

    def update_or_delete(self, node: exp.Update | exp.Delete) -> None:
        if isinstance(node.parent, exp.When):
            return  # a MERGE action; judged with the MERGE
        self.reading.has_query = True
        verb = "UPDATE" if isinstance(node, exp.Update) else "DELETE"
        where = node.args.get("where")
        if where is None:
            self.reading.add(Kind.DESTRUCTIVE, f"{verb} without a WHERE clause affects every row")
        elif not _has_column(where):
            self.reading.add(
                Kind.DESTRUCTIVE, f"{verb} whose WHERE clause names no column affects every row"
            )
        else:
            self.reading.add(Kind.WRITE, f"{verb} with a WHERE clause")

    def merge(self, node: exp.Merge) -> None:
        self.reading.has_query = True
        if _has_column(node.args.get("on")):
            self.reading.add(Kind.WRITE, "MERGE writes rows")
            return
        whens = node.args.get("whens")
        actions = whens.expressions if isinstance(whens, exp.Whens) else []
        sweeping = any(
            isinstance(when.args.get("then"), exp.Update)
            or (isinstance(when.args.get("then"), exp.Var) and when.args["then"].name == "DELETE")
            for when in actions
            if when.args.get("matched")
        )
        if sweeping:
            self.reading.add(
                Kind.DESTRUCTIVE, "MERGE that updates or deletes rows without a row condition"
            )
        else:
            self.reading.add(Kind.WRITE, "MERGE writes rows")

    def drop(self, node: exp.Drop) -> None:
        what = str(node.args.get("kind") or "").upper()
        if isinstance(node.parent, exp.Alter):
            if what == "COLUMN":
                self.reading.add(Kind.DESTRUCTIVE, "DROP COLUMN destroys the column's data")
            return  # ALTER ... DROP CONSTRAINT and friends: the ALTER's kind stands
        self.reading.add(Kind.DESTRUCTIVE, f"DROP {what}".strip())
        if what in ("SCHEMA", "DATABASE") or node.args.get("cascade"):
            self.reading.table(ANY_TABLE)

    def create(self, node: exp.Create) -> bool:
        self.reading.add(Kind.DDL, "CREATE changes the schema")
        what = str(node.args.get("kind") or "").upper()
        properties = node.args.get("properties")
        materialized = isinstance(properties, exp.Properties) and any(
            isinstance(p, exp.MaterializedProperty) for p in properties.expressions
        )
        # The query of CREATE TABLE AS or a materialized view runs now; a view's does not.
        return what == "TABLE" or materialized

    def copy(self, node: exp.Copy) -> None:
        files = node.args.get("files") or []
        standard = all(
            isinstance(f, exp.Identifier) and f.name.upper() in ("STDIN", "STDOUT") for f in files
        )
        if not standard:
            self.reading.add(Kind.ADMIN, "COPY with a server file or PROGRAM")
        elif node.args.get("kind"):
            self.reading.add(Kind.WRITE, "COPY FROM STDIN writes rows")
        else:
            self.reading.add(Kind.READ, "COPY TO STDOUT reads")
