"""Several relay processes behind one listen address (``workers:`` above 1).

One Python process relays as fast as one core allows; ``workers: N`` runs N
``pgvouch serve`` worker processes under this supervisor.

Owns: the listening sockets (the supervisor accepts every client and hands
the socket to the worker with the fewest sessions, so the workers stay
balanced and ``max_client_connections`` is one limit for all of them);
starting the workers, restarting one that dies, and fanning SIGHUP
(reload) and SIGTERM (drain) out to them; and the bus between them: notes
from one worker go to all others, and a question one asks (their metrics,
their sessions) is put to the others and their answers returned.

Must not: read client bytes (workers do everything after ``accept``) or
decide anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from typing import Any

from config.settings import Settings
from proxy import bus
from proxy.worker_link import ASK_TIMEOUT

log = logging.getLogger("pgvouch.supervisor")

STARTUP_TIMEOUT = 120.0  # a worker that has not said "ready" by then failed to start
PING_INTERVAL = 2.0  # how often the supervisor checks that each worker's event loop answers
STALL_AFTER = 6.0  # a worker silent this long gets no new clients until it answers again
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # between restarts of a worker that keeps dying
ACCEPTS_PER_WAKEUP = 64
WAITING_CLIENTS = 256  # accepted clients no worker could take yet; beyond: accepting pauses
RETRY_HANDOVER = 0.05  # seconds between tries to hand those clients over


class Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.channel: socket.socket | None = None
        self.sessions = 0  # client sockets handed over and not yet reported closed
        self.up = False  # said "ready" since it was (re)started, and has not exited
        self.draining = False  # stopping on its own: keeps its sessions, takes no new ones
        self.stalled = False  # its event loop has not answered a ping for STALL_AFTER
        self.pinged_at: float | None = None  # the oldest ping it has not answered yet
        self.draining_since = 0.0
        self.reading = False  # the supervisor reads its bus messages
        self.ever_ready = False
        self.starts = 0
        self.started_at = 0.0

    @property
    def name(self) -> str:
        return f"worker-{self.index}"

    @property
    def ready(self) -> bool:
        """Whether new clients may go to it."""
        return self.up and not self.draining and not self.stalled

    def send(self, message: bus.Message) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(bus.frame(message))


class Supervisor:
    def __init__(self, settings: Settings, config_path: str, config_text: str) -> None:
        self.settings = settings
        self.config_path = os.path.abspath(config_path)
        # every worker parses exactly the text this process loaded, from a memory file:
        # one restarted after the file was edited runs what the others run
        self.config_fd = os.memfd_create("pgvouch-config")
        os.write(self.config_fd, config_text.encode())
        self._runners: set[asyncio.Task[None]] = set()
        self._waiting: deque[socket.socket] = deque()  # accepted, no worker could take them
        self._retry: asyncio.TimerHandle | None = None
        self.workers = [Worker(index) for index in range(settings.workers)]
        self.listeners: list[socket.socket] = []
        self.accepting = False
        self.stopping = False
        self._ids = itertools.count(1)
        self._answers: dict[int, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._first_start = asyncio.Event()
        self._failed: str | None = None

    # -- lifecycle -------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        try:
            self.listeners = listen_sockets(self.settings.listen.host, self.settings.listen.port)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", self.settings.listen.host,
                      self.settings.listen.port, exc)
            return 1
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        for worker in self.workers:
            runner = loop.create_task(self._keep_running(worker))
            self._runners.add(runner)
            runner.add_done_callback(self._runners.discard)
        self._spawn(self._watch_workers())
        try:
            async with asyncio.timeout(STARTUP_TIMEOUT):
                while (not all(w.up for w in self.workers) and self._failed is None
                       and not stop.is_set()):
                    self._first_start.clear()
                    waits = [asyncio.ensure_future(stop.wait()),
                             asyncio.ensure_future(self._first_start.wait())]
                    try:
                        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for wait in waits:
                            wait.cancel()
        except TimeoutError:
            self._failed = f"the workers did not start within {STARTUP_TIMEOUT:.0f}s"
        if self._failed is not None or stop.is_set():
            if self._failed is not None:
                log.error("%s; stopping", self._failed)
            await self._shutdown()
            return 1 if self._failed is not None else 0
        log.info("listening on %s with %d workers", ", ".join(
            "{}:{}".format(*s.getsockname()[:2]) for s in self.listeners), len(self.workers))
        self._update_accepting()
        await stop.wait()
        log.info("shutting down: the workers drain their sessions")
        await self._shutdown()
        log.info("stopped")
        return 0

    async def _shutdown(self) -> None:
        self.stopping = True
        self._update_accepting()
        for listener in self.listeners:
            listener.close()
        while self._waiting:
            self._waiting.popleft().close()
        for worker in self.workers:
            self._signal(worker, signal.SIGTERM)
        grace = self.settings.limits.drain_timeout + 10.0
        if self._runners:  # each ends when its worker has exited (one started late included)
            _done, late = await asyncio.wait(self._runners, timeout=grace)
            if late:
                for worker in self.workers:
                    if worker.process is not None and worker.process.returncode is None:
                        log.error("%s did not stop within %.0fs: killed", worker.name, grace)
                        self._signal(worker, signal.SIGKILL)
                await asyncio.wait(late, timeout=10)
        for task in [*self._tasks, *self._runners]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._runners, return_exceptions=True)
        os.close(self.config_fd)

    @staticmethod
    def _signal(worker: Worker, signum: int) -> None:
        if worker.process is not None and worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signum)

    def _reload(self) -> None:
        log.info("SIGHUP: the workers reload their policies")
        for worker in self.workers:  # one still starting ignores it until its policies load
            self._signal(worker, signal.SIGHUP)

    # -- workers -----------------------------------------------------------------
    async def _keep_running(self, worker: Worker) -> None:
        """Start ``worker``; start it again when it dies, until the supervisor stops."""
        while not self.stopping:
            try:
                code: int | str = await self._run_worker(worker)
            except Exception as exc:  # e.g. fork or socketpair failed (out of memory or fds)
                log.error("%s could not be started: %s", worker.name, exc)
                code = f"not started ({exc})"
            if self.stopping:
                return
            if worker.starts == 1 and not worker.ever_ready:
                self._failed = f"{worker.name} exited with status {code} while starting"
                self._first_start.set()
                return
            uptime = time.monotonic() - worker.started_at
            delay = RESTART_DELAYS[min(worker.starts - 1, len(RESTART_DELAYS) - 1)]
            if uptime > 60:
                worker.starts, delay = 0, RESTART_DELAYS[0]
            log.error("%s exited with status %s; its sessions were lost; starting it again in "
                      "%.1fs", worker.name, code, delay)
            await asyncio.sleep(delay)

    async def _run_worker(self, worker: Worker) -> int:
        worker.starts += 1
        worker.started_at = time.monotonic()
        control, worker_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            channel, worker_channel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError:
            control.close()
            worker_control.close()
            raise
        argument = (f"{worker.index}:{worker_control.fileno()}:{worker_channel.fileno()}:"
                    f"{self.config_fd}:{len(self.workers)}")
        reading: asyncio.Task[None] | None = None
        try:
            try:
                worker.process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "proxy.cli", "serve", "--config", self.config_path,
                    "--worker", argument,
                    pass_fds=(worker_control.fileno(), worker_channel.fileno(), self.config_fd),
                )
            finally:
                worker_control.close()
                worker_channel.close()
            if self.stopping:  # started while the supervisor was shutting down
                self._signal(worker, signal.SIGTERM)
            channel.setblocking(False)
            worker.channel = channel
            reader, worker.writer = await asyncio.open_unix_connection(sock=control)
            reading = asyncio.get_running_loop().create_task(self._read(worker, reader))
            return await worker.process.wait()
        except BaseException:
            self._signal(worker, signal.SIGKILL)  # started but not tracked: do not leave it
            if worker.process is not None:
                with contextlib.suppress(Exception):
                    await worker.process.wait()
            raise
        finally:
            worker.up = False
            self._update_accepting()
            if reading is not None:
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)
            if worker.writer is not None:
                worker.writer.close()
                worker.writer = None
            else:
                control.close()
            channel.close()
            worker.channel = None
            worker.sessions = 0

    async def _read(self, worker: Worker, reader: asyncio.StreamReader) -> None:
        writer = worker.writer
        worker.reading = True
        try:
            while (message := await bus.read_message(reader)) is not None:
                try:
                    self._dispatch(worker, writer, message)
                except Exception:
                    log.exception("a bus message from %s could not be handled", worker.name)
        except (bus.BusError, OSError) as exc:
            log.error("%s sent what is not a bus message: %s", worker.name, exc)
        finally:
            worker.reading = False

    def _dispatch(self, worker: Worker, writer: asyncio.StreamWriter | None,
                  message: bus.Message) -> None:
        op = message["op"]
        worker.pinged_at = None
        if worker.stalled:
            worker.stalled = False
            log.warning("%s answers again", worker.name)
            self._update_accepting()
        if op == "closed":
            worker.sessions = max(0, worker.sessions - 1)
        elif op == "draining":  # stopping on its own (SIGTERM, lost link): send it no more
            if not worker.draining:
                worker.draining_since = time.monotonic()
                if not self.stopping:
                    log.info("%s is draining: no more clients go to it", worker.name)
            worker.draining = True
            self._update_accepting()
        elif op == "ready":
            worker.up = worker.ever_ready = True
            worker.draining = worker.stalled = False
            log.info("%s (pid %s) is ready", worker.name,
                     worker.process.pid if worker.process else "?")
            self._first_start.set()
            self._update_accepting()
        elif op == "note":  # to every running worker: a draining one still has sessions
            for other in self.workers:
                if other is not worker and other.up:
                    other.send(message)
        elif op == "ask":
            self._spawn(self._ask_others(worker, writer, message.get("id"),
                                         str(message.get("question"))))
        elif op == "answer":
            future = self._answers.get(int(message.get("id") or 0))
            if future is not None and not future.done():
                future.set_result(message.get("value"))

    async def _ask_others(self, asker: Worker, writer: asyncio.StreamWriter | None, qid: Any,
                          question: str) -> None:
        loop = asyncio.get_running_loop()
        waiting: dict[int, asyncio.Future[Any]] = {}
        for other in self.workers:
            if other is not asker and other.up:
                sid = next(self._ids)
                waiting[sid] = self._answers[sid] = loop.create_future()
                other.send({"op": "ask", "id": sid, "question": question})
        if waiting:
            await asyncio.wait(waiting.values(), timeout=ASK_TIMEOUT)
        values = [f.result() for f in waiting.values() if f.done()]
        for sid in waiting:
            self._answers.pop(sid, None)
        if len(values) < len(waiting):
            log.warning("%d worker(s) did not answer %r in time", len(waiting) - len(values),
                        question)
        if asker.writer is writer:  # not to a process that took the asker's place since
            asker.send({"op": "answers", "id": qid, "values": values})

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch_workers(self) -> None:
        """Ping every running worker. One whose event loop stops answering (stuck in a long
        computation, stopped) gets no new clients until it answers again; one whose bus
        the supervisor no longer reads, or that drains far longer than it may, is killed
        (and started again)."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(PING_INTERVAL)
            now = time.monotonic()
            late, last = now - last > 2 * PING_INTERVAL, now  # this process was held up
            for worker in self.workers:
                if not worker.up:
                    continue
                if not worker.reading or (
                        worker.draining and not self.stopping
                        and now - worker.draining_since > self.settings.limits.drain_timeout + 10):
                    log.error("%s is %s: killed", worker.name, "draining for too long"
                              if worker.reading else "not heard on its bus any more")
                    self._signal(worker, signal.SIGKILL)
                    continue
                if worker.pinged_at is None:
                    worker.pinged_at = now
                    worker.send({"op": "ping"})
                elif (not worker.stalled and not late
                      and now - worker.pinged_at > STALL_AFTER):
                    worker.stalled = True
                    log.warning("%s has not answered for %.0fs: no new clients go to it until "
                                "it does", worker.name, now - worker.pinged_at)
                    self._update_accepting()

    # -- clients -----------------------------------------------------------------
    def _update_accepting(self) -> None:
        """Accept while running and some worker is ready; otherwise clients wait in the backlog."""
        want = (not self.stopping and any(w.ready for w in self.workers)
                and len(self._waiting) < WAITING_CLIENTS)
        if want == self.accepting:
            return
        loop = asyncio.get_running_loop()
        for listener in self.listeners:
            if want:
                loop.add_reader(listener.fileno(), self._accept, listener)
            else:
                loop.remove_reader(listener.fileno())
        self.accepting = want

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                client, _address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: the client stays queued
                log.warning("accept failed: %s", exc)
                return
            if self._waiting or not self._hand_over(client):
                self._wait(client)

    def _hand_over(self, client: socket.socket) -> bool:
        """To the ready worker with the fewest sessions; if it cannot take it now, the
        next. False if none could (their queues are full): the client waits here."""
        over = sum(w.sessions for w in self.workers) >= self.settings.limits.max_client_connections
        if client.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ready = [w for w in self.workers if w.ready and w.channel is not None]
        for worker in sorted(ready, key=lambda w: w.sessions):
            assert worker.channel is not None
            try:
                bus.pass_socket(worker.channel, client, over)
            except (BlockingIOError, InterruptedError):
                continue  # its queue is full: the next worker, or wait
            except OSError as exc:
                log.error("could not hand a client connection to %s: %s", worker.name, exc)
                if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                    worker.up = False  # gone; its exit is handled where it is awaited
                    self._update_accepting()
                continue
            worker.sessions += 1
            client.close()  # the worker has it now
            return True
        return False

    def _wait(self, client: socket.socket) -> None:
        """Keep ``client`` until a worker can take it; accepting pauses while many wait."""
        if not self._waiting:
            log.warning("no worker can take a client connection now: clients wait")
        self._waiting.append(client)
        self._update_accepting()
        if self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(RETRY_HANDOVER, self._hand_waiting)

    def _hand_waiting(self) -> None:
        self._retry = None
        while self._waiting and self._hand_over(self._waiting[0]):
            self._waiting.popleft()
        if self._waiting and not self.stopping:
            self._retry = asyncio.get_running_loop().call_later(RETRY_HANDOVER, self._hand_waiting)
        self._update_accepting()


def listen_sockets(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for ``host`` (every address it resolves to; empty: every
    interface, as in one process) and ``port``."""
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
            listener = socket.socket(family, kind, proto)
            sockets.append(listener)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            listener.bind(address)
            listener.listen(1024)
            listener.setblocking(False)
    except OSError:
        for listener in sockets:
            listener.close()
        raise
    return sockets
