"""A worker's end of the bus to its supervisor (``workers:`` above 1).

Owns: taking the client sockets the supervisor hands this worker and giving
them to the server; telling the supervisor when a session ends (it keeps the
connection count all workers share); sending notes to the other workers
(a cancel key of no session here, a function change, a policy reload) and
carrying out theirs; and asking the other workers a question
(``ask``: their metrics, their sessions) and answering theirs.

Must not: handle protocol messages or decide anything: the handlers the
server and the CLI register do.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import Any

from proxy import bus

log = logging.getLogger("pgvouch.worker")


def pin_to_cpu(index: int) -> int | None:
    """``pin_workers``: run this worker only on the ``index``-th CPU (modulo their number)
    among those the process may use; the CPU, or None if the system refused.

    With every worker on a CPU of its own, the kernel tends to run each worker's
    PostgreSQL backends and clients next to it, so a relayed message wakes its
    reader without crossing CPUs. A refusal (a container that forbids it) leaves the
    worker unpinned: this is about speed only.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
        cpu = cpus[index % len(cpus)]
        os.sched_setaffinity(0, {cpu})
    except (OSError, AttributeError) as exc:  # AttributeError: no affinity calls here
        log.warning("pin_workers: could not pin worker-%d to a CPU: %s", index, exc)
        return None
    return cpu

# How long a question to the other workers waits for their answers (the supervisor waits a
# little less, and answers with what it has).
ASK_TIMEOUT = 3.0

Adopt = Callable[[socket.socket, bool], None]


class LinkLost(Exception):
    """The supervisor is gone (the worker is shutting down)."""


class WorkerLink:
    def __init__(self, index: int, control: socket.socket, channel: socket.socket) -> None:
        self.index = index
        self._control = control
        self._channel = channel
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._questions: dict[int, asyncio.Future[list[Any]]] = {}
        # question ids: a fresh range per process, so a late answer meant for this
        # worker's predecessor (restarted under the same index) matches nothing here
        self._ids = itertools.count(secrets.randbelow(2**40) + 1)
        self._adopt: Adopt | None = None
        self.on_lost: Callable[[], None] | None = None  # the supervisor is gone
        self.notes: dict[str, Callable[[bus.Message], None]] = {}  # op → handler
        self.answers: dict[str, Callable[[], Any]] = {}  # question → what this worker answers
        self.connected = False
        self._taking = False

    @classmethod
    def from_argument(cls, value: str) -> tuple[WorkerLink, str, int]:
        """``INDEX:CONTROL_FD:CHANNEL_FD:CONFIG_FD:WORKERS``, as the supervisor passes it:
        the link, the configuration text the supervisor loaded (every worker runs exactly
        that, even one restarted after the file was edited) and the number of workers."""
        index, control, channel, config, workers = (int(part) for part in value.split(":"))
        try:
            size = os.fstat(config).st_size
            text = os.pread(config, size, 0).decode()
        finally:
            os.close(config)
        link = cls(index, socket.socket(fileno=control), socket.socket(fileno=channel))
        return link, text, workers

    async def start(self, adopt: Adopt) -> None:
        """Take client sockets (``adopt`` each) and messages until the supervisor goes."""
        self._adopt = adopt
        loop = asyncio.get_running_loop()
        reader, self._writer = await asyncio.open_unix_connection(sock=self._control)
        self._channel.setblocking(False)
        loop.add_reader(self._channel.fileno(), self._sockets_ready)
        self.connected = self._taking = True
        self._spawn(self._read(reader))

    def ready(self) -> None:
        self._send({"op": "ready"})

    def stop_taking(self) -> None:
        """Draining: tell the supervisor to send no more clients. Any it sent meanwhile
        are still taken, and refused by the draining server with an error."""
        if self._taking:
            self._taking = False
            self._send({"op": "draining"})

    def _stop_reading(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._channel.fileno())

    # -- to the supervisor -------------------------------------------------------
    def session_closed(self) -> None:
        self._send({"op": "closed"})

    def note(self, op: str, **fields: Any) -> None:
        """Tell every other worker (``notes[op]`` is called there)."""
        self._send({"op": "note", "note": op, **fields})

    async def ask(self, question: str) -> list[Any]:
        """The other workers' answers to ``question`` (those that answered in time)."""
        if not self.connected:
            raise LinkLost("the supervisor is gone")
        qid = next(self._ids)
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._questions[qid] = future
        try:
            self._send({"op": "ask", "id": qid, "question": question})
            async with asyncio.timeout(ASK_TIMEOUT + 1):
                return await future
        finally:
            self._questions.pop(qid, None)

    def _send(self, message: bus.Message) -> None:
        if self._writer is None or not self.connected:
            return
        try:
            self._writer.write(bus.frame(message))
        except bus.BusError as exc:  # e.g. an answer over the frame limit: not sent
            log.error("a message to the other workers was not sent: %s", exc)

    # -- from the supervisor -------------------------------------------------------
    def _sockets_ready(self) -> None:
        clients, dropped, ended = bus.receive_sockets(self._channel)
        if dropped:
            log.error("%d client connection(s) handed to this worker arrived without their "
                      "socket (out of file descriptors?): they were dropped", dropped)
            for _ in range(dropped):
                self.session_closed()
        for client, over_limit in clients:
            assert self._adopt is not None
            try:
                self._adopt(client, over_limit)
            except Exception:
                log.exception("a client connection could not be taken over")
                client.close()
                self.session_closed()
        if ended:
            self._lost()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while (message := await bus.read_message(reader)) is not None:
                try:
                    self._dispatch(message)
                except Exception:
                    log.exception("a bus message could not be handled: %s", message.get("op"))
        except (bus.BusError, OSError) as exc:
            log.error("the link to the supervisor broke: %s", exc)
        self._lost()

    def _dispatch(self, message: bus.Message) -> None:
        op = message["op"]
        if op == "ping":
            self._send({"op": "pong"})
        elif op == "note":
            handler = self.notes.get(str(message.get("note")))
            if handler is not None:
                try:
                    handler(message)
                except Exception:
                    log.exception("a note from another worker failed: %s", message.get("note"))
        elif op == "ask":
            answer = self.answers.get(str(message.get("question")))
            try:
                value = answer() if answer is not None else None
            except Exception:
                log.exception("answering another worker failed: %s", message.get("question"))
                value = None
            self._send({"op": "answer", "id": message.get("id"), "value": value})
        elif op == "answers":
            qid = message.get("id")
            future = self._questions.get(qid) if isinstance(qid, int) else None
            if future is not None and not future.done():
                future.set_result(list(message.get("values") or []))

    def _lost(self) -> None:
        if not self.connected:
            return
        self.stop_taking()
        self._stop_reading()
        self.connected = False
        for future in self._questions.values():
            if not future.done():
                future.set_exception(LinkLost("the supervisor is gone"))
        if self.on_lost is not None:
            self.on_lost()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        self.stop_taking()
        self._stop_reading()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
        self._channel.close()
