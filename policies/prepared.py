"""A session's SQL-level prepared statements, as a pure value.

Owns: how the proxy's per-session map (name → the classified inner
statement) changes after a statement ran, so that ``EXECUTE name`` takes the
kind of what was prepared. Protocol-level prepared statements (Parse with a
name) are the proxy's own business: it classifies their text at Parse.

Must not: keep state itself or talk to the server.

The proxy calls :func:`after_statement` for each statement it forwarded, in
order, saying whether the server confirmed it (CommandComplete). The rules
fail closed:

- PREPARE is recorded even when unconfirmed, merged with any entry of the
  same name (the stricter wins): if it did not run, the server rejects a
  later EXECUTE anyway; if an older entry survives on the server, the map
  still holds something at least as strict.
- DEALLOCATE (and DISCARD ALL) forgets entries only when confirmed: a
  forgotten name makes EXECUTE ``unknown``, so forgetting too early could
  only hide a statement the server still holds.
"""

from __future__ import annotations

from collections.abc import Mapping

from policies.classify import Deallocate, Prepare, StatementInfo, merge_prepared


def after_statement(
    prepared: Mapping[str, StatementInfo], statement: StatementInfo, *, confirmed: bool
) -> dict[str, StatementInfo]:
    """The session's prepared statements after ``statement`` was sent to the server."""
    result = dict(prepared)
    effect = statement.effect
    if isinstance(effect, Prepare):
        result[effect.name] = merge_prepared(result.get(effect.name), effect.statement)
    elif isinstance(effect, Deallocate) and confirmed:
        if effect.name is None:
            result.clear()
        else:
            result.pop(effect.name, None)
    return result
