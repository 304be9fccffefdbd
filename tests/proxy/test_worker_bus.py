"""The bus between supervisor and workers: framing, socket passing, a worker's link, and
/metrics summed over workers. Real sockets throughout; the test plays the supervisor."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from config.settings import FunctionSettings
from proxy import bus
from proxy.cli import link_workers
from proxy.function_catalog import FunctionCatalog
from proxy.metrics import merge_expositions
from proxy.worker_link import LinkLost, WorkerLink
from tests.proxy.servers import minimal_server

# -- framing -------------------------------------------------------------------------------


def _read(data: bytes) -> list[bus.Message | None]:
    async def go() -> list[bus.Message | None]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        found: list[bus.Message | None] = []
        while True:
            message = await bus.read_message(reader)
            found.append(message)
            if message is None:
                return found

    return asyncio.run(go())


def test_frames_round_trip_in_order() -> None:
    messages: list[bus.Message] = [
        {"op": "closed"}, {"op": "note", "note": "cancel", "pid": 7, "secret": "00ff00ff"}]
    assert _read(b"".join(bus.frame(m) for m in messages)) == [*messages, None]


@pytest.mark.parametrize("data, error", [
    (struct.pack(">I", bus.MAX_FRAME + 1), "at most"),
    (struct.pack(">I", 5) + b"nojs!", "not JSON"),
    (struct.pack(">I", 2) + b"[]", "not a message"),
    (struct.pack(">I", 11) + b'{"op": 1}  ', "not a message"),
    (struct.pack(">I", 10) + b"{}", "inside a frame"),
    (b"\x00\x00", "inside a frame header"),
])
def test_a_broken_frame_is_an_error_not_a_message(data: bytes, error: str) -> None:
    with pytest.raises(bus.BusError, match=error):
        _read(data)


def test_a_message_over_the_limit_is_refused_when_framed() -> None:
    with pytest.raises(bus.BusError, match="over the"):
        bus.frame({"op": "x", "blob": "a" * bus.MAX_FRAME})


def test_client_sockets_pass_with_their_limit_note_and_the_end_is_seen() -> None:
    supervisor, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker.setblocking(False)
    one, one_peer = socket.socketpair()
    two, two_peer = socket.socketpair()
    with supervisor, worker, one, one_peer, two, two_peer:
        bus.pass_socket(supervisor, one, over_limit=False)
        bus.pass_socket(supervisor, two, over_limit=True)
        supervisor.send(b"?")  # not something the supervisor sends: dropped, and counted
        received, dropped, ended = bus.receive_sockets(worker)
        assert not ended and dropped == 1 and [over for _, over in received] == [False, True]
        for (client, _), peer in zip(received, (one_peer, two_peer), strict=True):
            with client:
                client.sendall(b"hello")  # the very socket, not a copy of its bytes
                assert peer.recv(5) == b"hello"
        assert bus.receive_sockets(worker) == ([], 0, False)
        supervisor.close()
        assert bus.receive_sockets(worker) == ([], 0, True)


# -- a worker's link -------------------------------------------------------------------------


class Supervisor:
    """The supervisor's side of one worker's two sockets, driven by the test."""

    def __init__(self) -> None:
        self.control, worker_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.channel, worker_channel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.link = WorkerLink(1, worker_control, worker_channel)

    async def start(self) -> None:
        self.reader, self.writer = await asyncio.open_unix_connection(sock=self.control)

    async def receive(self) -> bus.Message:
        message = await asyncio.wait_for(bus.read_message(self.reader), 5)
        assert message is not None
        return message

    def send(self, message: bus.Message) -> None:
        self.writer.write(bus.frame(message))


def test_a_link_takes_sockets_and_reports_what_ends() -> None:
    async def go() -> None:
        supervisor = Supervisor()
        await supervisor.start()
        taken: list[tuple[socket.socket, bool]] = []
        lost = asyncio.Event()
        supervisor.link.on_lost = lost.set
        await supervisor.link.start(lambda client, over: taken.append((client, over)))
        supervisor.link.ready()
        assert await supervisor.receive() == {"op": "ready"}
        client, peer = socket.socketpair()
        bus.pass_socket(supervisor.channel, client, over_limit=True)
        client.close()
        for _ in range(50):
            if taken:
                break
            await asyncio.sleep(0.01)
        assert [over for _, over in taken] == [True]
        taken[0][0].close()
        peer.close()
        supervisor.link.session_closed()
        assert await supervisor.receive() == {"op": "closed"}
        # a handover whose socket did not arrive (the worker was out of file descriptors)
        # still ends a session the supervisor counts
        supervisor.channel.send(bus.WITHIN_LIMIT)
        assert await supervisor.receive() == {"op": "closed"}
        supervisor.channel.close()  # the supervisor is gone
        await asyncio.wait_for(lost.wait(), 5)
        assert await supervisor.receive() == {"op": "draining"}  # it takes no more clients
        assert not supervisor.link.connected
        with pytest.raises(LinkLost):
            await supervisor.link.ask("metrics")
        await supervisor.link.close()
        supervisor.writer.close()

    asyncio.run(go())


def test_a_link_carries_notes_and_questions_both_ways() -> None:
    async def go() -> None:
        supervisor = Supervisor()
        await supervisor.start()
        notes: list[dict[str, Any]] = []
        supervisor.link.notes["cancel"] = notes.append
        def broken(note: bus.Message) -> None:
            raise RuntimeError("a handler that fails")

        supervisor.link.notes["broken"] = broken
        supervisor.link.answers["sessions"] = lambda: [[1.5, ["s1"]]]
        await supervisor.link.start(lambda client, over: None)
        # another worker's note, one whose handler fails, and a question to this worker
        supervisor.send({"op": "note", "note": "broken"})
        supervisor.send({"op": "note", "note": "cancel", "pid": 9, "secret": "01020304"})
        supervisor.send({"op": "ask", "id": 41, "question": "sessions"})
        supervisor.send({"op": "ask", "id": 42, "question": "unknown"})
        assert await supervisor.receive() == {"op": "answer", "id": 41, "value": [[1.5, ["s1"]]]}
        assert await supervisor.receive() == {"op": "answer", "id": 42, "value": None}
        assert notes == [{"op": "note", "note": "cancel", "pid": 9, "secret": "01020304"}]
        # this worker's note and question to the others
        supervisor.link.note("functions", resource="app")
        assert await supervisor.receive() == {"op": "note", "note": "functions", "resource": "app"}
        asking = asyncio.ensure_future(supervisor.link.ask("metrics"))
        question = await supervisor.receive()
        assert question == {"op": "ask", "id": question["id"], "question": "metrics"}
        supervisor.send({"op": "answers", "id": question["id"], "values": ["a", "b"]})
        assert await asyncio.wait_for(asking, 5) == ["a", "b"]
        await supervisor.link.close()
        supervisor.writer.close()
        supervisor.channel.close()

    asyncio.run(go())


def test_a_function_change_is_told_to_the_other_workers_once() -> None:
    told: list[str] = []
    here = FunctionCatalog(FunctionSettings())
    here.on_change = told.append
    here.note_change("app")  # a statement in this worker
    here.note_change("app", shared=False)  # another worker's, arriving over the bus
    assert told == ["app"]


# -- /metrics over several workers ---------------------------------------------------------


def _exposition(connections: int, bytes_in: int, pending: int, connect: list[float]) -> str:
    registry = CollectorRegistry()
    Gauge("pgvouch_client_connections_active", "active", registry=registry).set(connections)
    Counter("pgvouch_client_received_bytes", "in", registry=registry).inc(bytes_in)
    Gauge("pgvouch_requests_pending", "pending", registry=registry).set(pending)
    failures = Counter("pgvouch_auth_failures", "failures", ["reason"], registry=registry)
    failures.labels("password").inc(connections)
    histogram = Histogram("pgvouch_upstream_connect_seconds", "connect", registry=registry,
                          buckets=(0.01, 0.1))
    for seconds in connect:
        histogram.observe(seconds)
    return generate_latest(registry).decode()


def test_metrics_are_summed_over_workers_except_what_they_share() -> None:
    own = _exposition(2, 100, 5, [0.005, 0.05])
    other = _exposition(3, 40, 5, [0.5])
    merged = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for family in text_string_to_metric_families(merge_expositions(own, [other]).decode())
              for s in family.samples}
    assert merged[("pgvouch_client_connections_active", ())] == 5
    assert merged[("pgvouch_client_received_bytes_total", ())] == 140
    assert merged[("pgvouch_requests_pending", ())] == 5  # the store's, not a sum
    assert merged[("pgvouch_auth_failures_total", (("reason", "password"),))] == 5
    assert merged[("pgvouch_upstream_connect_seconds_bucket", (("le", "0.01"),))] == 1
    assert merged[("pgvouch_upstream_connect_seconds_bucket", (("le", "0.1"),))] == 2
    assert merged[("pgvouch_upstream_connect_seconds_count", ())] == 3
    assert merged[("pgvouch_upstream_connect_seconds_sum", ())] == pytest.approx(0.555)
    created = [value for (name, _), value in merged.items() if name.endswith("_created")]
    own_created = [s.value for family in text_string_to_metric_families(own)
                   for s in family.samples if s.name.endswith("_created")]
    assert created and min(created) <= min(own_created)


# -- what a worker wires to the bus (proxy.cli.link_workers) --------------------------------

class Noting(FunctionCatalog):
    def __init__(self, settings: FunctionSettings) -> None:
        super().__init__(settings)
        self.noted: list[tuple[str, bool]] = []

    def note_change(self, resource: str, shared: bool = True) -> None:
        self.noted.append((resource, shared))
        super().note_change(resource, shared)


def test_a_worker_tells_the_others_of_unknown_cancel_keys_and_function_changes(
    tmp_path: Path
) -> None:
    async def go() -> None:
        supervisor = Supervisor()
        await supervisor.start()
        server = minimal_server(tmp_path)
        server.functions = catalog = Noting(FunctionSettings())
        server.link = supervisor.link
        stop = asyncio.Event()
        link_workers(supervisor.link, server, None, stop)
        await server.start()
        # a cancel key of no session here: to the other workers, secret and all (local)
        await server.cancel(77, b"\x01\x02\x03\x04")
        assert await supervisor.receive() == {"op": "note", "note": "cancel", "pid": 77,
                                              "secret": "01020304"}
        # with a store shared by replicas, its announcement reaches the workers too: once
        announced: list[str] = []

        async def announce(key: str) -> None:
            announced.append(key)

        server.announce_cancel = announce
        await server.cancel(78, b"\x01\x02\x03\x04")
        assert len(announced) == 1
        # a function change here is told to the others; theirs does not come back
        catalog.note_change("app")
        assert await supervisor.receive() == {"op": "note", "note": "functions",
                                              "resource": "app"}
        supervisor.send({"op": "note", "note": "functions", "resource": "other"})
        supervisor.send({"op": "ask", "id": 5, "question": "sessions"})
        assert await supervisor.receive() == {"op": "answer", "id": 5, "value": []}
        assert catalog.noted == [("app", True), ("other", False)]  # no echo of "other"
        supervisor.channel.close()  # the supervisor is gone: the worker stops
        await asyncio.wait_for(stop.wait(), 5)
        await supervisor.link.close()
        supervisor.writer.close()

    asyncio.run(go())
