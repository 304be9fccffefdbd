"""PolicyDecider's per-session shortcut: the same text object allowed last time, and
texts of a learnt integer form allowed before.

The shortcut may only ever answer what a full decision would: it must not
outlive a policy reload, a change of the function facts, a session that
changed functions, statements with session effects, or reads that need an
audit event.
"""

from __future__ import annotations

from pathlib import Path

from policies.kinds import Kind
from proxy.decide import SessionInfo, Statement, Unit
from proxy.policy_decider import PolicyDecider, load_live_policies

POLICY = """
policies:
  - name: reads
    match: {resources: ["app"]}
    rules:
      - when: {kinds: [read, session]}
        action: allow
defaults: {action: deny}
"""


def _decider(tmp_path: Path, text: str = POLICY) -> PolicyDecider:
    directory = tmp_path / "policies"
    directory.mkdir(exist_ok=True)
    (directory / "p.yaml").write_text(text)
    return PolicyDecider(load_live_policies(str(directory), {"alice": ()}))


def _session() -> SessionInfo:
    return SessionInfo("s1", "alice", (), "app", "app")


class _Facts:
    def __init__(self) -> None:
        self.current: tuple[frozenset[str], frozenset[str], frozenset[str]] = (
            frozenset(), frozenset({"now"}), frozenset())
        self.changes = 0

    def view(self, resource: str) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
        return self.current

    def strict(self, resource: str) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
        return self.current[0], frozenset(), self.current[2]

    def note_change(self, resource: str) -> None:
        self.changes += 1


def _unit(sql: str) -> Unit:
    return Unit((Statement(sql, "execute"),), True)


