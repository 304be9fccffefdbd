"""The session's hold mechanism, driven by a test Hold (the approvals workflow
plugs into the same interface): nothing reaches upstream until the outcome
is allow; heartbeats; cancel; pipelined input behind the hold; results."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time

import psycopg
import pytest

from proxy import sqlstate
from proxy.decide import ALLOW, Decision, SessionInfo, Unit, deny
from tests.conftest import PASSWORDS, PSQL
from tests.rawclient import SYNC, RawClient, bind, error_fields, execute, parse


class ManualHold:
    heartbeat_interval = 0.3

    def __init__(self, loop: asyncio.AbstractEventLoop, sql: str) -> None:
        self.loop = loop
        self.sql = sql
        self.notice = f"held for approval: {sql}"
        self.future: asyncio.Future[Decision] = loop.create_future()
        self.result: tuple[bool, str | None] | None = None
        self.finished_event = threading.Event()
        self.cancelled: str | None = None
        self.beats = 0

    async def start(self) -> Decision | str:
        return self.notice

    def outcome(self) -> asyncio.Future[Decision]:
        return self.future

    def heartbeat(self) -> str | None:
        self.beats += 1
        return f"still waiting ({self.beats})"

    def cancel(self, reason: str) -> None:
        if self.cancelled is None:  # the first reason counts, as in StatementHold
            self.cancelled = reason
        if not self.future.done():
            self.future.set_result(deny(f"cancelled: {reason}", code=sqlstate.QUERY_CANCELED))

    def finished(self, ok: bool, error: str | None) -> None:
        self.result = (ok, error)
        self.finished_event.set()

    def decide(self, decision: Decision) -> None:
        self.loop.call_soon_threadsafe(
            lambda: self.future.done() or self.future.set_result(decision))


class HoldingDecider:
    """Holds statements containing 'hold_me'; allows the rest."""

    def __init__(self) -> None:
        self.holds: list[ManualHold] = []
        self.new_hold = threading.Condition()

    def decide(self, session: SessionInfo, unit: Unit) -> Decision:
        for st in unit.statements:
            if st.sql and "hold_me" in st.sql:
                hold = ManualHold(asyncio.get_running_loop(), st.sql)
                with self.new_hold:
                    self.holds.append(hold)
                    self.new_hold.notify_all()
                return Decision("hold", hold=hold)
        return ALLOW

    def wait_hold(self, n: int = 1, timeout: float = 10) -> ManualHold:
        with self.new_hold:
            assert self.new_hold.wait_for(lambda: len(self.holds) >= n, timeout)
            return self.holds[n - 1]


@pytest.fixture
def holding(start_proxy):
    decider = HoldingDecider()
    proxy = start_proxy(decider)
    proxy.decider = decider
    return proxy


def test_held_statement_runs_only_after_allow(holding, pg):
    pg.psql("DELETE FROM events WHERE payload = 'hold_me 1'")
    proc = subprocess.Popen(
        [PSQL, "-X", "-At", "-d", holding.dsn("alice"), "-c",
         "INSERT INTO events(payload) VALUES ('hold_me 1') RETURNING 'inserted'"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hold = holding.decider.wait_hold()
    time.sleep(0.8)  # a couple of heartbeats
    assert pg.psql("SELECT count(*) FROM events WHERE payload = 'hold_me 1'").strip() == "0"
    hold.decide(ALLOW)
    out, err = proc.communicate(timeout=20)
    assert "inserted" in out
    assert "held for approval" in err and "still waiting (1)" in err
    assert pg.psql("SELECT count(*) FROM events WHERE payload = 'hold_me 1'").strip() == "1"
    assert hold.finished_event.wait(5) and hold.result == (True, None)


def test_held_statement_denied(holding, pg):
    proc = subprocess.Popen(
        [PSQL, "-X", "-At", "-d", holding.dsn("alice"), "-c",
         "INSERT INTO events(payload) VALUES ('hold_me 2')"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hold = holding.decider.wait_hold()
    hold.decide(deny("bob says no: not during business hours", code=sqlstate.POLICY_DENIED))
    _, err = proc.communicate(timeout=20)
    assert "bob says no" in err
    assert pg.psql("SELECT count(*) FROM events WHERE payload = 'hold_me 2'").strip() == "0"


def test_ctrl_c_cancels_a_held_statement(holding, pg):
    proc = subprocess.Popen(
        [PSQL, "-X", "-At", "-d", holding.dsn("alice"), "-c",
         "INSERT INTO events(payload) VALUES ('hold_me 3')"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hold = holding.decider.wait_hold()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert "cancelled" in err
    assert hold.cancelled == "cancelled by the client"
    assert pg.psql("SELECT count(*) FROM events WHERE payload = 'hold_me 3'").strip() == "0"


def test_failed_execution_is_reported_to_the_hold(holding):
    proc = subprocess.Popen(
        [PSQL, "-X", "-At", "-d", holding.dsn("alice"), "-c", "SELECT 1/0 AS hold_me"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hold = holding.decider.wait_hold()
    hold.decide(ALLOW)
    _, err = proc.communicate(timeout=20)
    assert "division by zero" in err
    assert hold.finished_event.wait(5)
    assert hold.result is not None and hold.result[0] is False and "division" in hold.result[1]


def test_pipelined_messages_behind_a_held_batch_wait_their_turn(holding):
    c = RawClient(holding.port)
    c.startup("alice", PASSWORDS["alice"])
    c.send(parse("", "SELECT 'hold_me'::text") + bind("", "") + execute() + SYNC
           + parse("", "SELECT 'after'::text") + bind("", "") + execute() + SYNC)
    hold = holding.decider.wait_hold()
    kind, body = c.read_message()
    assert kind == "N" and error_fields(body)["C"] == sqlstate.APPROVAL_REQUIRED
    hold.decide(ALLOW)
    msgs = []
    while sum(1 for k, _ in msgs if k == "Z") < 2:
        msgs.append(c.read_message())
    kinds = [k for k, _ in msgs if k != "N"]
    assert kinds == ["1", "2", "D", "C", "Z", "1", "2", "D", "C", "Z"]
    rows = [b for k, b in msgs if k == "D"]
    assert b"hold_me" in rows[0] and b"after" in rows[1]
    c.close()


def test_held_batch_denied_skips_to_sync_and_continues(holding):
    with psycopg.connect(holding.dsn("alice"), autocommit=True) as conn:
        result: dict[str, object] = {}

        def run() -> None:
            try:
                conn.execute("SELECT %s::text AS hold_me", ("x",))
            except psycopg.Error as exc:
                result["error"] = exc

        t = threading.Thread(target=run)
        t.start()
        holding.decider.wait_hold().decide(deny("nope", code=sqlstate.POLICY_DENIED))
        t.join(10)
        assert isinstance(result.get("error"), psycopg.errors.InsufficientPrivilege)
        assert conn.execute("SELECT 5").fetchone() == (5,)


def test_too_much_input_behind_a_hold_is_refused(holding):
    c = RawClient(holding.port)
    c.startup("alice", PASSWORDS["alice"])
    c.send(b"Q" + (4 + len(b"SELECT 'hold_me'\0")).to_bytes(4, "big") + b"SELECT 'hold_me'\0")
    hold = holding.decider.wait_hold()
    filler = parse("", "SELECT '" + "x" * 60_000 + "'") + SYNC
    for _ in range(18):  # just over the 1 MiB limit, so the proxy reads all of it
        c.send(filler)
    msgs = []
    try:
        while (m := c.read_message()) is not None:
            msgs.append(m)
    except ConnectionResetError:
        # the proxy closed with our unread bytes in its socket buffer; the kernel
        # may then reset the connection before the FATAL is read
        pass
    errors = [error_fields(b) for k, b in msgs if k == "E"]
    assert not errors or errors[-1]["C"] == sqlstate.HELD_INPUT_LIMIT
    deadline = time.time() + 5
    while hold.cancelled is None and time.time() < deadline:
        time.sleep(0.05)
    assert hold.cancelled == "the client sent too much data behind a held statement"
    assert not [s for s in holding.server.sessions if s.held is not None]
