"""ExtendedTracker: which SQL an extended-protocol Execute will really run.

The safety rule under test: at the moment an Execute is forwarded, the
tracker names either the SQL the server will run, or nothing (``sql=None``,
"cannot tell", treated as the strictest case) -- never some other SQL. The
last test checks that rule against a model of PostgreSQL's own handling of
statements, portals, errors and Sync, for arbitrary pipelined sessions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.decide import Statement
from proxy.extended import ExtendedTracker, PreparedSql

DELETE = "DELETE FROM accounts"
SELECT = "SELECT 1"


# --------------------------------------------------------------------------
# helpers: the calls the session makes, named after the protocol messages
# --------------------------------------------------------------------------
def cycle_ok(t: ExtendedTracker, parses: int = 0, binds: int = 0, status: str = "I") -> None:
    """The server's answer to one cycle that succeeded: 1s and 2s in order, then Z."""
    for _ in range(parses):
        t.parse_complete()
    for _ in range(binds):
        t.bind_complete()
    ready(t, status)


def ready(t: ExtendedTracker, status: str = "I") -> None:
    t.ready()
    if status == "I":
        t.transaction_ended()


def prepared(t: ExtendedTracker, name: str, sql: str) -> None:
    """Prepare ``name`` and have the server confirm it (one full round trip)."""
    t.parse(name, sql, ())
    t.sync()
    cycle_ok(t, parses=1)


# --------------------------------------------------------------------------
# the basics
# --------------------------------------------------------------------------
def test_unnamed_parse_bind_execute() -> None:
    t = ExtendedTracker()
    t.parse("", "SELECT $1::int", (23,))
    t.bind("", "", (b"1",), (0,))
    assert t.execute("") == Statement("SELECT $1::int", "execute", (b"1",), (0,), (23,))


def test_named_statement_and_portal() -> None:
    t = ExtendedTracker()
    t.parse("s1", "SELECT $1", (25,))
    t.bind("p1", "s1", (None,), ())
    assert t.execute("p1") == Statement("SELECT $1", "execute", (None,), (), (25,))
    assert t.execute("") == Statement(None, "execute")


def test_execute_of_an_unknown_portal_is_unknown() -> None:
    t = ExtendedTracker()
    assert t.execute("nope") == Statement(None, "execute")
    t.bind("", "never-prepared", (), ())
    assert t.execute("") == Statement(None, "execute")


def test_confirmation_moves_pending_into_the_known_maps() -> None:
    t = ExtendedTracker()
    t.parse("s1", SELECT, (23,))
    t.bind("p1", "s1", (), ())
    t.sync()
    assert t.statements == {} and t.portals == {}
    t.parse_complete()
    assert t.statements == {"s1": PreparedSql(SELECT, (23,))}
    t.bind_complete()
    assert t.portals == {"p1": Statement(SELECT, "execute", (), (), (23,))}
    ready(t, "T")
    assert t.execute("p1").sql == SELECT
    t.bind("", "s1", (), ())
    assert t.execute("").sql == SELECT  # the confirmed statement serves later binds


def test_confirmations_match_parses_in_order_across_cycles() -> None:
    t = ExtendedTracker()
    t.parse("a", "SELECT 'a'", ())
    t.sync()
    t.parse("b", "SELECT 'b'", ())
    t.sync()
    t.parse_complete()
    assert set(t.statements) == {"a"}
    ready(t)
    t.parse_complete()
    assert t.statements["b"].sql == "SELECT 'b'"


def test_stray_confirmations_are_ignored() -> None:
    t = ExtendedTracker()
    t.parse_complete()
    t.bind_complete()
    t.error()
    t.ready()
    assert t.statements == {} and t.portals == {}


def test_bind_complete_of_an_unresolvable_bind_stays_unknown() -> None:
    t = ExtendedTracker()
    t.bind("p1", "ghost", (), ())
    t.sync()
    t.bind_complete()
    ready(t, "T")
    assert t.portals == {"p1": None}
    assert t.execute("p1") == Statement(None, "execute")


def test_identical_redefinition_is_still_known() -> None:
    t = ExtendedTracker()
    prepared(t, "s1", SELECT)
    t.parse("s1", SELECT, ())
    t.bind("", "s1", (), ())
    assert t.execute("").sql == SELECT


# --------------------------------------------------------------------------
# the unnamed statement
# --------------------------------------------------------------------------
def test_unnamed_parse_replaces_the_previous_one() -> None:
    t = ExtendedTracker()
    prepared(t, "", DELETE)
    t.parse("", SELECT, ())
    t.bind("", "", (), ())
    assert t.execute("").sql == SELECT


