"""Cancel requests with a key of no session here, between replicas (ProxyServer.cancel).

End to end through two replicas: tests/e2e/test_replicas.py. Here: what is
announced (never the secret), the per-second bound on announcements (a cancel
request needs no login), and a store that cannot announce.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from proxy.server import CANCEL_ANNOUNCEMENTS_PER_SECOND, cancel_digest
from tests.proxy.servers import minimal_server


def test_an_unknown_key_is_announced_as_a_digest_within_a_bound(tmp_path: Path) -> None:
    server = minimal_server(tmp_path)
    announced: list[str] = []

    async def announce(key: str) -> None:
        announced.append(key)

    server.announce_cancel = announce
    secret = b"\x01\x02\x03\x04"

    async def burst() -> None:
        for _ in range(CANCEL_ANNOUNCEMENTS_PER_SECOND + 5):
            await server.cancel(4242, secret)

    asyncio.run(burst())
    # (a burst that straddles a second boundary may announce up to twice the bound)
    assert CANCEL_ANNOUNCEMENTS_PER_SECOND <= len(announced) <= 2 * CANCEL_ANNOUNCEMENTS_PER_SECOND
    assert set(announced) == {f"4242:{cancel_digest(4242, secret)}"}
    assert secret.hex() not in announced[0]
    assert cancel_digest(4242, secret) != cancel_digest(4242, b"\x01\x02\x03\x05")
    assert cancel_digest(4242, secret) != cancel_digest(4243, secret)


def test_a_store_that_cannot_announce_harms_nothing(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    server = minimal_server(tmp_path)

    async def down(key: str) -> None:
        raise OSError("store unreachable")

    server.announce_cancel = down
    asyncio.run(server.cancel(4242, b"\0\0\0\0"))
    assert "could not be announced" in caplog.text


def test_announcements_for_no_session_here_or_malformed_are_ignored(tmp_path: Path) -> None:
    server = minimal_server(tmp_path)

    async def receive() -> None:
        for key in ("", "x", "4242", "4242:", "-1:00", "99999999999:00", "1:zz",
                    f"4242:{cancel_digest(4242, b'abcd')}"):
            server.cancel_announced(key)
        await asyncio.sleep(0)

    asyncio.run(receive())
    assert not server._cancels
