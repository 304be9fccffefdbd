"""What one parser's reading says about one statement.

Owns: :class:`Reading`, the accumulator both readers (PostgreSQL's parser in
``pgreading`` and sqlglot in ``sgreading``) fill while walking a statement:
findings (a kind plus the reason for it), the tables it names, the functions
it calls, and two flags the classifier needs to combine the readings.

Must not: parse SQL or decide how two readings are combined (``classify``).
"""

from __future__ import annotations

from policies.kinds import Kind, strictest

ANY_TABLE = "*"
"""Table entry meaning "may touch tables not listed" (DROP SCHEMA, CASCADE, unknown)."""


class Reading:
    """Findings about one statement; mutable while a reader walks it."""

    __slots__ = ("executes", "findings", "functions", "has_query", "literal_dependent", "tables")

    def __init__(self) -> None:
        self.findings: list[tuple[Kind, str]] = []
        self.tables: list[str] = []
        self.functions: list[str] = []
        # True when the reading looked at a literal *value* (set_config's setting
        # name): such a result must not be reused for a text with other literals.
        self.literal_dependent = False
        # True when an executed query (SELECT, VALUES, INSERT, UPDATE, DELETE,
        # MERGE) was read; the other reading must then have read one too.
        self.has_query = False
        # The SQL-level prepared statement this statement runs (EXECUTE name).
        self.executes: str | None = None

    def add(self, kind: Kind, reason: str) -> None:
        if (kind, reason) not in self.findings:
            self.findings.append((kind, reason))

    def table(self, name: str) -> None:
        if name not in self.tables:
            self.tables.append(name)

    def function(self, name: str) -> None:
        if name not in self.functions:
            self.functions.append(name)

    @property
    def kind(self) -> Kind:
        return strictest(kind for kind, _ in self.findings)

    @property
    def reason(self) -> str:
        """The reasons behind the strictest finding, joined."""
        top = self.kind
        reasons = [reason for kind, reason in self.findings if kind is top]
        return "; ".join(reasons)

    def merge(self, other: Reading, *, prefix: str = "") -> None:
        """Fold ``other`` into this reading, optionally prefixing its reasons."""
        for kind, reason in other.findings:
            self.add(kind, prefix + reason)
        for name in other.tables:
            self.table(name)
        for name in other.functions:
            self.function(name)
        self.literal_dependent = self.literal_dependent or other.literal_dependent
        if other.executes is not None:
            self.executes = other.executes