def test_unnamed_statement_survives_sync_until_replaced() -> None:
    t = ExtendedTracker()
    prepared(t, "", SELECT)
    t.bind("", "", (), ())
    assert t.execute("").sql == SELECT


# --------------------------------------------------------------------------
# the named-statement redefinition attack (see proxy/extended.py)
# --------------------------------------------------------------------------
def test_redefinition_in_the_same_cycle_is_believed_because_failure_skips_the_rest() -> None:
    # PostgreSQL refuses the Parse (s1 exists) and then skips Bind and Execute
    # up to Sync, so the SELECT it names never runs, and neither does the DELETE.
    t = ExtendedTracker()
    prepared(t, "s1", DELETE)
    t.parse("s1", SELECT, ())
    t.bind("", "s1", (), ())
    assert t.execute("").sql == SELECT
    t.sync()
    t.error()
    ready(t)
    t.bind("", "s1", (), ())
    assert t.execute("").sql == DELETE


def test_refused_redefinition_leaves_the_old_statement() -> None:
    t = ExtendedTracker()
    prepared(t, "s1", DELETE)
    t.parse("s1", SELECT, ())
    t.bind("", "s1", (), ())
    t.execute("")
    t.sync()
    t.error()  # 42P05 prepared statement "s1" already exists
    ready(t)
    t.bind("", "s1", (), ())
    assert t.execute("").sql == DELETE


def test_pipelined_redefinition_of_a_confirmed_statement_is_unknown() -> None:
    t = ExtendedTracker()
    prepared(t, "s1", DELETE)
    t.parse("s1", SELECT, ())
    t.sync()
    t.bind("", "s1", (), ())  # sent before the server refused the Parse
    assert t.execute("").sql in (None, DELETE)


def test_pipelined_redefinition_of_an_unconfirmed_statement_is_not_believed() -> None:
    # Everything in one write, before any answer: the first Parse succeeds
    # upstream, the second is refused (s1 exists), and the Bind in the third
    # cycle binds the DELETE.
    t = ExtendedTracker()
    t.parse("s1", DELETE, ())
    t.sync()
    t.parse("s1", SELECT, ())
    t.sync()
    t.bind("", "s1", (), ())
    assert t.execute("").sql in (None, DELETE)


def test_pipelined_redefinition_of_an_unconfirmed_portal_is_not_believed() -> None:
    # Same attack on a named portal inside a transaction block (a savepoint
    # rolled back after the refused Bind keeps the first portal usable).
    t = ExtendedTracker()
    prepared(t, "del", DELETE)
    prepared(t, "sel", SELECT)
    t.bind("p1", "del", (), ())
    t.sync()
    t.bind("p1", "sel", (), ())  # refused upstream: portal "p1" already exists
    t.sync()
    assert t.execute("p1").sql in (None, DELETE)


def test_parse_skipped_after_an_earlier_error_does_not_replace_the_unnamed_statement() -> None:
    # After an error PostgreSQL skips every message up to Sync, so a Parse of the
    # unnamed statement behind a failing message never happens and the old
    # unnamed statement stays. A Bind sent in the next cycle, before the error
    # came back, binds the old one.
    t = ExtendedTracker()
    prepared(t, "", DELETE)
    t.parse("x", "SELEC syntax error", ())
    t.parse("", SELECT, ())
    t.sync()
    t.bind("", "", (), ())
    assert t.execute("").sql in (None, DELETE)


def test_close_skipped_after_an_earlier_error_is_not_believed() -> None:
    # Close behind a failing message is skipped by the server: s1 still exists
    # upstream as the DELETE, so a later (pipelined) redefinition is refused
    # there and Bind s1 runs the DELETE.
    t = ExtendedTracker()
    prepared(t, "s1", DELETE)
    t.parse("x", "SELEC syntax error", ())
    t.close("S", "s1")
    t.sync()
    t.error()
    ready(t)
    t.parse("s1", SELECT, ())
    t.sync()
    t.bind("", "s1", (), ())
    assert t.execute("").sql in (None, DELETE)


