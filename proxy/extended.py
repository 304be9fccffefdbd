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
from dataclasses import dataclass
from itertools import islice
from typing import TypeVar, cast

from proxy.decide import Statement


@dataclass(frozen=True, slots=True)
class PreparedSql:
    sql: str
    param_types: tuple[int, ...]


@dataclass(slots=True)
class _Op:
    kind: str  # "P" (Parse), "B" (Bind) or "C" (Close: name is "S..." or "P...")
    name: str
    value: PreparedSql | Statement | None


_V = TypeVar("_V", PreparedSql, Statement | None)


class ExtendedTracker:
    """Statements and portals as the server knows them, plus what is in flight."""

    __slots__ = ("_cycles", "portals", "statements")

    def __init__(self) -> None:
        self.statements: dict[str, PreparedSql] = {}
        self.portals: dict[str, Statement | None] = {}
        # Forwarded, not yet acknowledged Parse/Bind/Close, one deque per sync
        # cycle, oldest first; the server answers them strictly in order. The
        # last deque is the open cycle (no Sync sent yet).
        self._cycles: deque[deque[_Op]] = deque([deque()])

    # -- resolution ---------------------------------------------------------------
    def _resolve(self, kind: str, name: str, confirmed: dict[str, _V]) -> _V | None:
        """What a reference to ``name`` will use upstream, or None if it cannot be told.

        A definition earlier in the *same* cycle wins: if it fails, the server
        skips the rest of the cycle, so nothing that refers to it runs. A
        definition from an earlier, unanswered cycle may fail (a name that
        exists, a message skipped after an error), so it is believed only when
        it agrees with every other candidate, the confirmed one included.
        """
        cycles = self._cycles
        for op in reversed(cycles[-1]):
            if op.kind == kind and op.name == name:
                return cast("_V | None", op.value)
        if len(cycles) == 1:  # nothing older in flight: the common case
            return confirmed.get(name)
        candidates: list[_V | None] = []
        if name in confirmed:
            candidates.append(confirmed[name])
        for cycle in islice(cycles, len(cycles) - 1):
            for op in cycle:
                if op.kind == kind and op.name == name:
                    candidates.append(cast("_V | None", op.value))
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
        self._cycles[-1].append(_Op("P", name, PreparedSql(sql, param_types)))

    def bind(self, portal: str, statement: str, params: tuple[bytes | None, ...],
             formats: tuple[int, ...]) -> None:
        prepared = self.resolve_statement(statement)
        value = None if prepared is None else Statement(
            prepared.sql, "execute", params, formats, prepared.param_types
        )
        self._cycles[-1].append(_Op("B", portal, value))

    def execute(self, portal: str) -> Statement:
        found = self.resolve_portal(portal)
        return found if found is not None else Statement(None, "execute")

    def close(self, which: str, name: str) -> None:
        """A Close takes effect when the server acknowledges it (CloseComplete)."""
        self._cycles[-1].append(_Op("C", which + name, None))

    def mark(self) -> int:
        """Where the open cycle ends now; :meth:`rollback` forgets what came after."""
        return len(self._cycles[-1])

    def rollback(self, mark: int) -> None:
        """Forget messages recorded since ``mark``: they were never forwarded."""
        cycle = self._cycles[-1]
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
        self._cycles.append(deque())

    # -- what the server answers ----------------------------------------------
    def _acknowledged(self, kind: str) -> _Op | None:
        cycle = self._cycles[0]
        if not cycle:
            return None
        op = cycle.popleft()
        if op.kind != kind:
            # Out of step with the server: forget everything, so every later
            # Execute is "cannot tell" (the strictest case) until redefined.
            self.reset()
            return None
        return op

    def parse_complete(self) -> None:
        op = self._acknowledged("P")
        if op is not None and isinstance(op.value, PreparedSql):
            self.statements[op.name] = op.value

    def bind_complete(self) -> None:
        op = self._acknowledged("B")
        if op is not None:
            self.portals[op.name] = op.value if isinstance(op.value, Statement) else None

    def close_complete(self) -> None:
        op = self._acknowledged("C")
        if op is not None:
            target = self.statements if op.name[0] == "S" else self.portals
            target.pop(op.name[1:], None)

    def error(self) -> None:
        """An ErrorResponse: the server skips everything up to the next Sync."""
        self._cycles[0].clear()

    def ready(self) -> None:
        """ReadyForQuery ends the oldest cycle."""
        if len(self._cycles) > 1:
            self._cycles.popleft()
        else:
            self._cycles[0].clear()

    def transaction_ended(self) -> None:
        """Idle status: every portal is gone upstream."""
        self.portals.clear()
