"""The table of PostgreSQL statement types: kind, stored parts, leading words.

Owns: every statement type PostgreSQL's parser produces (the ``*Stmt``
nodes of pglast's AST) whose kind follows from its type alone, which parts
of a statement are stored rather than run, and the leading keywords each
type starts with (to check that sqlglot read the same statement). Types
whose kind depends on their contents are handled in ``pgreading``; a type in
neither place is ``unknown``.

Must not: walk trees or decide anything from a statement's contents.
"""

from __future__ import annotations

import re

from policies.kinds import Kind

_R, _S, _W, _D = Kind.READ, Kind.SESSION, Kind.WRITE, Kind.DDL
_X, _P, _A, _U = Kind.DESTRUCTIVE, Kind.PRIVILEGE, Kind.ADMIN, Kind.UNKNOWN

FIXED: dict[str, tuple[Kind, str]] = {
    "VariableShowStmt": (_R, "SHOW reads a setting"),
    "FetchStmt": (_R, "FETCH/MOVE reads from an open cursor"),
    "ClosePortalStmt": (_S, "CLOSE closes a cursor"),
    "ListenStmt": (_S, "LISTEN subscribes this session to notifications"),
    "UnlistenStmt": (_S, "UNLISTEN"),
    "ConstraintsSetStmt": (_S, "SET CONSTRAINTS changes when this transaction checks constraints"),
    "NotifyStmt": (_W, "NOTIFY signals other sessions"),
    "RefreshMatViewStmt": (_W, "REFRESH MATERIALIZED VIEW rewrites its data"),
    "CheckPointStmt": (_A, "CHECKPOINT"),
    "LoadStmt": (_A, "LOAD loads a shared library into the server"),
    "LockStmt": (_A, "LOCK takes table locks that block other sessions"),
    "VacuumStmt": (_A, "VACUUM/ANALYZE is maintenance"),
    "ClusterStmt": (_A, "CLUSTER rewrites tables under an exclusive lock"),
    "ReindexStmt": (_A, "REINDEX is maintenance"),
    "AlterSystemStmt": (_A, "ALTER SYSTEM changes the server configuration"),
    "CreateTableSpaceStmt": (_A, "tablespaces are server storage"),
    "AlterTableSpaceOptionsStmt": (_A, "tablespaces are server storage"),
    "DropTableSpaceStmt": (_A, "tablespaces are server storage"),
    "AlterTableMoveAllStmt": (_A, "moves every table of a tablespace"),
    "CreateSubscriptionStmt": (_A, "subscriptions connect to other servers"),
    "AlterSubscriptionStmt": (_A, "subscriptions connect to other servers"),
    "DropSubscriptionStmt": (_A, "subscriptions connect to other servers"),
    "AlterDatabaseRefreshCollStmt": (_A, "changes database collation metadata"),
    "DoStmt": (_U, "DO runs procedural code the classifier cannot read"),
    "CallStmt": (_U, "CALL runs a procedure the classifier cannot read"),
    "PLAssignStmt": (_U, "PL/pgSQL assignment outside a function"),
    "ReturnStmt": (_U, "RETURN outside a function"),
    "GrantStmt": (_P, "GRANT/REVOKE changes privileges"),
    "GrantRoleStmt": (_P, "GRANT/REVOKE of a role changes privileges"),
    "AlterDefaultPrivilegesStmt": (_P, "ALTER DEFAULT PRIVILEGES changes future privileges"),
    "CreateRoleStmt": (_P, "creates a role or user"),
    "AlterRoleStmt": (_P, "changes a role or user"),
    "AlterRoleSetStmt": (_P, "changes a role's settings"),
    "DropRoleStmt": (_P, "drops a role or user"),
    "ReassignOwnedStmt": (_P, "REASSIGN OWNED changes the owner of many objects"),
    "DropOwnedStmt": (_P, "DROP OWNED drops objects and revokes privileges"),
    "AlterOwnerStmt": (_P, "changes an object's owner"),
    "SecLabelStmt": (_P, "SECURITY LABEL changes access labels"),
    "CreatePolicyStmt": (_P, "row-level security policies control access"),
    "AlterPolicyStmt": (_P, "row-level security policies control access"),
    "CreateUserMappingStmt": (_P, "user mappings hold credentials for other servers"),
    "AlterUserMappingStmt": (_P, "user mappings hold credentials for other servers"),
    "DropUserMappingStmt": (_P, "user mappings hold credentials for other servers"),
    "TruncateStmt": (_X, "TRUNCATE removes every row"),
    "DropdbStmt": (_X, "DROP DATABASE"),
    "CommentStmt": (_D, "COMMENT ON changes metadata"),
    "CreatedbStmt": (_D, "CREATE DATABASE"),
    "ImportForeignSchemaStmt": (_D, "IMPORT FOREIGN SCHEMA creates foreign tables"),
}

