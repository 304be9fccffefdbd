"""What deciders receive: ``Unit`` behaves as the dataclass it replaced (compiled too)."""

from __future__ import annotations

import pytest

from proxy.decide import Statement, Unit


def test_units_compare_by_statements_and_kind() -> None:
    one = Unit((Statement("SELECT 1"),))
    assert one == Unit((Statement("SELECT 1"),))
    assert one.extended is False
    assert one != Unit((Statement("SELECT 1"),), True)
    assert one != Unit((Statement("SELECT 2"),))
    assert one != Unit(())
    assert one.__eq__("SELECT 1") is NotImplemented
    assert repr(Unit((), extended=True)) == "Unit(statements=(), extended=True)"


def test_units_are_not_hashable_and_can_be_changed() -> None:
    unit = Unit((Statement("SELECT 1"),))
    with pytest.raises(TypeError):
        hash(unit)
    unit.statements = (Statement("SELECT 2"),)
    unit.extended = True
    assert unit == Unit((Statement("SELECT 2"),), True)
