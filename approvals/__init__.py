"""Holding statements (and JIT grants) for human approval.

Owns, one module each: ``model`` (requests as data, ids, fingerprints),
``workflow`` (the one state machine: every approval rule), ``audit`` (the
hash-chained audit log's format and verification), ``store`` (the storage
contract and ``open_store``) with its backends ``sqlite_store`` and
``pg_store``.

Must not: speak the PostgreSQL protocol, serve HTTP, evaluate policies or
send notifications; the proxy, the API and the notifiers call in here.
"""