# --------------------------------------------------------------------------
# errors, rollback of unforwarded messages, transaction end, Close
# --------------------------------------------------------------------------
def test_error_discards_the_rest_of_the_cycle() -> None:
    t = ExtendedTracker()
    t.parse("a", "SELECT 'a'", ())
    t.parse("b", "SELEC bad", ())
    t.parse("c", "SELECT 'c'", ())  # skipped by the server
    t.sync()
    t.parse("d", "SELECT 'd'", ())
    t.sync()
    t.parse_complete()  # a
    t.error()  # b
    ready(t)
    t.parse_complete()  # d, not c
    ready(t)
    assert set(t.statements) == {"a", "d"}
    assert t.statements["d"].sql == "SELECT 'd'"
    t.bind("", "c", (), ())
    assert t.execute("") == Statement(None, "execute")


def test_error_only_touches_the_oldest_cycle() -> None:
    t = ExtendedTracker()
    t.parse("a", "SELEC bad", ())
    t.sync()
    t.parse("b", SELECT, ())
    t.sync()
    t.error()
    ready(t)
    t.parse_complete()
    assert set(t.statements) == {"b"}


def test_rollback_forgets_messages_that_were_never_forwarded() -> None:
    t = ExtendedTracker()
    t.parse("kept", SELECT, ())
    mark = t.mark()
    t.parse("denied", DELETE, ())
    t.bind("p", "denied", (), ())
    t.rollback(mark)
    t.bind("", "denied", (), ())
    assert t.execute("") == Statement(None, "execute")
    assert t.execute("p") == Statement(None, "execute")
    t.sync()
    t.parse_complete()  # "kept"; "denied" was rolled back and is never answered
    t.bind_complete()
    ready(t)
    assert set(t.statements) == {"kept"}


def test_rollback_to_the_start_of_an_empty_cycle() -> None:
    t = ExtendedTracker()
    mark = t.mark()
    assert mark == 0
    t.parse("s", DELETE, ())
    t.rollback(mark)
    t.sync()
    t.parse_complete()
    assert t.statements == {}


def test_portals_are_cleared_at_transaction_end() -> None:
    t = ExtendedTracker()
    prepared(t, "s1", SELECT)
    t.bind("p1", "s1", (), ())
    t.bind("", "s1", (), ())
    t.sync()
    cycle_ok(t, binds=2, status="T")  # inside BEGIN ... : portals live on
    assert t.execute("p1").sql == SELECT
    assert t.execute("").sql == SELECT
    t.sync()
    ready(t, "I")  # COMMIT
    assert t.portals == {}
    assert t.execute("p1") == Statement(None, "execute")
    assert t.execute("").sql is None
    assert "s1" in t.statements  # prepared statements are not transactional


def test_failed_transaction_status_keeps_portals() -> None:
    t = ExtendedTracker()
    prepared(t, "s1", SELECT)
    t.bind("p1", "s1", (), ())
    t.sync()
    cycle_ok(t, binds=1, status="E")
    assert t.execute("p1").sql == SELECT


def test_close_statement_and_portal() -> None:
    t = ExtendedTracker()
    prepared(t, "s1", SELECT)
    t.bind("p1", "s1", (), ())
    t.sync()
    cycle_ok(t, binds=1, status="T")
    t.close("P", "p1")
    assert t.execute("p1").sql in (None, SELECT)
    t.close("S", "s1")
    t.bind("", "s1", (), ())
    assert t.execute("").sql in (None, SELECT)
    t.sync()
    t.close_complete()  # p1
    t.close_complete()  # s1
    t.bind_complete()  # the Bind of s1 fails upstream in reality; either way:
    ready(t)
    t.bind("", "s1", (), ())
    assert t.execute("") == Statement(None, "execute")
    t.close("S", "never-existed")
    t.close("P", "never-existed")


def test_close_then_redefine_in_one_cycle() -> None:
    t = ExtendedTracker()
    prepared(t, "s1", DELETE)
    t.close("S", "s1")
    t.parse("s1", SELECT, ())
    t.bind("", "s1", (), ())
    assert t.execute("").sql in (None, SELECT)


