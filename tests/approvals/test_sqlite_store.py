"""SQLite-only details: WAL with full fsync, one writer thread, migration scripts."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from approvals.sqlite_store import MIGRATIONS, SqliteStore, split_statements
from tests.approvals.helpers import make_request


async def test_wal_and_full_sync(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.db")
    await store.start()
    try:
        # synchronous=FULL (2) on the store's own connection: every commit fsyncs the WAL
        assert await store._run(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0]) == 2
    finally:
        await store.close()
    conn = sqlite3.connect(tmp_path / "store.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent
    finally:
        conn.close()


async def test_all_work_runs_on_one_thread_off_the_event_loop(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.db")
    threads = set()
    try:
        for _ in range(5):
            await store.create(make_request())
            threads.add(await store._run(lambda conn: threading.get_ident()))
    finally:
        await store.close()
    assert len(threads) == 1
    assert threading.get_ident() not in threads


def test_migration_scripts_split_into_statements_keeping_trigger_bodies() -> None:
    statements = split_statements(MIGRATIONS[0])
    triggers = [s for s in statements if s.startswith("CREATE TRIGGER")]
    assert len(triggers) == 2
    assert all(s.endswith("END;") for s in triggers)
    assert all(sqlite3.complete_statement(s) for s in statements)
