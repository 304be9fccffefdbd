"""PostgreSQL's own reading of a statement (libpg_query through pglast).

Owns: the walk over PostgreSQL's raw parse tree that finds what a statement
really does: nested writes (writable CTEs, CREATE SCHEMA elements),
UPDATE/DELETE without a WHERE clause, SELECT INTO, row locks, side-effecting
function calls, ``set_config`` of the role, the tables it names (CTE names
excluded by scope), and the statement an EXPLAIN ANALYZE, PREPARE or DECLARE
wraps. Kinds that follow from a statement's type alone are in ``statements``.

Must not: use sqlglot, cache, or resolve prepared statements (``classify``
combines this reading with sqlglot's and with the session's state).

A subtree *executes* when running the statement runs it now (the query of
a CREATE TABLE AS, the SELECT of a cursor); the query of a view, a rule, a
plain EXPLAIN or a function body does not, and only contributes table names.
Every statement type ends in ``Stmt``; a type neither handled here nor in
``statements.FIXED`` is ``unknown``, so a newer parser cannot silently widen
what passes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pglast import ast, enums

from policies.kinds import Kind
from policies.reading import ANY_TABLE, Reading
from policies.sideeffects import (
    SET_CONFIG,
    VALUE_DEPENDENT_SETTINGS,
    function_effect,
    last_name,
    setting_kind,
)
from policies.statements import FIXED, NOT_EXECUTED

# -- the result ---------------------------------------------------------------------


@dataclass
class Wrapped:
    """The statement inside EXPLAIN ANALYZE, DECLARE or PREPARE, read on its own."""

    keyword: str  # EXPLAIN, DECLARE or PREPARE: where its text starts
    node_type: str
    reading: Reading


@dataclass
class PgStatement:
    node_type: str
    reading: Reading
    wrapped: Wrapped | None = None
    prepare_name: str | None = None
    deallocate: str | None = None
    deallocate_all: bool = False


# -- the walk -------------------------------------------------------------------------

_RELATION_OBJECTS = frozenset(
    {
        enums.ObjectType.OBJECT_TABLE,
        enums.ObjectType.OBJECT_VIEW,
        enums.ObjectType.OBJECT_MATVIEW,
        enums.ObjectType.OBJECT_SEQUENCE,
        enums.ObjectType.OBJECT_INDEX,
        enums.ObjectType.OBJECT_FOREIGN_TABLE,
    }
)
_CONTAINER_OBJECTS = frozenset({enums.ObjectType.OBJECT_SCHEMA, enums.ObjectType.OBJECT_DATABASE})
_ROW_SECURITY = frozenset(
    {
        enums.AlterTableType.AT_EnableRowSecurity,
        enums.AlterTableType.AT_DisableRowSecurity,
        enums.AlterTableType.AT_ForceRowSecurity,
        enums.AlterTableType.AT_NoForceRowSecurity,
    }
)
_ADMIN_TRANSACTIONS = frozenset(
    {
        enums.TransactionStmtKind.TRANS_STMT_PREPARE,
        enums.TransactionStmtKind.TRANS_STMT_COMMIT_PREPARED,
        enums.TransactionStmtKind.TRANS_STMT_ROLLBACK_PREPARED,
    }
)
_QUERY_TYPES = frozenset({"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})


def _names(items: object) -> list[str]:
    """Dotted parts of a name given as a list of String nodes."""
    if not isinstance(items, tuple | list):
        return []
    return [item.sval or "" for item in items if isinstance(item, ast.String)]


def _qualified(parts: list[str]) -> str:
    return ".".join(parts).lower()


def _relation_name(rv: ast.RangeVar) -> str:
    parts = [p for p in (rv.catalogname, rv.schemaname, rv.relname) if p]
    return _qualified(parts)


def _argument(call: ast.FuncCall, position: int, name: str) -> object:
    """A call's argument by name (``name => ...``) or else by position."""
    args = list(call.args or ())
    named = [a for a in args if isinstance(a, ast.NamedArgExpr)]
    if named:
        chosen = [a.arg for a in named if (a.name or "").lower() == name]
        if chosen:
            return chosen[0]
        positional = [a for a in args if not isinstance(a, ast.NamedArgExpr)]
        return positional[position] if position < len(positional) else None
    return args[position] if position < len(args) else None


