"""The admin console without sockets: its language, its protocol and its answers as bytes."""

from __future__ import annotations

import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from approvals.service import ApprovalService
from approvals.store import open_store
from approvals.workflow import Code
from proxy import sqlstate, wire
from proxy.console import (
    WORKFLOW_SQLSTATE,
    Cancel,
    Console,
    ConsoleError,
    Reload,
    RevokeGrant,
    Show,
    ShowRequest,
    ShowRequests,
    Vote,
    parse_script,
    tokenize,
    wants_console,
)
from tests.approvals.helpers import DIRECTORY, make_request


def messages(data: bytes) -> list[tuple[str, Any]]:
    """The server messages in ``data``, decoded enough to check them."""
    chunk, found = wire.Framer(1 << 20, "server").feed(data)
    out: list[tuple[str, Any]] = []
    for kind, start, end in found:
        body = bytes(chunk[start + 5 : end])
        letter = chr(kind)
        if letter in "EN":
            out.append((letter, wire.decode_error_fields(chunk, start, end)))
        elif letter == "T":
            reader = wire.Reader(body)
            names = []
            for _ in range(reader.int16()):
                names.append(reader.cstring())
                reader.bytes(18)
            out.append((letter, names))
        elif letter == "D":
            reader = wire.Reader(body)
            values = []
            for _ in range(reader.int16()):
                length = reader.int32()
                values.append(None if length < 0 else reader.bytes(length).decode())
            out.append((letter, values))
        elif letter == "C":
            out.append((letter, body[:-1].decode()))
        else:
            out.append((letter, body))
    return out


def fake_server(approvals: ApprovalService | None = None, client_auth: str = "scram",
                owners: tuple[str, ...] = ()) -> Any:
    users = {name: SimpleNamespace(roles=("owner",) if name in owners else ()) for name in DIRECTORY}
    settings = SimpleNamespace(client_auth=client_auth, users=users, resources={})
    return SimpleNamespace(approvals=approvals, sessions=set(), decider=object(), settings=settings)


def query(sql: str) -> bytes:
    return wire.query(sql)[5:]


# -- the language --------------------------------------------------------------------------


def test_tokens_words_literals_and_comments() -> None:
    tokens = tokenize("approve /* a /* nested */ comment */ 'it''s' -- trailing\n note 'x;y';")
    assert [(t.kind, t.value) for t in tokens] == [
        ("word", "APPROVE"), ("string", "it's"), ("word", "NOTE"), ("string", "x;y"),
        ("semicolon", ";"),
    ]
    assert tokenize(r"'back\slash'")[0].value == "back\\slash"  # standard_conforming_strings


@given(st.text(alphabet=st.characters(blacklist_characters="\x00")))
def test_any_text_round_trips_through_a_literal(text: str) -> None:
    (token,) = tokenize("'" + text.replace("'", "''") + "'")
    assert token.kind == "string" and token.value == text


@pytest.mark.parametrize("sql", ["APPROVE 'R-1", "SHOW /* never closed", "NOTE 'a''"])
def test_unterminated_literals_and_comments_are_syntax_errors(sql: str) -> None:
    with pytest.raises(ConsoleError) as info:
        tokenize(sql)
    assert info.value.code == sqlstate.SYNTAX_ERROR == "42601"
    assert "unterminated" in info.value.message


def test_every_command_parses_case_insensitively() -> None:
    script = """
        show requests; SHOW REQUESTS PENDING; Show Requests approved;
        SHOW REQUEST 'r-7kq2x'; approve 'R-7KQ2X'; APPROVE '7KQ2X' NOTE 'ok';
        DENY 'R-7KQ2X' NOTE 'it''s frozen'; CANCEL 'R-7KQ2X'; CANCEL 'R-7KQ2X' note 'oops';
        SHOW GRANTS; REVOKE GRANT 'R-ABCDE'; SHOW POLICIES; SHOW SESSIONS; RELOAD;;; SHOW HELP;
    """
    assert parse_script(script) == [
        ShowRequests(None), ShowRequests("pending"), ShowRequests("approved"),  # type: ignore[arg-type]
        ShowRequest("R-7KQ2X"), Vote("R-7KQ2X", "approve", None), Vote("R-7KQ2X", "approve", "ok"),
        Vote("R-7KQ2X", "deny", "it's frozen"), Cancel("R-7KQ2X", None), Cancel("R-7KQ2X", "oops"),
        Show("GRANTS"), RevokeGrant("R-ABCDE", None), Show("POLICIES"), Show("SESSIONS"), Reload(),
        Show("HELP"),
    ]
    assert parse_script("  -- nothing\n ; ;") == []


