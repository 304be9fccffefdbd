"""Built-in functions and settings whose use is more than a read or a session change.

Owns: the static tables that turn a function call or a ``SET`` of a setting
into a stricter kind (``SELECT setval(...)`` is a write, ``SELECT
pg_terminate_backend(...)`` is admin, ``SET ROLE`` is a privilege change),
and the small lookups over them. Both readings of a statement (PostgreSQL's
parser and sqlglot) use these tables, so a rule lives in one place.

Must not: parse SQL or look at literal values; a caller that needs a literal
(the setting name passed to ``set_config``) reads it and says so.

Function names are compared by their last component, lowercased, so
``pg_catalog.setval``, ``"setval"`` and ``myschema.setval`` all count: a
same-named function in another schema is judged as strictly as the built-in.
"""

from __future__ import annotations

from policies.kinds import Kind

_SERVER_FILES = "reads or writes files on the database server"
_OTHER_SESSIONS = "acts on other sessions"
_REPLICATION = "manages replication or WAL"
_RUNS_SQL_TEXT = "runs SQL or reads tables named in a string; the classifier cannot vouch for it"
_STATISTICS = "changes the planner's statistics, as ANALYZE does"
_INDEX_MAINTENANCE = "maintains an index, as VACUUM does"

FUNCTIONS: dict[str, tuple[Kind, str]] = {
    # sequences
    "nextval": (Kind.WRITE, "advances a sequence"),
    "setval": (Kind.WRITE, "sets a sequence"),
    # large objects
    "lo_create": (Kind.WRITE, "creates a large object"),
    "lo_creat": (Kind.WRITE, "creates a large object"),
    "lo_from_bytea": (Kind.WRITE, "creates a large object"),
    "lo_open": (Kind.WRITE, "opens a large object (possibly for writing)"),
    "lo_put": (Kind.WRITE, "writes a large object"),
    "lowrite": (Kind.WRITE, "writes a large object"),
    "lo_truncate": (Kind.WRITE, "truncates a large object"),
    "lo_truncate64": (Kind.WRITE, "truncates a large object"),
    "lo_unlink": (Kind.WRITE, "deletes a large object"),
    "lo_import": (Kind.ADMIN, _SERVER_FILES),
    "lo_export": (Kind.ADMIN, _SERVER_FILES),
    # other sessions and cross-session signals
    "pg_notify": (Kind.WRITE, "signals other sessions (NOTIFY)"),
    "pg_cancel_backend": (Kind.ADMIN, _OTHER_SESSIONS),
    "pg_terminate_backend": (Kind.ADMIN, _OTHER_SESSIONS),
    "pg_signal_backend": (Kind.ADMIN, _OTHER_SESSIONS),
    "pg_log_backend_memory_contexts": (Kind.ADMIN, _OTHER_SESSIONS),
    # server administration
    "pg_reload_conf": (Kind.ADMIN, "reloads the server configuration"),
    "pg_rotate_logfile": (Kind.ADMIN, "rotates the server log"),
    "pg_promote": (Kind.ADMIN, _REPLICATION),
    "pg_switch_wal": (Kind.ADMIN, _REPLICATION),
    "pg_backup_start": (Kind.ADMIN, _REPLICATION),
    "pg_backup_stop": (Kind.ADMIN, _REPLICATION),
    "pg_start_backup": (Kind.ADMIN, _REPLICATION),
    "pg_stop_backup": (Kind.ADMIN, _REPLICATION),
    "pg_drop_replication_slot": (Kind.ADMIN, _REPLICATION),
    "pg_replication_slot_advance": (Kind.ADMIN, _REPLICATION),
    "pg_import_system_collations": (Kind.ADMIN, "changes system catalogs"),
    "pg_truncate_visibility_map": (Kind.ADMIN, "changes storage internals"),
    "pg_prewarm": (Kind.ADMIN, "loads relations into memory"),
    "pg_stat_statements_reset": (Kind.ADMIN, "resets server statistics"),
    "pg_stat_file": (Kind.ADMIN, _SERVER_FILES),
    # functions that run SQL given as text, or read a table named in a string
    "query_to_xml": (Kind.UNKNOWN, _RUNS_SQL_TEXT),
    "query_to_xmlschema": (Kind.UNKNOWN, _RUNS_SQL_TEXT),
    "query_to_xml_and_xmlschema": (Kind.UNKNOWN, _RUNS_SQL_TEXT),
    "table_to_xml": (Kind.UNKNOWN, _RUNS_SQL_TEXT),
    "table_to_xmlschema": (Kind.UNKNOWN, _RUNS_SQL_TEXT),
    "table_to_xml_and_xmlschema": (Kind.UNKNOWN, _RUNS_SQL_TEXT),
    "schema_to_xml": (Kind.UNKNOWN, _RUNS_SQL_TEXT),
    "schema_to_xmlschema": (Kind.UNKNOWN, _RUNS_SQL_TEXT),
    "schema_to_xml_and_xmlschema": (Kind.UNKNOWN, _RUNS_SQL_TEXT),
    "database_to_xml": (Kind.UNKNOWN, _RUNS_SQL_TEXT),
    "database_to_xmlschema": (Kind.UNKNOWN, _RUNS_SQL_TEXT),
    "database_to_xml_and_xmlschema": (Kind.UNKNOWN, _RUNS_SQL_TEXT),
    "ts_stat": (Kind.UNKNOWN, _RUNS_SQL_TEXT),
    "ts_rewrite": (Kind.UNKNOWN, _RUNS_SQL_TEXT),  # (tsquery, text): the text is a query
    # tablefunc (an extension; any schema): the text arguments are queries
    "crosstab": (Kind.UNKNOWN, _RUNS_SQL_TEXT),
    "crosstab2": (Kind.UNKNOWN, _RUNS_SQL_TEXT),
    "crosstab3": (Kind.UNKNOWN, _RUNS_SQL_TEXT),
    "crosstab4": (Kind.UNKNOWN, _RUNS_SQL_TEXT),
    "connectby": (Kind.UNKNOWN, _RUNS_SQL_TEXT),
    # planner statistics and index maintenance (what ANALYZE and VACUUM do)
    "pg_restore_relation_stats": (Kind.ADMIN, _STATISTICS),
    "pg_restore_attribute_stats": (Kind.ADMIN, _STATISTICS),
    "pg_clear_relation_stats": (Kind.ADMIN, _STATISTICS),
    "pg_clear_attribute_stats": (Kind.ADMIN, _STATISTICS),
    "brin_summarize_new_values": (Kind.ADMIN, _INDEX_MAINTENANCE),
    "brin_summarize_range": (Kind.ADMIN, _INDEX_MAINTENANCE),
    "brin_desummarize_range": (Kind.ADMIN, _INDEX_MAINTENANCE),
    "gin_clean_pending_list": (Kind.ADMIN, _INDEX_MAINTENANCE),
}