def _setting_literal(node: object) -> str | None:
    """A SET value given as a string, a number or a keyword (on, off, true, ...), as text."""
    if isinstance(node, ast.A_Const) and isinstance(node.val, ast.Integer):
        return str(node.val.ival)
    return _string_literal(node)


def _asks_read_write(options: Sequence[object] | None) -> bool:
    """Transaction options (BEGIN, SET TRANSACTION ...) that include READ WRITE."""
    for option in options or ():
        if isinstance(option, ast.DefElem) and option.defname == "transaction_read_only":
            arg = option.arg
            if not (isinstance(arg, ast.A_Const) and isinstance(arg.val, ast.Integer)
                    and arg.val.ival == 1):
                return True
    return False


def _string_literal(node: object) -> str | None:
    """The text of a string literal (through casts), or None for anything else."""
    while isinstance(node, ast.TypeCast):
        node = node.arg
    if isinstance(node, ast.A_Const) and isinstance(node.val, ast.String):
        return node.val.sval or ""
    return None


def _mentions_columns(node: object) -> bool:
    """True when an expression refers to a column (or a cursor position)."""
    pending = [node]
    while pending:
        value = pending.pop()
        if isinstance(value, ast.ColumnRef | ast.CurrentOfExpr):
            return True
        if isinstance(value, ast.Node):
            pending.extend(getattr(value, slot) for slot in value)
        elif isinstance(value, tuple | list):
            pending.extend(value)
    return False


