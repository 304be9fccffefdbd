"""Statement auditing: durable events are group-committed on a real SQLite store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from approvals.store import StoreError, open_store
from proxy.statement_audit import StatementAuditor


class CountingStore:
    """A real store, counting how many batches reach it."""

    def __init__(self, store) -> None:
        self.store = store
        self.batches: list[int] = []

    async def append_audit_many(self, events):
        self.batches.append(len(events))
        return await self.store.append_audit_many(events)

    async def append_audit(self, event):
        self.batches.append(1)
        return await self.store.append_audit(event)


async def test_concurrent_durable_events_share_one_commit(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path}/a.db")
    counting = CountingStore(store)
    auditor = StatementAuditor(counting)  # type: ignore[arg-type]
    runner = asyncio.create_task(auditor.run(interval=0.05))
    await asyncio.sleep(0)
    try:
        auditor.enqueue({"type": "statement.denied", "actor": "mallory"})
        await asyncio.gather(*(auditor.durable({"type": "statement.allowed", "actor": f"u{i}"})
                               for i in range(20)))
        assert sum(counting.batches) == 21 and len(counting.batches) < 20
        events = await store.audit(None, 100)
        assert sorted(e.actor for e in events if e.type == "statement.allowed") == sorted(
            f"u{i}" for i in range(20))
        assert (await store.verify_audit()).ok
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await store.close()


async def test_durable_event_fails_when_the_store_cannot_be_written(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path}/a.db")
    auditor = StatementAuditor(store)
    runner = asyncio.create_task(auditor.run(interval=0.05))
    await asyncio.sleep(0)
    await store.close()
    (tmp_path / "a.db").unlink()
    (tmp_path / "a.db").mkdir()
    try:
        with pytest.raises(StoreError):
            await asyncio.wait_for(auditor.durable({"type": "statement.allowed", "actor": "a"}), 10)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
