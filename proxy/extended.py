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

from proxy.decide import Statement


@dataclass(frozen=True, slots=True)
class PreparedSql:
    sql: str
    param_types: tuple[int, ...]


@dataclass(slots=True)
class _Op:
    kind: str  # "P" (Parse) or "B" (Bind)
    name: str
    value: PreparedSql | Statement | None


class ExtendedTracker:
    """Statements and portals as the server knows them, plus what is in flight."""

    __slots__ = ("_cycles", "portals", "statements")

    def __init__(self) -> None:
        self.statements: dict[str, PreparedSql] = {}
        self.portals: dict[str, Statement | None] = {}
        # One list of forwarded, not yet acknowledged Parse/Bind per sync cycle,
        # oldest first; the server answers them strictly in order.
        self._cycles: deque[deque[_Op]] = deque()

    # -- what the client sends (called when the messages are forwarded) ------
    def _open(self) -> deque[_Op]:
        if not self._cycles:
            self._cycles.append(deque())
        return self._cycles[-1]

    def _pending(self, kind: str, name: str) -> list[_Op]:
        return [op for cycle in self._cycles for op in cycle if op.kind == kind and op.name == name]

    def resolve_statement(self, name: str) -> PreparedSql | None:
        """The statement a Bind of ``name`` will use, or None if it cannot be told."""
        pending = self._pending("P", name)
        if pending:
            newest = pending[-1].value
            assert newest is None or isinstance(newest, PreparedSql)
            if name == "":
                return newest  # an unnamed Parse always replaces the previous one
            older = self.statements.get(name)
            if older is not None and older != newest:
                return None
            return newest
        return self.statements.get(name)

    def resolve_portal(self, portal: str) -> Statement | None:
        pending = self._pending("B", portal)
        if pending:
            newest = pending[-1].value
            assert newest is None or isinstance(newest, Statement)
            if portal == "":
                return newest
            older = self.portals.get(portal)
            if older is not None and older != newest:
                return None
            return newest
        return self.portals.get(portal)

    def parse(self, name: str, sql: str, param_types: tuple[int, ...]) -> None:
        self._open().append(_Op("P", name, PreparedSql(sql, param_types)))

    def bind(self, portal: str, statement: str, params: tuple[bytes | None, ...],
             formats: tuple[int, ...]) -> None:
        prepared = self.resolve_statement(statement)
        value = None if prepared is None else Statement(
            prepared.sql, "execute", params, formats, prepared.param_types
        )
        self._open().append(_Op("B", portal, value))

    def execute(self, portal: str) -> Statement:
        found = self.resolve_portal(portal)
        return found if found is not None else Statement(None, "execute")

    def close(self, which: str, name: str) -> None:
        # Close is acknowledged with CloseComplete and never fails for a missing
        # name, so forgetting it at once is exact.
        if which == "S":
            self.statements.pop(name, None)
        else:
            self.portals.pop(name, None)

    def mark(self) -> int:
        """Where the open cycle ends now; :meth:`rollback` forgets what came after."""
        return len(self._open())

    def rollback(self, mark: int) -> None:
        """Forget Parse/Bind recorded since ``mark``: they were never forwarded."""
        cycle = self._open()
        while len(cycle) > mark:
            cycle.pop()

    def sync(self) -> None:
        """The client's Sync (or a simple Query) ends the open cycle."""
        self._open()
        self._cycles.append(deque())

    # -- what the server answers ----------------------------------------------
    def parse_complete(self) -> None:
        op = self._first()
        if op is not None and op.kind == "P" and isinstance(op.value, PreparedSql):
            self.statements[op.name] = op.value

    def bind_complete(self) -> None:
        op = self._first()
        if op is not None and op.kind == "B":
            value = op.value
            self.portals[op.name] = value if isinstance(value, Statement) else None

    def _first(self) -> _Op | None:
        if self._cycles and self._cycles[0]:
            return self._cycles[0].popleft()
        return None

    def error(self) -> None:
        """An ErrorResponse: the server skips everything up to the next Sync."""
        if self._cycles:
            self._cycles[0].clear()

    def ready(self) -> None:
        """ReadyForQuery ends the oldest cycle. The unnamed portal dies with a transaction."""
        if len(self._cycles) > 1:
            self._cycles.popleft()
        elif self._cycles:
            self._cycles[0].clear()

    def transaction_ended(self) -> None:
        """Idle status: every portal is gone upstream."""
        self.portals.clear()
