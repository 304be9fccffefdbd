"""Which SQL an extended-protocol Execute really runs.

Owns: the per-session map of prepared statements and portals, mirrored from
what the upstream server *confirmed* (ParseComplete, BindComplete), so that
an Execute is classified by the statement that will actually run.

Why confirmation matters: PostgreSQL refuses to redefine an existing named
statement or portal and keeps the old one. If the proxy believed every Parse
it forwarded, a client could prepare ``s1`` as a DELETE (never executing it),
then send ``Parse s1 AS SELECT 1`` (refused upstream, but believed here) and
execute ``s1``: the proxy would vouch for a SELECT while the DELETE runs.
So a definition counts only once the server acknowledged it; until then a
lookup sees the pending definition when nothing older exists, and "cannot
tell" (``None``: the strictest case) when an older, different one does.

Must not: do I/O or decide anything.
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from typing import NamedTuple, TypeVar, cast

from proxy.decide import Statement


class PreparedSql(NamedTuple):
    sql: str
    param_types: tuple[int, ...]


# One forwarded, not yet acknowledged message: (kind, name, value). kind is
# "P" (Parse), "B" (Bind) or "C" (Close: name is "S..." or "P...").
_Op = tuple[str, str, "PreparedSql | Statement | None"]

_V = TypeVar("_V", PreparedSql, Statement | None)


def _as_statement(value: object) -> Statement:
    """What an Execute runs: the bound statement, or "cannot tell" (see Statement)."""
    return value if isinstance(value, Statement) else Statement(None, "execute")


class ExtendedTracker:
    """Statements and portals as the server knows them, plus what is in flight."""

    __slots__ = ("_cycles", "_open", "_spare", "portals", "statements")

    def __init__(self) -> None:
        self.statements: dict[str, PreparedSql] = {}
        self.portals: dict[str, Statement | None] = {}
        # Forwarded, not yet acknowledged Parse/Bind/Close, one deque per sync
        # cycle, oldest first; the server answers them strictly in order. The
        # last deque is the open cycle (no Sync sent yet), also kept as _open.
        self._open: deque[_Op] = deque()
        self._cycles: deque[deque[_Op]] = deque([self._open])
        self._spare: deque[_Op] | None = None  # an answered cycle's deque, emptied

    # -- resolution ---------------------------------------------------------------
    def _resolve(self, kind: str, name: str, confirmed: dict[str, _V]) -> _V | None:
        """What a reference to ``name`` will use upstream, or None if it cannot be told.

        A definition earlier in the *same* cycle wins: if it fails, the server
        skips the rest of the cycle, so nothing that refers to it runs. A
        definition from an earlier, unanswered cycle may fail (a name that
        exists, a message skipped after an error), so it is believed only when
        it agrees with every other candidate, the confirmed one included.
        """
        opened = self._open
        # the message just before (the common case) first, cheaply; then the cycle
        # through reversed(), not by index: a deque's index costs up to len/64 steps
        if opened and opened[-1][0] == kind and opened[-1][1] == name:
            return cast("_V | None", opened[-1][2])
        for op in reversed(opened):
            if op[0] == kind and op[1] == name:
                return cast("_V | None", op[2])
        cycles = self._cycles
        if len(cycles) == 1:  # nothing older in flight: the common case
            return confirmed.get(name)
        candidates: list[_V | None] = []
        if name in confirmed:
            candidates.append(confirmed[name])
        for cycle in islice(cycles, len(cycles) - 1):
            for op in cycle:
                if op[0] == kind and op[1] == name:
                    candidates.append(cast("_V | None", op[2]))
        if not candidates:
            return None
        first = candidates[0]
        return first if all(c == first for c in candidates) else None

    def resolve_statement(self, name: str) -> PreparedSql | None:
        return self._resolve("P", name, self.statements)

    def resolve_portal(self, portal: str) -> Statement | None:
        return self._resolve("B", portal, self.portals)

    # -- what the client sends (recorded as the messages are seen) ---------------
    def parse(self, name: str, sql: str, param_types: tuple[int, ...]) -> None:
        self._open.append(("P", name, PreparedSql(sql, param_types)))

    def parse_prepared(self, name: str, prepared: PreparedSql) -> None:
        self._open.append(("P", name, prepared))

    def bind(self, portal: str, statement: str, params: tuple[bytes | None, ...],
             formats: tuple[int, ...]) -> None:
        prepared = self._resolve("P", statement, self.statements)
        value = None if prepared is None else Statement(
            prepared.sql, "execute", params, formats, prepared.param_types
        )
        self._open.append(("B", portal, value))

    def bind_raw(self, portal: str, statement: str, tail: bytes) -> None:
        """:meth:`bind` with the values still encoded (a validated Bind's bytes
        after its two names); they are decoded only if someone reads them."""
        opened = self._open
        if opened or len(self._cycles) > 1:
            prepared = self._resolve("P", statement, self.statements)
        else:  # nothing in flight (the common case for a prepared statement)
            prepared = self.statements.get(statement)
        value = None if prepared is None else Statement.bound(
            prepared.sql, tail, prepared.param_types
        )
        opened.append(("B", portal, value))

    def execute(self, portal: str) -> Statement:
        opened = self._open
        if opened and opened[-1][0] == "B" and opened[-1][1] == portal:
            return _as_statement(opened[-1][2])  # bound just before (the common case)
        for op in reversed(opened):  # see _resolve
            if op[0] == "B" and op[1] == portal:  # bound in this cycle
                value = op[2]
                break
        else:
            value = self._resolve("B", portal, self.portals)
        return _as_statement(value)

    def close(self, which: str, name: str) -> None:
        """A Close takes effect when the server acknowledges it (CloseComplete)."""
        self._open.append(("C", which + name, None))

    def mark(self) -> int:
        """Where the open cycle ends now; :meth:`rollback` forgets what came after."""
        return len(self._open)

    def rollback(self, mark: int) -> None:
        """Forget messages recorded since ``mark``: they were never forwarded."""
        cycle = self._open
        while len(cycle) > mark:
            cycle.pop()

    def merge_boundary(self, index: int) -> None:
        """A sync point the server ignored (a Sync during COPY IN): join its cycle to the next."""
        if index + 1 >= len(self._cycles):
            return
        ops = self._cycles[index]
        del self._cycles[index]
        self._cycles[index].extendleft(reversed(ops))

    def pending_now(self) -> int:
        """Parse/Bind/Close the server has yet to answer in the cycle it is working on."""
        return len(self._cycles[0])

    def reset(self) -> None:
        """Forget everything: every later Execute is "cannot tell" until redefined."""
        self.statements.clear()
        self.portals.clear()
        for pending in self._cycles:
            pending.clear()

    def sync(self) -> None:
        """The client's Sync (or a simple Query, or a FunctionCall) ends the open cycle."""
        spare = self._spare
        if spare is None:
            spare = deque()
        else:
            self._spare = None
        self._open = spare
        self._cycles.append(spare)

    # -- what the server answers ----------------------------------------------
    def _acknowledged(self, kind: str) -> _Op | None:
        cycle = self._cycles[0]
        if not cycle:
            return None
        op = cycle.popleft()
        if op[0] != kind:
            # Out of step with the server: forget everything, so every later
            # Execute is "cannot tell" (the strictest case) until redefined.
            self.reset()
            return None
        return op

    def parse_complete(self) -> None:
        cycle = self._cycles[0]
        if cycle:
            kind, name, value = cycle.popleft()
            if kind != "P":
                self.reset()  # out of step with the server (see _acknowledged)
            elif isinstance(value, PreparedSql):
                self.statements[name] = value

    def bind_complete(self) -> None:
        cycle = self._cycles[0]
        if cycle:
            kind, name, value = cycle.popleft()
            if kind != "B":
                self.reset()  # out of step with the server (see _acknowledged)
            else:
                self.portals[name] = value if isinstance(value, Statement) else None

    def close_complete(self) -> None:
        op = self._acknowledged("C")
        if op is not None:
            name = op[1]
            target = self.statements if name[0] == "S" else self.portals
            target.pop(name[1:], None)

    def error(self) -> None:
        """An ErrorResponse: the server skips everything up to the next Sync."""
        self._cycles[0].clear()

    def ready(self, idle: bool = False) -> None:
        """ReadyForQuery ends the oldest cycle (``idle``: and the transaction, see below)."""
        cycles = self._cycles
        if len(cycles) > 1:
            done = cycles.popleft()
            done.clear()
            self._spare = done  # the next sync's open cycle: one deque less to allocate
        else:
            cycles[0].clear()
        if idle:
            self.portals.clear()

    def transaction_ended(self) -> None:
        """Idle status: every portal is gone upstream."""
        self.portals.clear()
