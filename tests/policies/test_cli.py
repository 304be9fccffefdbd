"""``pgvouch policy lint | explain | test``, in process and once as a real process."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from policies.cli import add_policy_commands, main

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "config" / "policies"
EXAMPLE_TESTS = EXAMPLES / "tests" / "example_tests.yaml"


def _config(tmp_path: Path, policies: Path = EXAMPLES, users: str | None = None) -> Path:
    users = users or """\
        - {name: alice, groups: [developers]}
        - {name: bob, groups: [dba]}
        - {name: carol, groups: [dba, security]}
    """
    text = textwrap.dedent(
        f"""\
        policies: {policies}
        resources:
          - name: prod-db
            host: 127.0.0.1
            database: app
            accounts: [{{name: app, user: app}}]
        users:
        """
    ) + textwrap.indent(textwrap.dedent(users), "  ")
    path = tmp_path / "pgvouch.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["policy", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- the subcommand wiring ----------------------------------------------------------------


def test_add_policy_commands_registers_three_actions() -> None:
    parser = argparse.ArgumentParser(prog="pgvouch")
    add_policy_commands(parser.add_subparsers(dest="command"))
    for argv in (
        ["policy", "lint", "--policies", "d"],
        ["policy", "explain", "--policies", "d", "--resource", "r", "--account", "a",
         "--user", "u", "--sql", "SELECT 1"],
        ["policy", "test", "--policies", "d", "t.yaml"],
    ):
        args = parser.parse_args(argv)
        assert callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["policy"])


# -- lint ---------------------------------------------------------------------------------------


def test_lint_examples(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "lint", "--policies", str(EXAMPLES))
    assert code == 0
    assert out.startswith("ok: 3 policies, 9 rules from 3 file(s); defaults: action deny")
    assert "group:NAME were not counted" in out


def test_lint_with_config_resolves_groups(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "lint", "--config", str(_config(tmp_path)))
    assert code == 0 and "not counted" not in out
    # Without carol nobody is in group security: the payments step is unreachable.
    lonely = _config(tmp_path, users="- {name: bob, groups: [dba]}\n")
    code, _, err = run(capsys, "lint", "--config", str(lonely))
    assert code == 1
    assert "production.yaml:" in err
    assert "step 'Security review' requires 1 approval(s) but only 0 person(s)" in err


def test_lint_reports_file_and_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        "policies:\n  - name: x\n    match: {resources: [a]}\n    rules:\n"
        "      - when: {kinds: [wrte]}\n        action: allow\n",
        encoding="utf-8",
    )
    code, out, err = run(capsys, "lint", "--policies", str(tmp_path))
    assert code == 1 and out == ""
    assert err.strip().startswith(f"{tmp_path / 'bad.yaml'}:5: must be one of read")


def test_lint_needs_a_source(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "lint")
    assert code == 2 and "give --policies DIR" in err


# -- explain ----------------------------------------------------------------------------------

EXPLAIN = ["explain", "--policies", str(EXAMPLES), "--resource", "prod-db", "--account", "app"]


def test_explain_text(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, *EXPLAIN, "--user", "alice", "--groups", "developers",
        "--sql", "UPDATE payments SET amount = 0 WHERE id = 3",
    )
    assert code == 0
    assert out.startswith("decision: review\n")
    assert "decided by: policy production, rule payment writes need DBA and Security" in out
    assert "production / Security review: 1 of group:security" in out
    assert "hold overrides: mode wait, wait_timeout 15m, approved_ttl 30m" in out
    assert "1. write; tables: payments" in out
    assert "sql: UPDATE payments SET amount = 0 WHERE id = 3" in out


def test_explain_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, *EXPLAIN, "--user", "alice", "--groups", "developers", "--json",
        "--sql", "SELECT * FROM orders; DROP TABLE orders",
    )
    assert code == 0
    data = json.loads(out)
    assert data["action"] == "deny"
    assert data["policy"] == "production" and data["rule"] == "nothing destructive"
    assert data["kind"] == "destructive"
    assert [(s["kind"], s["tables"]) for s in data["statements"]] == [
        ("read", ["orders"]),
        ("destructive", ["orders"]),
    ]
    assert data["identity"] == {"user": "alice", "groups": ["developers"]}
    assert {v["action"] for v in data["verdicts"]} == {"allow", "deny"}
    assert data["steps"] == [] and data["jit_max_duration"] is None


def test_explain_takes_groups_from_the_config(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = str(_config(tmp_path))
    argv = ["explain", "--config", config, "--resource", "prod-db", "--account", "app",
            "--sql", "SELECT * FROM hr.salaries", "--json"]
    _, out, _ = run(capsys, *argv, "--user", "alice")
    assert json.loads(out)["action"] == "deny"  # alice is a developer
    _, out, _ = run(capsys, *argv, "--user", "carol")
    assert json.loads(out)["action"] == "allow"
    _, out, _ = run(capsys, *argv, "--user", "carol", "--groups", "developers")
    assert json.loads(out)["action"] == "deny"  # --groups wins


def test_explain_with_invalid_policies(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("policies: [{}]\n", encoding="utf-8")
    code, _, err = run(
        capsys, "explain", "--policies", str(tmp_path), "--resource", "r", "--account", "a",
        "--user", "u", "--sql", "SELECT 1",
    )
    assert code == 2 and "missing required key 'name'" in err


# -- test -------------------------------------------------------------------------------------


def test_example_policy_tests_pass(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "test", "--policies", str(EXAMPLES), str(EXAMPLE_TESTS))
    lines = out.strip().splitlines()
    assert code == 0, out
    assert all(line.startswith("PASS ") for line in lines[:-1])
    assert lines[-1].endswith(" passed, 0 failed")


def _tests_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "cases.yaml"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


CASES = """\
tests:
  - name: reads pass
    resource: prod-db
    account: app
    user: alice
    groups: [developers]
    sql: SELECT 1
    expect: allow
  - name: a wrong expectation
    resource: prod-db
    account: app
    user: alice
    groups: [developers]
    sql: DROP TABLE accounts
    expect: allow
