"""``pgvouch user token`` and ``pgvouch audit verify|export``, run as real commands."""

from __future__ import annotations

import argparse
import itertools
import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from approvals.api import add_approval_routes
from approvals.auth import token_hash
from approvals.cli import add_approval_commands, run_user_token
from approvals.service import ApprovalService
from approvals.store import open_store
from config.settings import load_settings
from tests.approvals.helpers import DIRECTORY, make_request

REPO = Path(__file__).resolve().parents[2]
PGVOUCH_APPROVALS = [sys.executable, "-m", "approvals.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PGVOUCH_APPROVALS, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=60)


def write_config(tmp_path: Path, users: str = "  - name: bob\n    groups: [dba]\n") -> Path:
    config = tmp_path / "pgvouch.yaml"
    config.write_text(
        f"store: sqlite:///{tmp_path / 'store.db'}\n"
        + textwrap.dedent("""\
            resources:
              - name: app
                host: 127.0.0.1
                database: app
                accounts:
                  - name: app
                    user: app
            users:
        """)
        + users
    )
    return config


async def fill_store(tmp_path: Path) -> int:
    """Some decisions in the config's store; returns how many audit events they wrote."""
    store = await open_store(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        service = ApprovalService(store, DIRECTORY)
        first = await service.create(make_request(now=service.clock()))
        await service.vote(first.id, "bob", "approve", "fine")
        second = await service.create(make_request(now=service.clock()))
        await service.vote(second.id, "carol", "deny", "no")
        return len(await store.audit())
    finally:
        await store.close()


# -- user token --------------------------------------------------------------------------


async def test_user_token_prints_a_token_and_a_config_line_that_authenticates(tmp_path: Path) -> None:
    result = run("user", "token", "bob")
    assert result.returncode == 0, result.stderr
    token, line = result.stdout.splitlines()
    assert token.startswith("pgv_")
    assert line == f"api_token_sha256: {token_hash(token)}"
    assert token not in result.stderr and "shown once" in result.stderr
    assert run("user", "token", "bob").stdout.splitlines()[0] != token  # a new token every time

    config = write_config(tmp_path, f"  - name: bob\n    groups: [dba]\n    {line}\n")
    settings = load_settings(config)
    assert settings.users["bob"].api_token_sha256 == token_hash(token)
    assert token not in config.read_text()

    store = await open_store(settings.store)
    app = web.Application()
    add_approval_routes(app, ApprovalService(store, {"bob": ("dba",)}), settings)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        me = await client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert (me.status, (await me.json())["name"]) == (200, "bob")
        wrong = await client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}x"})
        assert wrong.status == 401
    await store.close()


def test_user_token_joins_an_existing_user_command(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="pgvouch")
    commands = parser.add_subparsers(dest="command", required=True)
    user = commands.add_parser("user")
    user_actions = user.add_subparsers(dest="action", required=True)
    user_actions.add_parser("hash").set_defaults(func=lambda args: 0)
    add_approval_commands(commands, user_actions=user_actions)
    args = parser.parse_args(["user", "token", "carol"])
    assert args.func is run_user_token
    assert args.func(args) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("api_token_sha256: ")
    assert parser.parse_args(["user", "hash"]).action == "hash"
    assert parser.parse_args(["audit", "verify", "--config", "x"]).audit_action == "verify"


# -- audit verify ------------------------------------------------------------------------


async def test_audit_verify_passes_on_an_intact_log(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    count = await fill_store(tmp_path)
    result = run("audit", "verify", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert f"audit log OK: {count} events verified" in result.stdout


@pytest.mark.parametrize(
    ("tamper", "first_bad"),
    [
        ("UPDATE audit_events SET actor = 'mallory' WHERE id = 2", 2),
        ("UPDATE audit_events SET data = replace(data, 'fine', 'FINE') WHERE id = 2", 2),
        ("DELETE FROM audit_events WHERE id = 3", 3),
        ("DELETE FROM audit_events WHERE id = (SELECT max(id) FROM audit_events)", None),
    ],
    ids=["edit-actor", "edit-note", "delete-row", "delete-last"],
)
async def test_audit_verify_detects_tampering(tmp_path: Path, tamper: str, first_bad: int | None) -> None:
    config = write_config(tmp_path)
    count = await fill_store(tmp_path)
    db = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    try:
        db.execute("DROP TRIGGER audit_events_no_update")  # what someone with file access can do
        db.execute("DROP TRIGGER audit_events_no_delete")
        changed = db.execute(tamper).rowcount
        assert changed == 1
    finally:
        db.close()
    result = run("audit", "verify", "--config", str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"TAMPERED at event #{first_bad or count}" in result.stdout


def test_audit_verify_cannot_run_without_config_or_store(tmp_path: Path) -> None:
    missing = run("audit", "verify", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr
    config = write_config(tmp_path)
    no_store = run("audit", "verify", "--config", str(config))
    assert no_store.returncode == 2 and "no store at" in no_store.stderr
    assert not (tmp_path / "store.db").exists()  # it did not create an empty one


# -- audit export ------------------------------------------------------------------------


async def test_audit_export_prints_jsonl(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    count = await fill_store(tmp_path)
    result = run("audit", "export", "--config", str(config), "--format", "jsonl")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["id"] for e in events] == list(range(1, count + 1))
    assert events[0]["type"] == "request.created"
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(events))
    assert {"at", "actor", "request_id", "data", "hash"} <= set(events[0])

    cutoff = events[-1]["at"]
    since_unix = run("audit", "export", "--config", str(config), "--since", str(cutoff))
    assert [json.loads(line)["id"] for line in since_unix.stdout.splitlines()] == [
        e["id"] for e in events if e["at"] >= cutoff]
    future = run("audit", "export", "--config", str(config), "--since", "2999-01-01T00:00:00Z")
    assert (future.returncode, future.stdout) == (0, "")
    past = run("audit", "export", "--config", str(config), "--since", "2001-01-01")
    assert past.stdout == result.stdout


def test_audit_export_refuses_bad_arguments(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    bad_since = run("audit", "export", "--config", str(config), "--since", "last tuesday")
    assert bad_since.returncode == 2 and "--since" in bad_since.stderr
    bad_format = run("audit", "export", "--config", str(config), "--format", "csv")
    assert bad_format.returncode == 2 and "invalid choice" in bad_format.stderr
