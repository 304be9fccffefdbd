"""The client session's phases, as one readable table.

Everything that moves a session from one phase to another is listed in
``TRANSITIONS``; :func:`advance` is the only way to change phase, and an
event the table does not allow is a bug (``PhaseError``), never silently
ignored. Pipelining means several statements may be in flight at once: the
phase says what the oldest one is doing, while the session keeps the count.

Must not: do I/O or look at message contents.
"""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    STARTUP = "startup"  # waiting for the startup packet (SSL/GSS negotiation)
    AUTH = "auth"  # authenticating the client
    CONNECTING = "connecting"  # logging in upstream
    READY = "ready"  # idle: nothing in flight
    IN_QUERY = "in query"  # statements forwarded, results streaming back
    IN_COPY = "in copy"  # a COPY is streaming
    HELD = "held"  # a unit waits for a decision; nothing is forwarded
    CONSOLE = "console"  # the admin console (dbname=pgvouch): the proxy answers itself
    CLOSED = "closed"


class PhaseError(RuntimeError):
    pass


TRANSITIONS: dict[tuple[Phase, str], Phase] = {
    (Phase.STARTUP, "startup"): Phase.AUTH,
    (Phase.AUTH, "authenticated"): Phase.CONNECTING,
    (Phase.CONNECTING, "upstream_ready"): Phase.READY,
    (Phase.CONNECTING, "console"): Phase.CONSOLE,
    (Phase.READY, "forward"): Phase.IN_QUERY,
    (Phase.IN_QUERY, "forward"): Phase.IN_QUERY,
    (Phase.IN_COPY, "forward"): Phase.IN_COPY,
    (Phase.IN_QUERY, "idle"): Phase.READY,
    (Phase.IN_COPY, "idle"): Phase.READY,
    (Phase.READY, "idle"): Phase.READY,
    (Phase.IN_QUERY, "copy"): Phase.IN_COPY,
    (Phase.IN_COPY, "copy"): Phase.IN_COPY,
    (Phase.READY, "hold"): Phase.HELD,
    (Phase.IN_QUERY, "hold"): Phase.HELD,
    (Phase.IN_COPY, "hold"): Phase.HELD,
    (Phase.HELD, "release"): Phase.IN_QUERY,
}


def advance(phase: Phase, event: str) -> Phase:
    if event == "close":
        return Phase.CLOSED
    try:
        return TRANSITIONS[(phase, event)]
    except KeyError:
        raise PhaseError(f"event {event!r} is not allowed in phase {phase.value!r}") from None