class _Walker:
    """Walks a tree breadth-first with an explicit queue (no recursion limit)."""

    def __init__(self, reading: Reading) -> None:
        self.reading = reading
        self.pending: deque[tuple[object, frozenset[str], bool]] = deque()

    def run(self, node: object, executing: bool) -> None:
        self.visit(node, frozenset(), executing)
        while self.pending:
            self.visit_now(*self.pending.popleft())

    # generic traversal -------------------------------------------------------------
    def visit(self, value: object, ctes: frozenset[str], executing: bool) -> None:
        self.pending.append((value, ctes, executing))

    def visit_now(self, value: object, ctes: frozenset[str], executing: bool) -> None:
        if isinstance(value, ast.Node):
            node_type = type(value).__name__
            handler = _HANDLERS.get(node_type)
            if not executing and node_type.endswith("Stmt") and node_type not in _QUERY_TYPES:
                # A stored statement (rule action, function body): names only.
                self.children(value, ctes, executing)
            elif handler is not None:
                handler(self, value, ctes, executing)
            elif node_type.endswith("Stmt") and node_type not in FIXED:
                self.reading.add(Kind.UNKNOWN, f"statement type {node_type} is not known")
                self.reading.table(ANY_TABLE)
            else:
                self.statement_kind(value, executing)
                self.children(value, ctes, executing)
        elif isinstance(value, tuple | list):
            for item in value:
                self.visit(item, ctes, executing)

    def statement_kind(self, node: ast.Node, executing: bool) -> None:
        fixed = FIXED.get(type(node).__name__)
        if fixed is not None and executing:
            self.reading.add(*fixed)
            if fixed[0] is Kind.UNKNOWN:
                self.reading.table(ANY_TABLE)

    def children(
        self,
        node: ast.Node,
        ctes: frozenset[str],
        executing: bool,
        skip: frozenset[str] = frozenset(),
    ) -> None:
        slots = list(node)
        with_clause = getattr(node, "withClause", None) if "withClause" in slots else None
        if isinstance(with_clause, ast.WithClause):
            ctes = self.with_clause(with_clause, ctes, executing)
        stored = NOT_EXECUTED.get(type(node).__name__, frozenset())
        for slot in slots:
            if slot in skip or slot == "withClause":
                continue
            self.visit(getattr(node, slot), ctes, executing and slot not in stored)

    def with_clause(
        self, clause: ast.WithClause, ctes: frozenset[str], executing: bool
    ) -> frozenset[str]:
        entries = [cte for cte in clause.ctes or () if isinstance(cte, ast.CommonTableExpr)]
        names = [cte.ctename or "" for cte in entries]
        for index, cte in enumerate(entries):
            visible = names if clause.recursive else names[:index]
            self.visit(cte.ctequery, ctes | frozenset(visible), executing)
        return ctes | frozenset(names)

    # nodes ------------------------------------------------------------------------
    def range_var(self, node: ast.RangeVar, ctes: frozenset[str], executing: bool) -> None:
        if node.schemaname is None and node.catalogname is None and node.relname in ctes:
            return
        self.reading.table(_relation_name(node))

    def func_call(self, node: ast.FuncCall, ctes: frozenset[str], executing: bool) -> None:
        name = _qualified(_names(node.funcname))
        if executing:
            self.reading.function(name)
            effect = function_effect(name)
            if effect is not None:
                self.reading.add(effect[0], f"calls {name}(): {effect[1]}")
            if last_name(name) == SET_CONFIG:
                self.set_config(node)
        self.children(node, ctes, executing)

    def set_config(self, node: ast.FuncCall) -> None:
        # The setting name is a literal (or a parameter, which normalizes to
        # the same cache key as a literal): never share this result by shape.
        self.reading.literal_dependent = True
        setting = _string_literal(_argument(node, 0, "setting_name"))
        if setting is None:
            self.reading.add(Kind.UNKNOWN, "set_config with a setting name that is not a literal")
            return
        value = _string_literal(_argument(node, 1, "new_value"))
        kind, reason = setting_kind(setting, value, value_readable=value is not None)
        self.reading.add(kind, f"set_config {reason}")

    def select(self, node: ast.SelectStmt, ctes: frozenset[str], executing: bool) -> None:
        if executing:
            self.reading.has_query = True
            self.reading.add(Kind.READ, "a query that only reads")
            if node.intoClause is not None:
                self.reading.add(Kind.WRITE, "SELECT INTO creates and fills a table")
            if node.lockingClause:
                self.reading.add(
                    Kind.WRITE, "FOR UPDATE/SHARE locks rows (needs UPDATE privilege)"
                )
        self.children(node, ctes, executing)

    def insert(self, node: ast.InsertStmt, ctes: frozenset[str], executing: bool) -> None:
        if executing:
            self.reading.has_query = True
            self.reading.add(Kind.WRITE, "INSERT writes rows")
        self.children(node, ctes, executing)

    def update_or_delete(
        self, node: ast.UpdateStmt | ast.DeleteStmt, ctes: frozenset[str], executing: bool
    ) -> None:
        verb = "UPDATE" if isinstance(node, ast.UpdateStmt) else "DELETE"
        if executing:
            self.reading.has_query = True
            where = getattr(node, "whereClause", None)
            target = _relation_name(node.relation) if node.relation else "?"
            if where is None:
                self.reading.add(
                    Kind.DESTRUCTIVE, f"{verb} without a WHERE clause affects every row of {target}"
                )
            elif not _mentions_columns(where):
                self.reading.add(
                    Kind.DESTRUCTIVE,
                    f"{verb} whose WHERE clause names no column affects every row of {target}",
                )
            else:
                self.reading.add(Kind.WRITE, f"{verb} with a WHERE clause")
        self.children(node, ctes, executing)

    def merge(self, node: ast.MergeStmt, ctes: frozenset[str], executing: bool) -> None:
        if executing:
            self.reading.has_query = True
            join_on_columns = _mentions_columns(node.joinCondition)
            sweeping = False
            for clause in node.mergeWhenClauses or ():
                if clause.commandType not in (enums.CmdType.CMD_UPDATE, enums.CmdType.CMD_DELETE):
                    continue
                if _mentions_columns(clause.condition):
                    continue
                by_source = (
                    clause.matchKind == enums.MergeMatchKind.MERGE_WHEN_NOT_MATCHED_BY_SOURCE
                )
                sweeping = sweeping or by_source or not join_on_columns
            if sweeping:
                self.reading.add(
                    Kind.DESTRUCTIVE, "MERGE that updates or deletes rows without a row condition"
                )
            else:
                self.reading.add(Kind.WRITE, "MERGE writes rows")
        self.children(node, ctes, executing)

    def copy(self, node: ast.CopyStmt, ctes: frozenset[str], executing: bool) -> None:
        if executing:
            if node.is_program:
                self.reading.add(Kind.ADMIN, "COPY ... PROGRAM runs a program on the server")
            elif node.filename is not None:
                self.reading.add(Kind.ADMIN, "COPY with a server file reads or writes server files")
            elif node.is_from:
                self.reading.add(Kind.WRITE, "COPY FROM STDIN writes rows")
            else:
                self.reading.add(Kind.READ, "COPY TO STDOUT reads")
        self.children(node, ctes, executing)

    def explain(self, node: ast.ExplainStmt, ctes: frozenset[str], executing: bool) -> None:
        # Only reached for a nested EXPLAIN (never valid SQL); top-level EXPLAIN
        # is handled by read_statement so that its inner statement is kept apart.
        self.reading.add(Kind.UNKNOWN, "nested EXPLAIN")
        self.children(node, ctes, executing)

    def execute(self, node: ast.ExecuteStmt, ctes: frozenset[str], executing: bool) -> None:
        if executing:
            self.reading.add(Kind.READ, f"EXECUTE runs prepared statement {node.name}")
            self.reading.executes = node.name
        self.children(node, ctes, executing)

    def create_table_as(
        self, node: ast.CreateTableAsStmt, ctes: frozenset[str], executing: bool
    ) -> None:
        if executing:
            self.reading.add(Kind.DDL, "CREATE TABLE AS / MATERIALIZED VIEW creates a relation")
        fills = executing and not (node.into is not None and node.into.skipData)
        self.children(node, ctes, fills, skip=frozenset({"into"}))
        if node.into is not None:
            self.visit(node.into, ctes, executing)

    def declare_nested(
        self, node: ast.DeclareCursorStmt, ctes: frozenset[str], executing: bool
    ) -> None:
        if executing:
            self.reading.add(Kind.READ, "DECLARE opens a cursor")
        self.children(node, ctes, executing)

    def transaction(self, node: ast.TransactionStmt, ctes: frozenset[str], executing: bool) -> None:
        if node.kind in _ADMIN_TRANSACTIONS:
            self.reading.add(Kind.ADMIN, "two-phase commit acts on prepared transactions")
        elif _asks_read_write(node.options):
            self.reading.add(Kind.WRITE, "a READ WRITE transaction asks to write")
        else:
            self.reading.add(Kind.SESSION, "transaction control")

    def variable_set(
        self, node: ast.VariableSetStmt, ctes: frozenset[str], executing: bool
    ) -> None:
        if node.kind == enums.VariableSetKind.VAR_RESET_ALL:
            self.reading.add(Kind.SESSION, "RESET ALL resets ordinary session settings")
        elif node.kind == enums.VariableSetKind.VAR_SET_MULTI:
            if _asks_read_write(node.args):
                self.reading.add(Kind.WRITE, f"SET {node.name} READ WRITE lets transactions write")
            else:
                self.reading.add(Kind.SESSION, f"SET {node.name}")
        else:
            name = node.name or ""
            value: str | None = None
            readable = True
            if name.lower() in VALUE_DEPENDENT_SETTINGS:
                self.reading.literal_dependent = True
                if node.kind == enums.VariableSetKind.VAR_SET_VALUE:
                    args = list(node.args or ())
                    value = _setting_literal(args[0]) if len(args) == 1 else None
                    readable = value is not None
            kind, reason = setting_kind(name, value, value_readable=readable)
            self.reading.add(kind, reason)

    def deallocate(self, node: ast.Node, ctes: frozenset[str], executing: bool) -> None:
        self.reading.add(Kind.SESSION, "releases prepared statements")

    def discard(self, node: ast.DiscardStmt, ctes: frozenset[str], executing: bool) -> None:
        self.reading.add(Kind.SESSION, "DISCARD resets session state")

    def drop(self, node: ast.DropStmt, ctes: frozenset[str], executing: bool) -> None:
        object_type = node.removeType
        label = str(getattr(object_type, "name", object_type)).removeprefix("OBJECT_")
        if object_type == enums.ObjectType.OBJECT_POLICY:
            self.reading.add(Kind.PRIVILEGE, "drops a row-level security policy")
        else:
            self.reading.add(Kind.DESTRUCTIVE, f"DROP {label.replace('_', ' ')}")
        if object_type in _RELATION_OBJECTS:
            for item in node.objects or ():
                parts = _names(item)
                if parts:
                    self.reading.table(_qualified(parts))
        if object_type in _CONTAINER_OBJECTS:
            self.reading.table(ANY_TABLE)
        if node.behavior == enums.DropBehavior.DROP_CASCADE:
            self.reading.add(Kind.DESTRUCTIVE, "CASCADE also drops dependent objects")
            self.reading.table(ANY_TABLE)

    def truncate(self, node: ast.TruncateStmt, ctes: frozenset[str], executing: bool) -> None:
        self.reading.add(*FIXED["TruncateStmt"])
        if node.behavior == enums.DropBehavior.DROP_CASCADE:
            self.reading.add(Kind.DESTRUCTIVE, "CASCADE also truncates referencing tables")
            self.reading.table(ANY_TABLE)
        self.children(node, ctes, executing)

    def alter_table(self, node: ast.AlterTableStmt, ctes: frozenset[str], executing: bool) -> None:
        self.reading.add(Kind.DDL, "ALTER changes the schema")
        for cmd in node.cmds or ():
            if not isinstance(cmd, ast.AlterTableCmd):
                continue
            if cmd.subtype == enums.AlterTableType.AT_DropColumn:
                self.reading.add(Kind.DESTRUCTIVE, "DROP COLUMN destroys the column's data")
            elif cmd.subtype == enums.AlterTableType.AT_ChangeOwner:
                self.reading.add(Kind.PRIVILEGE, "OWNER TO changes the owner")
            elif cmd.subtype in _ROW_SECURITY:
                self.reading.add(Kind.PRIVILEGE, "changes row-level security")
        self.children(node, ctes, executing)

    def rename(self, node: ast.RenameStmt, ctes: frozenset[str], executing: bool) -> None:
        if node.renameType == enums.ObjectType.OBJECT_ROLE:
            self.reading.add(Kind.PRIVILEGE, "renames a role")
        else:
            self.reading.add(Kind.DDL, "RENAME changes the schema")
        if node.renameType in _CONTAINER_OBJECTS:
            self.reading.table(ANY_TABLE)
        self.children(node, ctes, executing)

    def set_schema(
        self, node: ast.AlterObjectSchemaStmt, ctes: frozenset[str], executing: bool
    ) -> None:
        self.reading.add(Kind.DDL, "SET SCHEMA moves an object")
        if node.relation is not None and node.newschema and node.relation.relname:
            self.reading.table(_qualified([node.newschema, node.relation.relname]))
        self.children(node, ctes, executing)

    def grant(self, node: ast.GrantStmt, ctes: frozenset[str], executing: bool) -> None:
        self.reading.add(*FIXED["GrantStmt"])
        if node.targtype != enums.GrantTargetType.ACL_TARGET_OBJECT:
            self.reading.table(ANY_TABLE)
        self.children(node, ctes, executing)

    def comment(self, node: ast.CommentStmt, ctes: frozenset[str], executing: bool) -> None:
        self.reading.add(*FIXED["CommentStmt"])
        parts = _names(node.object)
        if node.objtype in _RELATION_OBJECTS and parts:
            self.reading.table(_qualified(parts))
        elif node.objtype == enums.ObjectType.OBJECT_COLUMN and len(parts) > 1:
            self.reading.table(_qualified(parts[:-1]))

    def whole_database(self, node: ast.Node, ctes: frozenset[str], executing: bool) -> None:
        self.statement_kind(node, True)
        self.reading.table(ANY_TABLE)
        self.children(node, ctes, executing)