@pytest.mark.parametrize(("sql", "code", "text"), [
    ("SELECT 1", "42601", 'syntax error at or near "SELECT"'),
    ("SHOW", "42601", "syntax error at end of input"),
    ("SHOW REQUESTS PENDING extra", "42601", 'at or near "extra"'),
    ("APPROVE R-7KQ2X", "42601", 'at or near "R"'),
    ("APPROVE 'R-7KQ2X' NOTE ok", "42601", 'at or near "ok"'),
    ("DENY 'R-7KQ2X'", "42601", "DENY needs a note"),
    ("DENY 'R-7KQ2X' NOTE '  '", "22023", "non-empty note"),
    ("APPROVE 'not an id!'", "22023", "not a request id"),
    ("APPROVE 'R-7KQ2X' NOTE '" + "x" * 4001 + "'", "22023", "at most 4000"),
    ("REVOKE 'R-7KQ2X'", "42601", "syntax error"),
    ("SHOW HELP; APPROVE E'R-7KQ2X'", "42601", 'at or near "E"'),
    ("SHOW HELP; SHOW \"HELP\"", "42601", "syntax error"),
    ("SHOW HELP; APPROVE $$x$$", "42601", "syntax error"),
])
def test_bad_commands_are_refused_with_a_sqlstate(sql: str, code: str, text: str) -> None:
    with pytest.raises(ConsoleError) as info:
        parse_script(sql)
    assert info.value.code == code and text in info.value.message


def test_every_workflow_code_has_a_sqlstate() -> None:
    assert set(WORKFLOW_SQLSTATE) == set(Code)
    assert WORKFLOW_SQLSTATE[Code.CANNOT_SELF_APPROVE] == "42501"
    assert WORKFLOW_SQLSTATE[Code.ALREADY_REVIEWED] == WORKFLOW_SQLSTATE[Code.NOT_PENDING] == "55000"


def test_dbname_pgvouch_is_the_console_unless_a_resource_has_that_name() -> None:
    plain = SimpleNamespace(resources={"app": object()})
    taken = SimpleNamespace(resources={"pgvouch": object()})
    assert wants_console(plain, {"user": "bob", "database": "pgvouch"})  # type: ignore[arg-type]
    assert wants_console(plain, {"user": "pgvouch"})  # type: ignore[arg-type]  # dbname defaults to user
    assert not wants_console(plain, {"user": "bob", "database": "app"})  # type: ignore[arg-type]
    assert not wants_console(plain, {"user": "bob", "database": "pgvouch/x"})  # type: ignore[arg-type]
    assert not wants_console(taken, {"user": "bob", "database": "pgvouch"})  # type: ignore[arg-type]


# -- the protocol ----------------------------------------------------------------------------


async def test_a_query_is_answered_with_rows_then_ready() -> None:
    console = Console(fake_server(), "bob")
    answer = messages(await console.receive(ord("Q"), query("show help;")) or b"")
    assert answer[0] == ("T", ["command", "description"])
    assert [kind for kind, _ in answer[1:-2]] == ["D"] * (len(answer) - 3)
    assert answer[-2:] == [("C", "SHOW"), ("Z", b"I")]
    assert messages(await console.receive(ord("Q"), query(" -- nothing")) or b"") == [
        ("I", b""), ("Z", b"I")]


async def test_the_first_error_ends_a_multi_statement_query() -> None:
    console = Console(fake_server(), "bob")
    answer = messages(await console.run("SHOW HELP; SHOW REQUESTS; SHOW HELP"))
    kinds = [kind for kind, _ in answer]
    assert kinds.count("T") == 1 and kinds[-2:] == ["E", "Z"]
    error = answer[-2][1]
    assert error["C"] == "55000" and "approvals are not configured" in error["M"]


async def test_a_syntax_error_anywhere_means_nothing_runs() -> None:
    answer = messages(await Console(fake_server(), "bob").run("SHOW HELP; SHOW NOTHING"))
    assert [kind for kind, _ in answer] == ["E", "Z"]
    assert answer[0][1]["C"] == "42601" and "SHOW HELP" in answer[0][1]["H"]