_DDL_TYPES = (
    "AlterCollationStmt", "AlterDatabaseSetStmt", "AlterDatabaseStmt", "AlterDomainStmt",
    "AlterEnumStmt", "AlterEventTrigStmt", "AlterExtensionContentsStmt", "AlterExtensionStmt",
    "AlterFdwStmt", "AlterForeignServerStmt", "AlterFunctionStmt", "AlterObjectDependsStmt",
    "AlterOpFamilyStmt", "AlterOperatorStmt", "AlterPublicationStmt", "AlterSeqStmt",
    "AlterStatsStmt", "AlterTSConfigurationStmt", "AlterTSDictionaryStmt", "AlterTypeStmt",
    "CompositeTypeStmt", "CreateAmStmt", "CreateCastStmt", "CreateConversionStmt",
    "CreateDomainStmt", "CreateEnumStmt", "CreateEventTrigStmt", "CreateExtensionStmt",
    "CreateFdwStmt", "CreateForeignServerStmt", "CreateForeignTableStmt", "CreateFunctionStmt",
    "CreateOpClassStmt", "CreateOpFamilyStmt", "CreatePLangStmt", "CreatePublicationStmt",
    "CreateRangeStmt", "CreateSeqStmt", "CreateStatsStmt", "CreateStmt", "CreateTransformStmt",
    "CreateTrigStmt", "DefineStmt", "IndexStmt", "ReplicaIdentityStmt", "RuleStmt", "ViewStmt",
    "CreateSchemaStmt",
)
for _name in _DDL_TYPES:
    FIXED[_name] = (_D, "changes the schema")

# Statement parts that are stored, not run, when the statement runs.
NOT_EXECUTED: dict[str, frozenset[str]] = {
    "ViewStmt": frozenset({"query"}),
    "RuleStmt": frozenset({"whereClause", "actions"}),
    "CreateFunctionStmt": frozenset({"sql_body", "options", "parameters"}),
    "CreateTrigStmt": frozenset({"whenClause"}),
    "CreatePolicyStmt": frozenset({"qual", "with_check"}),
    "AlterPolicyStmt": frozenset({"qual", "with_check"}),
    "CreateStmt": frozenset({"tableElts", "constraints"}),
    "CreateDomainStmt": frozenset({"constraints"}),
    "DeclareCursorStmt": frozenset(),
}

# The leading keyword(s) each statement type starts with, to check that
# sqlglot read the same statement; the default is the type's first word.
WORDS: dict[str, frozenset[str]] = {
    "SelectStmt": frozenset({"SELECT", "VALUES"}),
    "TransactionStmt": frozenset(
        {"BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT", "RELEASE", "PREPARE"}
    ),
    "VariableSetStmt": frozenset({"SET", "RESET"}),
    "VariableShowStmt": frozenset({"SHOW"}),
    "FetchStmt": frozenset({"FETCH", "MOVE"}),
    "ClosePortalStmt": frozenset({"CLOSE"}),
    "ConstraintsSetStmt": frozenset({"SET"}),
    "VacuumStmt": frozenset({"VACUUM", "ANALYZE", "ANALYSE"}),
    "CheckPointStmt": frozenset({"CHECKPOINT"}),
    "GrantStmt": frozenset({"GRANT", "REVOKE"}),
    "GrantRoleStmt": frozenset({"GRANT", "REVOKE"}),
    "SecLabelStmt": frozenset({"SECURITY"}),
    "RenameStmt": frozenset({"ALTER"}),
    "IndexStmt": frozenset({"CREATE"}),
    "ViewStmt": frozenset({"CREATE"}),
    "RuleStmt": frozenset({"CREATE"}),
    "DefineStmt": frozenset({"CREATE"}),
    "CompositeTypeStmt": frozenset({"CREATE"}),
    "CreatedbStmt": frozenset({"CREATE"}),
    "DropdbStmt": frozenset({"DROP"}),
    "ReplicaIdentityStmt": frozenset({"ALTER"}),
}


def statement_words(node_type: str) -> frozenset[str]:
    found = WORDS.get(node_type)
    if found is not None:
        return found
    first = re.match(r"[A-Z][a-z]*", node_type)
    return frozenset({first.group(0).upper()}) if first else frozenset()