# Each handler takes the node type it is registered for.
_Handler = Callable[[_Walker, Any, frozenset[str], bool], None]
_HANDLERS: dict[str, _Handler] = {
    "RangeVar": _Walker.range_var,
    "FuncCall": _Walker.func_call,
    "SelectStmt": _Walker.select,
    "InsertStmt": _Walker.insert,
    "UpdateStmt": _Walker.update_or_delete,
    "DeleteStmt": _Walker.update_or_delete,
    "MergeStmt": _Walker.merge,
    "CopyStmt": _Walker.copy,
    "ExplainStmt": _Walker.explain,
    "ExecuteStmt": _Walker.execute,
    "CreateTableAsStmt": _Walker.create_table_as,
    "DeclareCursorStmt": _Walker.declare_nested,
    "TransactionStmt": _Walker.transaction,
    "VariableSetStmt": _Walker.variable_set,
    "DeallocateStmt": _Walker.deallocate,
    "DiscardStmt": _Walker.discard,
    "DropStmt": _Walker.drop,
    "TruncateStmt": _Walker.truncate,
    "AlterTableStmt": _Walker.alter_table,
    "RenameStmt": _Walker.rename,
    "AlterObjectSchemaStmt": _Walker.set_schema,
    "GrantStmt": _Walker.grant,
    "CommentStmt": _Walker.comment,
    "DropOwnedStmt": _Walker.whole_database,
    "ReassignOwnedStmt": _Walker.whole_database,
    "AlterDefaultPrivilegesStmt": _Walker.whole_database,
    "DropdbStmt": _Walker.whole_database,
}