# Families recognised by prefix (checked after the exact table).
FUNCTION_PREFIXES: tuple[tuple[str, Kind, str], ...] = (
    ("dblink", Kind.WRITE, "talks to another database through dblink (it may write there)"),
    ("pg_advisory_", Kind.WRITE, "takes an advisory lock other sessions wait for"),
    ("pg_try_advisory_", Kind.WRITE, "takes an advisory lock other sessions wait for"),
    ("pg_read_", Kind.ADMIN, _SERVER_FILES),
    ("pg_ls_", Kind.ADMIN, _SERVER_FILES),
    ("pg_file_", Kind.ADMIN, _SERVER_FILES),
    ("pg_logdir_", Kind.ADMIN, _SERVER_FILES),
    ("pg_stat_reset", Kind.ADMIN, "resets server statistics"),
    ("pg_create_", Kind.ADMIN, _REPLICATION),
    ("pg_copy_", Kind.ADMIN, _REPLICATION),
    ("pg_logical_", Kind.ADMIN, _REPLICATION),
    ("pg_replication_origin_", Kind.ADMIN, _REPLICATION),
    ("pg_wal_replay_", Kind.ADMIN, _REPLICATION),
)

# ``set_config(name, ...)`` is judged by the setting it changes; see setting_kind().
SET_CONFIG = "set_config"

_PRIVILEGE_SETTINGS = frozenset({"role", "session_authorization"})