def _counting(monkeypatch) -> list[str]:
    import proxy.policy_decider as module

    calls: list[str] = []
    real = module.classify

    def counting(text: str, **kwargs: object) -> object:
        calls.append(text)
        return real(text, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(module, "classify", counting)
    return calls


def test_the_same_text_object_is_allowed_without_classifying_again(tmp_path: Path,
                                                                   monkeypatch) -> None:
    decider = _decider(tmp_path)
    session = _session()
    sql = "SELECT c FROM t WHERE id = $1"
    calls = _counting(monkeypatch)
    assert decider.decide(session, _unit(sql)).action == "allow"
    assert decider.decide(session, _unit(sql)).action == "allow"
    assert calls == [sql]  # the second time, the shortcut answered
    # an equal but different text object goes the full way
    assert decider.decide(session, _unit("".join(["SELECT c FROM t WHERE id = ", "$1"]))).action \
        == "allow"
    assert len(calls) == 2


def _query(sql: str) -> Unit:
    return Unit((Statement(sql),))


def test_other_integers_in_a_learnt_form_are_allowed_without_classifying(tmp_path: Path,
                                                                        monkeypatch) -> None:
    decider = _decider(tmp_path)
    session = _session()
    calls = _counting(monkeypatch)
    for aid in (12345, 67890, 7, 12345, 4):
        assert decider.decide(session, _query(f"SELECT c FROM t WHERE id = {aid};")).action \
            == "allow"
    # one classification per form: five digits, then one digit
    assert calls == ["SELECT c FROM t WHERE id = 12345;", "SELECT c FROM t WHERE id = 7;"]


def test_digits_outside_a_learnt_form_are_classified_each_time(tmp_path: Path,
                                                              monkeypatch) -> None:
    decider = _decider(tmp_path, POLICY.replace("{kinds: [read, session]}",
                                                '{kinds: [read, session], tables: ["t1"]}'))
    session = _session()
    calls = _counting(monkeypatch)
    # digits in an identifier or a string: no integer form is learnt, so another
    # digit there is another statement (here on a table the policies refuse)
    assert decider.decide(session, _query("SELECT c FROM t1")).action == "allow"
    assert decider.decide(session, _query("SELECT c FROM t2")).action == "deny"
    assert decider.decide(session, _query("SELECT c FROM t1 WHERE c = '1'")).action == "allow"
    assert decider.decide(session, _query("SELECT c FROM t1 WHERE c = '2'")).action == "allow"
    assert len(calls) == 4


def test_a_session_keeps_a_bounded_number_of_short_forms(tmp_path: Path, monkeypatch) -> None:
    decider = _decider(tmp_path)
    session = _session()
    calls = _counting(monkeypatch)
    for a in range(1, 10):
        for b in range(1, 5):  # 36 forms
            sql = f"SELECT c FROM t WHERE id = {'7' * a} AND k = {'3' * b}"
            assert decider.decide(session, _query(sql)).action == "allow"
    assert len(calls) == 36
    assert len(session.state["last_allowed"].forms) == 32
    long = "SELECT c FROM t WHERE id = {}" + " " * 3000
    for value in (1, 2):
        assert decider.decide(session, _query(long.format(value))).action == "allow"
    assert len(calls) == 38  # long texts keep no form


def test_a_policy_reload_ends_the_form_shortcut(tmp_path: Path) -> None:
    decider = _decider(tmp_path)
    session = _session()
    assert decider.decide(session, _query("SELECT c FROM t WHERE id = 1")).action == "allow"
    (tmp_path / "policies" / "p.yaml").write_text(POLICY.replace("action: allow", "action: deny"))
    assert decider.policies.reload()
    assert decider.decide(session, _query("SELECT c FROM t WHERE id = 2")).action == "deny"


def test_a_policy_reload_ends_the_shortcut(tmp_path: Path) -> None:
    decider = _decider(tmp_path)
    session = _session()
    sql = "SELECT c FROM t"
    assert decider.decide(session, _unit(sql)).action == "allow"
    (tmp_path / "policies" / "p.yaml").write_text(POLICY.replace("action: allow", "action: deny"))
    assert decider.policies.reload()
    assert decider.decide(session, _unit(sql)).action == "deny"


def test_new_function_facts_end_the_shortcut(tmp_path: Path) -> None:
    decider = _decider(tmp_path)
    facts = _Facts()
    decider.functions = facts
    session = _session()
    sql = "SELECT f()"
    facts.current = (frozenset(), frozenset({"f"}), frozenset())
    assert decider.decide(session, _unit(sql)).action == "allow"
    facts.current = (frozenset({"f"}), frozenset({"f"}), frozenset())  # f is volatile now
    decision = decider.decide(session, _unit(sql))
    assert decision.action == "deny"
    assert "Statement kind: write" in (decision.detail or "")


def test_no_shortcut_in_a_session_that_changed_functions(tmp_path: Path) -> None:
    decider = _decider(tmp_path, POLICY.replace("[read, session]", "[read, session, ddl]"))
    facts = _Facts()
    decider.functions = facts
    session = _session()
    sql = "SELECT now()"
    assert decider.decide(session, _unit(sql)).action == "allow"
    ddl = "CREATE FUNCTION now(int) RETURNS int LANGUAGE sql AS 'SELECT 1'"
    assert decider.decide(session, _unit(ddl)).action == "allow"
    # now() may be shadowed by what this session created: no call is vouched for
    assert decider.decide(session, _unit(sql)).action == "deny"


def test_no_shortcut_for_session_effects(tmp_path: Path) -> None:
    decider = _decider(tmp_path)
    session = _session()
    prepare = "PREPARE q AS SELECT 1"
    assert decider.decide(session, _unit(prepare)).action == "allow"
    assert "last_allowed" not in session.state or session.state["last_allowed"].text is not prepare
    assert Kind.SESSION  # (PREPARE of a read is a session statement)


def _strict_session(tmp_path: Path) -> tuple[PolicyDecider, _Facts, SessionInfo]:
    decider = _decider(tmp_path, POLICY.replace("[read, session]", "[read, session, ddl]"))
    facts = _Facts()
    decider.functions = facts
    session = _session()
    # any DDL makes the session strict for good
    assert decider.decide(session, _query("CREATE TABLE u (a int)")).action == "allow"
    assert "functions_changed" in session.state
    return decider, facts, session


def test_a_strict_session_gets_no_shortcut_past_new_function_facts(tmp_path: Path) -> None:
    decider, facts, session = _strict_session(tmp_path)
    assert decider.decide(session, _query("SELECT c FROM t WHERE id = 1")).action == "allow"
    # the catalog was read again: t's row-level security now runs a volatile function
    facts.current = (frozenset(), frozenset({"now"}), frozenset({"t"}))
    for sql in ("SELECT c FROM t WHERE id = 1", "SELECT c FROM t WHERE id = 2"):
        decision = decider.decide(session, _query(sql))
        assert decision.action == "deny"
        assert "Statement kind: write" in (decision.detail or "")


def test_every_statement_of_a_strict_session_notes_a_change(tmp_path: Path) -> None:
    decider, facts, session = _strict_session(tmp_path)
    for value in (1, 2, 3):
        before = facts.changes
        # what the session changed reaches the catalog when it commits: each of its
        # statements keeps the other sessions' strict window open
        assert decider.decide(session, _query(f"COMMIT; SELECT {value}")).action == "allow"
        assert facts.changes == before + 1