HANDLED_STATEMENTS = frozenset(name for name in _HANDLERS if name.endswith("Stmt"))


def _read(node: ast.Node | None, *, executing: bool = True) -> Reading:
    reading = Reading()
    _Walker(reading).run(node, executing)
    return reading


def read_statement(node: ast.Node | None) -> PgStatement:
    """PostgreSQL's reading of one top-level statement (a RawStmt's ``stmt``)."""
    node_type = type(node).__name__
    if isinstance(node, ast.ExplainStmt):
        options = {str(opt.defname).lower() for opt in node.options or () if opt.defname}
        inner = node.query
        if "analyze" in options and inner is not None:
            wrapped = Wrapped("EXPLAIN", type(inner).__name__, _read(inner))
            reading = Reading()
            reading.add(Kind.READ, "EXPLAIN ANALYZE runs the statement")
            return PgStatement(node_type, reading, wrapped)
        reading = _read(inner, executing=False)
        reading.add(Kind.READ, "plain EXPLAIN plans the statement without running it")
        return PgStatement(node_type, reading)
    if isinstance(node, ast.DeclareCursorStmt):
        reading = Reading()
        reading.add(Kind.READ, "DECLARE opens a cursor")
        wrapped = Wrapped("DECLARE", type(node.query).__name__, _read(node.query))
        return PgStatement(node_type, reading, wrapped)
    if isinstance(node, ast.PrepareStmt):
        reading = Reading()
        wrapped = Wrapped("PREPARE", type(node.query).__name__, _read(node.query))
        return PgStatement(node_type, reading, wrapped, prepare_name=node.name)
    statement = PgStatement(node_type, _read(node))
    if isinstance(node, ast.DeallocateStmt):
        statement.deallocate = node.name
        statement.deallocate_all = bool(node.isall) or node.name is None
    elif isinstance(node, ast.DiscardStmt) and node.target == enums.DiscardMode.DISCARD_ALL:
        statement.deallocate_all = True
    return statement