# Settings that change how the server lexes the *next* messages: once
# changed, the classifier (which lexes like a default server) could be fooled.
_LEXER_SETTINGS = frozenset({"standard_conforming_strings", "backslash_quote"})

_ADMIN_SETTINGS = frozenset(
    {
        "session_replication_role",  # disables triggers, including foreign keys
        "allow_system_table_mods",
        "zero_damaged_pages",
        "ignore_checksum_failure",
        "ignore_invalid_pages",
        "ignore_system_indexes",
        "lo_compat_privileges",
        "event_triggers",
        "allow_in_place_tablespaces",
    }
)
_ADMIN_SETTING_PREFIXES = ("log_", "debug_", "track_")


def last_name(name: str) -> str:
    """The last component of a possibly schema-qualified function name, lowercased."""
    return name.rsplit(".", 1)[-1].lower()


def function_effect(name: str) -> tuple[Kind, str] | None:
    """The kind a call of ``name`` adds, with a reason; ``None`` for a plain read.

    ``set_config`` is not handled here: its kind depends on its first argument.
    """
    short = last_name(name)
    found = FUNCTIONS.get(short)
    if found is not None:
        return found
    for prefix, kind, reason in FUNCTION_PREFIXES:
        if short.startswith(prefix):
            return kind, reason
    return None


def _is_utf8(encoding: str) -> bool:
    # PostgreSQL compares encoding names ignoring case and non-alphanumerics.
    return "".join(c for c in encoding.lower() if c.isalnum()) in ("utf8", "unicode")


# Settings that let transactions write: pgvouch may log a session in with
# default_transaction_read_only on (see policies.evaluate.may_write).
READ_ONLY_SETTINGS = frozenset({"default_transaction_read_only", "transaction_read_only"})
# Settings whose kind depends on the value set (never shared by shape).
VALUE_DEPENDENT_SETTINGS = frozenset({"client_encoding"}) | READ_ONLY_SETTINGS
_TRUE = frozenset({"on", "true", "yes", "1", "t", "y", "tr", "tru", "ye"})


def setting_kind(
    setting: str, value: str | None = None, *, value_readable: bool = True
) -> tuple[Kind, str]:
    """The kind of changing (SET, RESET or set_config) the named setting.

    ``value`` is the new value when given as a literal (None for RESET or
    DEFAULT); ``value_readable`` is False when it is an expression. Only
    ``client_encoding`` depends on it: any encoding but UTF-8 changes how
    the server reads the bytes of later messages (a multibyte character may
    end in a backslash), so the classifier could no longer vouch for them.
    """
    name = setting.strip().lower()
    if name == "client_encoding":
        if value_readable and (value is None or _is_utf8(value)):
            return Kind.SESSION, "sets client_encoding to UTF-8 (or its default)"
        return Kind.UNKNOWN, (
            "changes client_encoding away from UTF-8, which changes how the server reads "
            "later messages; the classifier could no longer vouch for them"
        )
    if name in READ_ONLY_SETTINGS:
        # RESET default_transaction_read_only returns to the login value (pgvouch's
        # "on" for a read-only session); RESET transaction_read_only returns to the
        # built-in default, off (PostgreSQL 15 and older accept it in a transaction)
        if value is None and value_readable and name == "default_transaction_read_only":
            return Kind.SESSION, f"resets {name} to the session's default"
        if value_readable and value is not None and value.strip().lower() in _TRUE:
            return Kind.SESSION, f"turns {name} on"
        return Kind.WRITE, f"changes {name}, which lets transactions write"
    if name in _PRIVILEGE_SETTINGS:
        return Kind.PRIVILEGE, f"changes {name}, i.e. the privileges in effect"
    if name in _LEXER_SETTINGS:
        return Kind.UNKNOWN, (
            f"changes {name}, which changes how string literals are read; "
            "the classifier could no longer vouch for later statements"
        )
    if name in _ADMIN_SETTINGS or name.startswith(_ADMIN_SETTING_PREFIXES):
        return Kind.ADMIN, f"changes {name}, a server-administration setting"
    return Kind.SESSION, f"changes the session setting {name}"
