"""The session phase table: every allowed move, and nothing else."""

from __future__ import annotations

import pytest

from proxy.phases import TRANSITIONS, Phase, PhaseError, advance

EVENTS = sorted({event for _, event in TRANSITIONS} | {"bogus"})


def test_a_session_lifecycle() -> None:
    phase = Phase.STARTUP
    for event, expected in [
        ("startup", Phase.AUTH),
        ("authenticated", Phase.CONNECTING),
        ("upstream_ready", Phase.READY),
        ("forward", Phase.IN_QUERY),
        ("copy", Phase.IN_COPY),
        ("forward", Phase.IN_COPY),
        ("idle", Phase.READY),
        ("hold", Phase.HELD),
        ("release", Phase.IN_QUERY),
        ("idle", Phase.READY),
        ("close", Phase.CLOSED),
    ]:
        phase = advance(phase, event)
        assert phase is expected


@pytest.mark.parametrize(("start", "event"), sorted(TRANSITIONS))
def test_every_table_entry(start: Phase, event: str) -> None:
    assert advance(start, event) is TRANSITIONS[(start, event)]


@pytest.mark.parametrize("phase", list(Phase))
def test_close_is_allowed_from_every_phase(phase: Phase) -> None:
    assert advance(phase, "close") is Phase.CLOSED


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("event", EVENTS)
def test_events_outside_the_table_are_errors(phase: Phase, event: str) -> None:
    if (phase, event) in TRANSITIONS:
        return
    with pytest.raises(PhaseError, match=event):
        advance(phase, event)


def test_nothing_leaves_closed_but_close() -> None:
    assert not [event for (phase, event) in TRANSITIONS if phase is Phase.CLOSED]


def test_nothing_is_forwarded_while_held_or_before_ready() -> None:
    for phase in (Phase.STARTUP, Phase.AUTH, Phase.CONNECTING, Phase.HELD, Phase.CONSOLE,
                  Phase.CLOSED):
        assert (phase, "forward") not in TRANSITIONS


def test_every_phase_is_reachable_from_startup() -> None:
    seen = {Phase.STARTUP}
    frontier = [Phase.STARTUP]
    while frontier:
        current = frontier.pop()
        for (phase, _), target in TRANSITIONS.items():
            if phase is current and target not in seen:
                seen.add(target)
                frontier.append(target)
    assert seen | {Phase.CLOSED} == set(Phase)
