"""Security review of JIT grants, end to end through the real ``pgvouch serve``: a grant
covers a statement only if the people who approved it are the people the statement's own
policy rules ask for (a grant approved under a laxer rule never stands in for a stricter
one, nor for longer than the statement's rules allow), and free text with control
characters is bad input (400), not a store failure."""

from __future__ import annotations

import signal
import time

import pytest

from tests.e2e.helpers import ALLOW_READS, policy, review
from tests.e2e.test_jit_grants import POLICY, Served, _balance, _held
from tests.e2e.test_jit_grants import served as jit_served  # noqa: F401 - a fixture

PEER_REVIEW = '{steps: [{name: peer review, approvers: ["dave"], required: 1}]}'
# The first review rule that may match "any table" is a lax one (dave alone, 8h) for
# scratch tables; ordinary writes need a DBA and at most 1h.
POLICY_SCRATCH_FIRST = policy(
    ALLOW_READS,
    review(name="scratch", tables="public.scratch*", approval=PEER_REVIEW, jit="8h"),
    review(name="writes", jit="1h"))
# Balances need a DBA (at most 1h); other writes only dave (8h).
POLICY_BALANCES_STRICT = policy(
    ALLOW_READS,
    review(name="balances", tables="public.accounts", jit="1h"),
    review(name="writes", approval=PEER_REVIEW, jit="8h"))


def _load_policy(served: Served, text: str) -> None:
    before = served.log.read_text().count("policies reloaded")
    (served.policies / "app.yaml").write_text(text)
    served.proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 15
    while served.log.read_text().count("policies reloaded") == before:
        assert time.time() < deadline, served.log.read_text()
        time.sleep(0.1)


def _grant(served: Served, **ask: object) -> str:
    body = {"resource": "app", "account": "app", "kinds": ["write"], "reason": "review test", **ask}
    status, grant = served.api("POST", "/grants", "alice", body)
    assert status == 201, grant
    return str(grant["id"])


def test_a_grant_approved_under_a_lax_rule_does_not_cover_a_stricter_one(
        request: pytest.FixtureRequest, pg) -> None:
    served: Served = request.getfixturevalue("jit_served")
    _load_policy(served, POLICY_SCRATCH_FIRST)
    pg.psql("UPDATE accounts SET balance = 480 WHERE id = 48")
    grant_id = _grant(served, duration="2h")  # any table: asked as "*", the scratch rule decides
    status, grant = served.api("GET", f"/requests/{grant_id}", "bob")
    assert status == 200
    assert [step["name"] for step in grant["steps"]] == ["peer review"]
    served.approve(grant_id, "dave")  # dave alone, not a DBA
    # an ordinary write needs a DBA and at most 1h: dave's 2h grant does not stand in for that
    assert _held(served.psql("UPDATE accounts SET balance = 481 WHERE id = 48"))
    assert _balance(pg, 48) == "480"


def test_a_table_glob_grant_does_not_cover_a_table_with_a_stricter_rule(
        request: pytest.FixtureRequest, pg) -> None:
    served: Served = request.getfixturevalue("jit_served")
    _load_policy(served, POLICY_BALANCES_STRICT)
    pg.psql("UPDATE accounts SET balance = 490 WHERE id = 49")
    pg.psql("DELETE FROM events WHERE payload LIKE 'glob-%'")
    grant_id = _grant(served, tables=["public.*"], duration="1h")
    status, grant = served.api("GET", f"/requests/{grant_id}", "bob")
    assert status == 200
    assert [step["name"] for step in grant["steps"]] == ["peer review"]
    served.approve(grant_id, "dave")
    # public.events: only the writes rule applies, which dave approved: covered
    result = served.psql("INSERT INTO public.events(payload) VALUES ('glob-1')")
    assert result.returncode == 0, result.stderr
    # public.accounts matches public.* but its rule asks for a DBA, who approved nothing
    assert _held(served.psql("UPDATE public.accounts SET balance = 491 WHERE id = 49"))
    assert _balance(pg, 49) == "490"


def test_control_characters_in_a_grant_request_are_a_400(request: pytest.FixtureRequest) -> None:
    served: Served = request.getfixturevalue("jit_served")
    # A NUL cannot be kept in the PostgreSQL store's jsonb (it would surface as a 503
    # "store unavailable"); control characters have no place in a reason or a glob.
    ask = {"resource": "app", "account": "app", "kinds": ["write"], "duration": "1h"}
    for extra in ({"reason": "incident\u0000 4711"}, {"reason": "incident \u001b[2J4711"},
                  {"reason": "x", "tables": ["public.acc\u0000"]}):
        status, body = served.api("POST", "/grants", "alice", {**ask, **extra})
        assert status == 400 and body["error"]["code"] == "invalid_grant", (extra, body)
    status, body = served.api("GET", "/grants", "bob")
    assert status == 200 and body["grants"] == []


def test_a_tightened_jit_cap_shortens_a_running_grant(request: pytest.FixtureRequest, pg) -> None:
    served: Served = request.getfixturevalue("jit_served")
    pg.psql("UPDATE accounts SET balance = 500 WHERE id = 50")
    grant_id = _grant(served, duration="4h")  # the cap in force: 4h
    served.approve(grant_id)
    assert served.psql("UPDATE accounts SET balance = 501 WHERE id = 50").returncode == 0
    # the rule's cap is cut to 2s: the 4h grant covers only the first 2s after its approval
    _load_policy(served, POLICY.replace("jit: {max_duration: 4h}", "jit: {max_duration: 2s}"))
    status, grant = served.api("GET", f"/requests/{grant_id}", "bob")
    assert status == 200 and grant["status"] == "approved"
    time.sleep(max(0.0, grant["decided_at"] + 2 - time.time()) + 0.2)
    assert _held(served.psql("UPDATE accounts SET balance = 502 WHERE id = 50"))
    assert _balance(pg, 50) == "501"