async def test_extended_protocol_is_refused_once_and_skipped_to_sync() -> None:
    console = Console(fake_server(), "bob")
    parse = wire.message(b"P", wire.cstr("") + wire.cstr("SHOW HELP") + b"\x00\x00")[5:]
    first = messages(await console.receive(ord("P"), parse) or b"")
    assert first[0][0] == "E" and first[0][1]["C"] == "0A000"
    assert "simple query protocol" in first[0][1]["M"] and len(first) == 1
    for kind in b"BDEH":
        assert await console.receive(kind, b"") == b""
    assert await console.receive(ord("Q"), query("SHOW HELP")) == b""  # still skipping, as PostgreSQL
    assert messages(await console.receive(ord("S"), b"") or b"") == [("Z", b"I")]
    assert messages(await console.receive(ord("Q"), query("SHOW HELP")) or b"")[-1] == ("Z", b"I")
    function = messages(await console.receive(ord("F"), b"") or b"")
    assert [kind for kind, _ in function] == ["E", "Z"] and function[0][1]["C"] == "0A000"
    assert await console.receive(ord("X"), b"") is None


async def test_protocol_violations_raise() -> None:
    console = Console(fake_server(), "bob")
    with pytest.raises(wire.ProtocolError):
        await console.receive(ord("Z"), b"I")
    with pytest.raises(wire.ProtocolError):
        await console.receive(ord("Q"), b"SHOW HELP")  # no terminating NUL
    with pytest.raises(wire.ProtocolError):
        await console.receive(ord("Q"), b"SHOW\x00HELP\x00")


def test_the_greeting_looks_like_a_server() -> None:
    greeting = messages(Console(fake_server(), "bob", "psql").greeting(42, b"\x00\x00\x00\x07"))
    assert greeting[0] == ("R", struct.pack("!i", 0))
    status = dict(body[:-1].split(b"\x00") for kind, body in greeting if kind == "S")
    assert status[b"server_version"].startswith(b"16.0") and status[b"client_encoding"] == b"UTF8"
    assert status[b"application_name"] == b"psql"
    assert greeting[-2][0] == "K" and greeting[-1] == ("Z", b"I")


# -- requests through the real service (SQLite) -------------------------------------------------


@pytest.fixture
async def service(tmp_path: Path) -> Any:
    store = await open_store(f"sqlite:///{tmp_path / 'console.db'}")
    service = ApprovalService(store, DIRECTORY, clock=lambda: 1_700_000_100.0)
    yield service
    await store.close()


async def test_the_workflow_decides_and_the_console_reports(service: ApprovalService) -> None:
    request = await service.create(make_request())
    server = fake_server(service)
    alice, bob = Console(server, "alice"), Console(server, "bob")
    own = messages(await alice.run(f"APPROVE '{request.id}'"))
    assert own[0][1]["C"] == "42501" and "four-eyes" in own[0][1]["M"]
    assert own[0][1]["D"] == "workflow code: cannot_self_approve"
    missing = messages(await bob.run("SHOW REQUEST 'R-ZZZZZ'"))
    assert missing[0][1]["C"] == "42704" and "does not exist" in missing[0][1]["M"]
    approved = messages(await bob.run(f"APPROVE '{request.id.lower()}' NOTE 'fine'"))
    assert approved[:3] == [("T", ["id", "status", "summary"]),
                            ("D", [request.id, "approved", f"{request.id} approved; usable for 1h"]),
                            ("C", "APPROVE")]
    again = messages(await bob.run(f"DENY '{request.id}' NOTE 'changed my mind'"))
    assert again[0][1]["C"] == "55000"
    shown = dict(values for kind, values in messages(await bob.run(f"SHOW REQUEST '{request.id}'"))
                 if kind == "D" and values[0] != "vote")
    assert shown["status"] == "approved" and shown["parameter $1"] == "'7' (text, type oid 23)"
    assert shown["step 1/1"].startswith("DBA review: 1/1 approvals by bob (done)")


async def test_no_changes_under_trust(service: ApprovalService) -> None:
    request = await service.create(make_request())
    bob = Console(fake_server(service, client_auth="trust"), "bob")
    refused = messages(await bob.run(f"APPROVE '{request.id}'"))
    assert refused[0][1]["C"] == "28000"
    listed = messages(await bob.run("SHOW REQUESTS PENDING"))  # reading is fine
    assert listed[1][0] == "D" and listed[1][1][:2] == [request.id, "pending"]


async def test_reload_is_for_owners_and_needs_policies() -> None:
    bob = Console(fake_server(owners=("carol",)), "bob")
    carol = Console(fake_server(owners=("carol",)), "carol")
    assert messages(await bob.run("RELOAD"))[0][1]["C"] == "42501"
    assert messages(await carol.run("RELOAD"))[0][1]["C"] == "55000"  # no policies configured