"""


def test_failures_are_reported_and_exit_non_zero(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cases = _tests_file(tmp_path, CASES)
    code, out, _ = run(capsys, "test", "--policies", str(EXAMPLES), str(cases))
    assert code == 1
    lines = out.strip().splitlines()
    assert lines[0] == "PASS reads pass"
    assert lines[1].startswith(f"FAIL a wrong expectation ({cases}:9): expected allow, got deny")
    assert lines[-1] == "1 passed, 1 failed"


def test_json_output_shape(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cases = _tests_file(tmp_path, CASES)
    code, out, _ = run(capsys, "test", "--policies", str(EXAMPLES), str(cases), "--json")
    assert code == 1
    data = json.loads(out)
    assert set(data) == {"results", "passed", "failed"}
    assert (data["passed"], data["failed"]) == (1, 1)
    first, second = data["results"]
    assert set(first) == {"name", "expect", "actual", "passed", "kinds", "policy", "rule", "reason"}
    assert first == {
        "name": "reads pass",
        "expect": "allow",
        "actual": "allow",
        "passed": True,
        "kinds": ["read"],
        "policy": "production",
        "rule": "reads and session control",
        "reason": first["reason"],
    }
    assert (second["actual"], second["passed"], second["kinds"]) == ("deny", False, ["destructive"])


def test_groups_come_from_the_config_or_must_be_given(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cases = _tests_file(
        tmp_path,
        """\
        tests:
          - name: carol reads HR
            resource: prod-db
            account: app
            user: carol
            sql: SELECT * FROM hr.salaries
            expect: allow
        """,
    )
    code, out, _ = run(capsys, "test", "--config", str(_config(tmp_path)), str(cases))
    assert code == 0 and out.strip().endswith("1 passed, 0 failed")
    code, _, err = run(capsys, "test", "--policies", str(EXAMPLES), str(cases))
    assert code == 2
    assert "gives no groups and user 'carol' is not in the config" in err


def test_invalid_test_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cases = _tests_file(tmp_path, "tests:\n  - name: x\n    resource: r\n    expect: maybe\n")
    code, _, err = run(capsys, "test", "--policies", str(EXAMPLES), str(cases))
    assert code == 2 and f"{cases}:2: missing required key" in err


def test_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "policies.cli", "policy", "test", "--json",
         "--policies", str(EXAMPLES), str(EXAMPLE_TESTS)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["failed"] == 0 and data["passed"] == len(data["results"]) > 20