# --------------------------------------------------------------------------
# model-based: any pipelined session against a model of PostgreSQL
# --------------------------------------------------------------------------
@dataclass
class ModelServer:
    """PostgreSQL's handling of Parse/Bind/Execute/Close/Sync, reduced to names.

    Every Sync ends an implicit transaction (portals go away); an error skips
    the rest of the cycle; the unnamed statement is dropped by every Parse of
    it that is processed, even one that then fails; named objects are never
    redefined.
    """

    statements: dict[str, str] = field(default_factory=dict)
    portals: dict[str, str] = field(default_factory=dict)
    skipping: bool = False

    def run_cycle(self, messages: list[tuple[str, ...]]) -> tuple[list[str], list[str | None]]:
        """Replies ("1", "2", "E", "Z") and, per Execute, the SQL run (None: not run)."""
        replies: list[str] = []
        runs: list[str | None] = []
        for msg in messages:
            if self.skipping:
                if msg[0] == "E":
                    runs.append(None)
                continue
            if msg[0] == "P":
                _, name, sql = msg
                if name == "":
                    self.statements.pop("", None)
                if sql == "BAD" or (name and name in self.statements):
                    self._error(replies)
                    continue
                self.statements[name] = sql
                replies.append("1")
            elif msg[0] == "B":
                _, portal, stmt = msg
                if stmt not in self.statements or (portal and portal in self.portals):
                    self._error(replies)
                    continue
                self.portals[portal] = self.statements[stmt]
                replies.append("2")
            elif msg[0] == "E":
                if msg[1] not in self.portals:
                    runs.append(None)
                    self._error(replies)
                    continue
                runs.append(self.portals[msg[1]])
            else:
                _, which, name = msg  # Close
                (self.statements if which == "S" else self.portals).pop(name, None)
        self.skipping = False
        self.portals.clear()
        replies.append("Z")
        return replies, runs

    def _error(self, replies: list[str]) -> None:
        replies.append("E")
        self.skipping = True


stmt_names = st.sampled_from(["", "s1"])
portal_names = st.sampled_from(["", "p1"])
sqls = st.sampled_from([SELECT, DELETE, "BAD"])
messages = st.one_of(
    st.tuples(st.just("P"), stmt_names, sqls),
    st.tuples(st.just("B"), portal_names, stmt_names),
    st.tuples(st.just("E"), portal_names),
    st.tuples(st.just("C"), st.sampled_from(["S", "P"]), stmt_names),
    # the usual Bind + Execute pair, so that executions are frequent
    st.tuples(st.just("B"), portal_names, stmt_names).map(lambda b: (*b, "E")),
)
# A session: cycles of messages, each ended by Sync, and after each cycle how
# many outstanding cycles the server's answers have reached the proxy for
# (mostly 0: the client pipelines on without waiting).
sessions = st.lists(
    st.tuples(st.lists(messages, min_size=1, max_size=3), st.sampled_from([0, 0, 0, 1, 2])),
    min_size=2, max_size=6,
)


def expand(batch: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for msg in batch:
        if msg[-1] == "E" and msg[0] == "B":
            out += [msg[:3], ("E", msg[1])]
        else:
            out.append(msg)
    return out


def deliver(t: ExtendedTracker, replies: list[str]) -> None:
    for reply in replies:
        if reply == "1":
            t.parse_complete()
        elif reply == "2":
            t.bind_complete()
        elif reply == "E":
            t.error()
        else:
            ready(t, "I")


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sessions)
# the attacks above, as sessions (random search rarely lines up three cycles)
@example([([("P", "s1", DELETE)], 0), ([("P", "s1", SELECT)], 0),
          ([("B", "", "s1", "E")], 0)])
@example([([("P", "", DELETE)], 1), ([("P", "s1", "BAD"), ("P", "", SELECT)], 0),
          ([("B", "", "", "E")], 0)])
@example([([("P", "s1", DELETE)], 1), ([("P", "", "BAD"), ("C", "S", "s1")], 1),
          ([("P", "s1", SELECT)], 0), ([("B", "", "s1", "E")], 0)])
def test_execute_never_names_sql_other_than_what_runs(
    session: list[tuple[list[tuple[str, ...]], int]],
) -> None:
    t = ExtendedTracker()
    server = ModelServer()
    checks: list[tuple[str | None, str | None]] = []  # (vouched for, actually ran)
    unanswered: list[list[str]] = []  # server replies not yet seen by the proxy
    for compact, answered in session:
        batch = expand(compact)
        predictions: list[str | None] = []
        for msg in batch:
            if msg[0] == "P":
                t.parse(msg[1], msg[2], ())
            elif msg[0] == "B":
                t.bind(msg[1], msg[2], (), ())
            elif msg[0] == "E":
                predictions.append(t.execute(msg[1]).sql)
        for msg in batch:
            if msg[0] == "C":  # the session applies Close once the batch is allowed
                t.close(msg[1], msg[2])
        t.sync()
        replies, runs = server.run_cycle(batch)
        unanswered.append(replies)
        checks += zip(predictions, runs, strict=True)
        for _ in range(min(answered, len(unanswered))):
            deliver(t, unanswered.pop(0))
    for vouched, ran in checks:
        assert vouched is None or ran is None or vouched == ran, (
            f"the proxy vouched for {vouched!r} while {ran!r} ran"
        )
