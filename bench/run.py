"""The relay benchmark: pgbench against PostgreSQL directly, pgbouncer, pgvouch and pgvouch+policy.

Owns: starting a throwaway PostgreSQL (:class:`proxy.pgcluster.LocalPostgres`)
with a ``pgbench -i`` database, a pgbouncer in session mode and two pgvouch
processes (``pgvouch serve``, each its own process, as users run it) in front
of it: ``pgvouch`` relays only (no ``policies:``), ``pgvouch+policy`` loads
the policy set in ``bench/policies/`` (or ``--policies DIR``) with an
approvals/audit store. It runs pgbench select-only (simple, extended,
prepared) and TPC-B-like at 1 and 16 clients against all of them, and
prints one table of tps, latency and the ratios pgvouch/direct,
pgvouch/pgbouncer and pgvouch+policy/pgvouch. A fifth target, the *bare
relay* (``bench/bare_relay.py``: uvloop Protocols forwarding bytes unread),
shows what any Python relay on uvloop costs here before doing any work of
its own: bare/pgbouncer is the ceiling of a one-process pgvouch/pgbouncer here.
Both pgvouch targets run ``workers:`` relay processes (``--workers``, by
default one per CPU; several share a PostgreSQL approvals store, in the
bench cluster).
The targets of a cell are run back to back, in an order that rotates from
cell to cell and round to round, so drift (cache warm-up, CPU frequency,
autovacuum) hits all of them alike; 1-client cells pin every process to
one CPU (see :class:`Placement`). Results also go to
``bench/results/latest.json``.

The targets the issues set are ratios from one run on the 2-core dev
machine: on every select-only mode pgvouch reaches at least 0.9x pgbouncer's
tps at 16 clients and 0.8x at 1 client (issue #2), and pgvouch+policy at
least 0.9x pgvouch's tps at 16 clients (issue #3). Cells below them are
marked.

TPC-B-like writes would be held for review under the ``bench`` policy, so
in that mode pgvouch+policy connects as ``bench/writer``: an account whose
policy allows the pgbench writes, each audited durably before it runs. A
policy set that refuses those writes (``--policies DIR``) shows ``-`` there.

Must not: import the proxy's internals beyond the cluster launcher, or
decide anything about the proxy's design; it only measures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from proxy.pgcluster import LocalPostgres, PgClusterError, find_client_binary  # noqa: E402

HOST = "127.0.0.1"
DATABASE = "bench"
ROLE = "bench_user"
ROLE_PASSWORD = "bench-secret-password"
CLIENT_USER = "bench"  # the person pgvouch and pgbouncer see; trust auth for both
RESULTS = REPO / "bench" / "results" / "latest.json"
PROFILE = REPO / "bench" / "results" / "pgvouch-profile.txt"
POLICIES = REPO / "bench" / "policies"
WRITER_ACCOUNT = "writer"  # pgvouch+policy's account for TPC-B-like; see bench/policies/bench.yaml
SCALE = 10
CLIENT_COUNTS = (1, 16)
RELAY, POLICY, BARE = "pgvouch", "pgvouch+policy", "bare relay"
TARGETS = ("direct", "pgbouncer", BARE, RELAY, POLICY)
# Minimum pgvouch/pgbouncer tps ratio by client count, for select-only modes (issue #2).
GOALS = {1: 0.8, 16: 0.9}
# Minimum pgvouch+policy/pgvouch tps ratio by client count, for select-only modes (issue #3).
POLICY_GOALS = {16: 0.9}
START_TIMEOUT = 30.0


class BenchError(RuntimeError):
    """Something the benchmark needs is missing or did not start."""


class PolicyRefused(BenchError):
    """pgvouch's policy refused (denied, or wanted approval for) one of pgbench's statements."""


@dataclass(frozen=True)
class Mode:
    name: str
    pgbench_args: tuple[str, ...]
    select_only: bool


MODES = (
    Mode("select-only simple", ("-S", "-M", "simple"), True),
    Mode("select-only extended", ("-S", "-M", "extended"), True),
    Mode("select-only prepared", ("-S", "-M", "prepared"), True),
    Mode("tpcb-like simple", ("-M", "simple"), False),
)


@dataclass(frozen=True)
class Target:
    """Where pgbench connects, and as whom."""

    name: str
    port: int
    user: str
    password: str | None = None
    log: Path | None = None
    pid: int | None = None  # the proxy process, whose CPU time each run records
    write_dbname: str = DATABASE  # the dbname for modes that write (TPC-B-like)

    def dbname(self, mode: Mode) -> str:
        return DATABASE if mode.select_only else self.write_dbname


@dataclass(frozen=True)
class Run:
    """One pgbench invocation's figures."""

    tps: float
    latency_ms: float
    transactions: int
    failed: int
    seconds: float
    proxy_cpu_seconds: float | None = None


@dataclass
class Measured:
    """All runs of one target in one cell, combined.

    tps and latency are medians over the runs, so the odd run disturbed by
    other work on a small shared machine does not drag the figure the way it
    would drag a mean.
    """

    runs: list[Run] = field(default_factory=list)
    refused: str | None = None  # why the policy would not let pgbench run here

    @property
    def tps(self) -> float:
        return statistics.median(run.tps for run in self.runs) if self.runs else 0.0

    @property
    def mean_tps(self) -> float:
        return statistics.fmean(run.tps for run in self.runs) if self.runs else 0.0

    @property
    def latency_ms(self) -> float:
        return statistics.median(run.latency_ms for run in self.runs) if self.runs else 0.0

    @property
    def cpu_us_per_transaction(self) -> float | None:
        """The proxy's own CPU time (user + system) per transaction."""
        cpu = [run.proxy_cpu_seconds for run in self.runs]
        done = sum(run.transactions for run in self.runs)
        if not done or any(c is None for c in cpu):
            return None
        return 1e6 * sum(c for c in cpu if c is not None) / done


@dataclass
class Cell:
    mode: Mode
    clients: int
    by_target: dict[str, Measured] = field(
        default_factory=lambda: {name: Measured() for name in TARGETS}
    )

    def ratio(self, baseline: str, of: str = RELAY) -> float | None:
        """``of``'s tps over ``baseline``'s; None when either did not run."""
        base, measured = self.by_target[baseline], self.by_target[of]
        if not base.runs or not measured.runs or not base.tps:
            return None
        return measured.tps / base.tps

    @property
    def policy_ratio(self) -> float | None:
        """pgvouch+policy over relay-only pgvouch: what the policy engine costs."""
        return self.ratio(RELAY, of=POLICY)

    @property
    def goal(self) -> float | None:
        return GOALS.get(self.clients) if self.mode.select_only else None

    @property
    def meets_goal(self) -> bool | None:
        return _meets(self.ratio("pgbouncer"), self.goal)

    @property
    def policy_goal(self) -> float | None:
        return POLICY_GOALS.get(self.clients) if self.mode.select_only else None

    @property
    def meets_policy_goal(self) -> bool | None:
        return _meets(self.policy_ratio, self.policy_goal)


def _meets(ratio: float | None, goal: float | None) -> bool | None:
    if goal is None:
        return None
    return ratio is not None and ratio >= goal


# -- processes -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without PG* variables that would redirect libpq."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """``sig``, then SIGKILL if the process has not exited after a while."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def wait_accepting(port: int, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    raise BenchError(f"{what} did not listen on {HOST}:{port}:\n{tail(log)}")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process and its children (pgvouch's workers) have used so
    far, from /proc."""
    total = 0
    for each in [pid, *children(pid)]:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{each}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def unprivileged_user(pg: LocalPostgres) -> pwd.struct_passwd | None:
    """The user the cluster runs as when we are root (pgbouncer refuses root too)."""
    return pwd.getpwnam(pg.run_as) if pg.run_as is not None else None


def private_dir(prefix: str, owner: pwd.struct_passwd | None) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)
    return path


# -- PostgreSQL ------------------------------------------------------------------


def start_postgres(stack: contextlib.ExitStack) -> LocalPostgres:
    pg = LocalPostgres(max_connections=150)
    stack.callback(pg.stop)
    pg.start()
    return pg


def prepare_database(pg: LocalPostgres, pgbench: str) -> None:
    """A SCRAM login role owning ``bench``, filled by ``pgbench -i -s SCALE``."""
    pg.create_role(ROLE, ROLE_PASSWORD, "scram-sha-256")
    pg.create_database(DATABASE, owner=ROLE)
    result = subprocess.run(
        [pgbench, "-i", "-s", str(SCALE), "-q", "-h", HOST, "-p", str(pg.port),
         "-U", ROLE, DATABASE],
        env=clean_env(PGPASSWORD=ROLE_PASSWORD), capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise BenchError(f"pgbench -i failed:\n{result.stderr}")


# -- pgbouncer -------------------------------------------------------------------


def find_pgbouncer() -> str:
    """pgbouncer on PATH or in /usr/sbin; installs the Debian package as root."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if found is not None:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchError(
            "pgbouncer is not installed: install it (Debian/Ubuntu: "
            "`sudo apt-get install -y pgbouncer`) and run the benchmark again"
        )
    print("pgbouncer not found: installing the Debian package", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "pgbouncer"]
    # apt's chatter goes to stderr, so stdout stays the table.
    chatter = sys.stderr.fileno()
    if subprocess.run(install, env=env, stdout=chatter, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=chatter, check=False)
        subprocess.run(install, env=env, stdout=chatter, check=True)
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if found is None:
        raise BenchError("apt-get installed pgbouncer, but no pgbouncer binary was found")
    return found


def version_line(binary: str) -> str:
    output = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return output.stdout.splitlines()[0].strip() if output.stdout else "unknown"


def start_pgbouncer(
    stack: contextlib.ExitStack, binary: str, pg: LocalPostgres
) -> Target:
    """pgbouncer in session mode; it logs in upstream with the role's password."""
    owner = unprivileged_user(pg)
    workdir = private_dir("pgvouch-bench-pgbouncer-", owner)
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    port = free_port()
    userlist = workdir / "userlist.txt"
    userlist.write_text(f'"{CLIENT_USER}" "unused-with-trust"\n')
    ini = workdir / "pgbouncer.ini"
    log = workdir / "pgbouncer.log"
    ini.write_text(
        "[databases]\n"
        f"{DATABASE} = host={HOST} port={pg.port} dbname={DATABASE} "
        f"user={ROLE} password={ROLE_PASSWORD}\n"
        "\n[pgbouncer]\n"
        f"listen_addr = {HOST}\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {userlist}\n"
        "pool_mode = session\n"
        "max_client_conn = 200\n"
        "default_pool_size = 40\n"
        f"logfile = {log}\n"
        "log_connections = 0\n"
        "log_disconnections = 0\n"
    )
    for path in (userlist, ini):
        path.chmod(0o600)
        if owner is not None:
            os.chown(path, owner.pw_uid, owner.pw_gid)
    proc = subprocess.Popen(
        [binary, str(ini)], cwd=workdir, env=clean_env(),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
        user=None if owner is None else owner.pw_uid,
        group=None if owner is None else owner.pw_gid,
        extra_groups=None if owner is None else [],
    )
    stack.callback(stop_process, proc)
    wait_accepting(port, proc, log, "pgbouncer")
    return Target("pgbouncer", port, CLIENT_USER, log=log, pid=proc.pid)


# -- pgvouch ---------------------------------------------------------------------


def pgvouch_command() -> list[str]:
    """The ``pgvouch`` console script next to this Python, else ``-m proxy.cli``."""
    script = Path(sys.executable).with_name("pgvouch")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "proxy.cli"]


def pgvouch_config(port: int, api_port: int, pg: LocalPostgres,
                   policies: Path | None, workdir: Path, workers: int, pin: bool = True) -> str:
    """``pgvouch.yaml``: relay-only, or with ``policies``, a store and the writer account
    and DBA the policy set in bench/policies/ refers to. The store is SQLite in ``workdir``
    for one worker; several share a PostgreSQL store (schema ``pgvouch`` of the bench
    database, its URL in ``BENCH_STORE``), as pgvouch requires. Several workers run
    with ``pin_workers`` (one CPU each) unless ``pin`` is false."""
    accounts = [("app", ROLE)]
    users = [f"  - name: {CLIENT_USER}\n"]
    extra = ""
    if policies is not None:
        accounts.append((WRITER_ACCOUNT, ROLE))
        # Someone who could approve the review rule's `group:dba` step: the
        # loader refuses a step that nobody could ever approve.
        users.append("  - name: dba1\n    groups: [dba]\n")
        sqlite = f"sqlite:///{(workdir / 'bench.db').resolve()}"
        store = "store_env: BENCH_STORE\n" if workers > 1 else f"store: {json.dumps(sqlite)}\n"
        extra = (
            f"policies: {json.dumps(str(policies.resolve()))}\n"
            f"{store}"
            # A statement that needs review is refused at once (SQLSTATE PV001)
            # rather than held: pgbench must never sit waiting for a DBA.
            "hold: {mode: retry}\n"
        )
    return (
        f"listen: {{host: {HOST}, port: {port}}}\n"
        f"api: {{host: {HOST}, port: {api_port}}}\n"
        "client_auth: trust\n"
        f"workers: {workers}\n"
        + ("pin_workers: true\n" if workers > 1 and pin else "")
        +         "limits: {drain_timeout: 2s}\n"
        "resources:\n"
        f"  - name: {DATABASE}\n"
        f"    host: {HOST}\n"
        f"    port: {pg.port}\n"
        f"    database: {DATABASE}\n"
        "    accounts:\n"
        + "".join(
            f"      - name: {name}\n"
            f"        user: {user}\n"
            "        password_env: BENCH_PASSWORD\n"
            for name, user in accounts
        )
        + "users:\n" + "".join(users)
        + "log: {level: WARNING}\n" + extra
    )


def start_pgvouch(
    stack: contextlib.ExitStack, pg: LocalPostgres, policies: Path | None, workers: int,
    pin: bool = True,
) -> tuple[Target, subprocess.Popen[bytes]]:
    """``pgvouch serve``: the relay-only target, or with ``policies`` the pgvouch+policy one."""
    name = RELAY if policies is None else POLICY
    workdir = Path(tempfile.mkdtemp(prefix="pgvouch-bench-proxy-"))
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    port, api_port = free_port(), free_port()
    config = workdir / "pgvouch.yaml"
    log = workdir / "pgvouch.log"
    config.write_text(pgvouch_config(port, api_port, pg, policies, workdir, workers, pin))
    store = pg.dsn(ROLE, DATABASE, ROLE_PASSWORD, schema="pgvouch")
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [*pgvouch_command(), "serve", "--config", str(config)],
            cwd=REPO, env=clean_env(BENCH_PASSWORD=ROLE_PASSWORD, BENCH_STORE=store),
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    stack.callback(stop_process, proc)
    wait_accepting(port, proc, log, name)
    wait_ready(api_port, proc, log)
    write_dbname = DATABASE if policies is None else f"{DATABASE}/{WRITER_ACCOUNT}"
    return Target(name, port, CLIENT_USER, log=log, pid=proc.pid, write_dbname=write_dbname), proc


def start_bare_relay(stack: contextlib.ExitStack, pg: LocalPostgres) -> Target:
    """``bench/bare_relay.py`` in front of PostgreSQL: clients log in as the role itself."""
    workdir = Path(tempfile.mkdtemp(prefix="pgvouch-bench-bare-"))
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    port = free_port()
    log = workdir / "bare-relay.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "bare_relay.py"), str(port), str(pg.port)],
            cwd=REPO, env=clean_env(), stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    stack.callback(stop_process, proc)
    wait_accepting(port, proc, log, BARE)
    return Target(BARE, port, ROLE, ROLE_PASSWORD, log=log, pid=proc.pid)


def wait_ready(api_port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    url = f"http://{HOST}:{api_port}/readyz"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"pgvouch exited with {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as reply:
            if reply.status == 200:
                return
        time.sleep(0.05)
    raise BenchError(f"pgvouch's {url} never answered 200:\n{tail(log)}")


def start_profiler(
    stack: contextlib.ExitStack, pid: int
) -> subprocess.Popen[bytes]:
    """py-spy sampling pgvouch while it holds the GIL (on CPU), collapsed stacks into PROFILE."""
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        raise BenchError("--profile needs py-spy: pip install py-spy")
    PROFILE.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--subprocesses", "--format", "raw",
         "--rate", "250",
         "--gil", "--nonblocking", "--output", str(PROFILE)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    stack.callback(stop_process, proc, signal.SIGINT)
    return proc


def profile_summary(path: Path, top: int = 25) -> str:
    """The functions with the most samples of their own in a collapsed py-spy profile."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # "name (/long/path/file.py:123)" -> "name (file.py)": one row per function
        frames = [re.sub(r"\s*\((?:[^)]*/)?([^/):]+)(?::\d+)?\)", r" (\1)", f)
                  for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "(empty profile)"
    lines = [f"pgvouch profile, {total} samples: self% incl%  function (file)"]
    for frame, count in own.most_common(top):
        lines.append(f"{100 * count / total:5.1f} {100 * inclusive[frame] / total:5.1f}  {frame}")
    return "\n".join(lines)


# -- CPU placement ----------------------------------------------------------------


class Placement:
    """Which CPUs pgbench, PostgreSQL and the proxies may run on, per cell.

    At 1 client a transaction is a strict relay race (pgbench, proxy,
    backend, proxy, pgbench), and on a small VM a wake-up across CPUs costs
    more than the work itself: unpinned runs of the same target differ 3-5x
    depending on where the scheduler put each process. So 1-client cells
    run with every process on one CPU, which measures the work each hop adds
    and repeats within a few percent; 16-client cells use all CPUs.
    """

    def __init__(self, pg: LocalPostgres, proxies: Sequence[int], enabled: bool) -> None:
        self.all_cpus = os.sched_getaffinity(0)
        self.one_cpu = {min(self.all_cpus)}
        self.enabled = enabled and len(self.all_cpus) > 1
        self._postmaster = int((pg.datadir / "postmaster.pid").read_text().split()[0])
        self._proxies = list(proxies)
        # the CPUs each proxy thread chose itself (pgvouch's pinned workers): cells on
        # all CPUs give them back, rather than every CPU
        self._own: dict[int, set[int]] = {}
        for pid in self._proxies:
            for task in _tasks(pid):
                with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                    self._own[task] = os.sched_getaffinity(task)

    def cpus_for(self, clients: int) -> set[int]:
        return self.one_cpu if self.enabled and clients == 1 else self.all_cpus

    def apply(self, clients: int) -> None:
        """Pin PostgreSQL (every backend, pooled ones too), the proxies and us (so pgbench)."""
        if not self.enabled:
            return
        cpus = self.cpus_for(clients)
        for pid in [self._postmaster, *children(self._postmaster), *self._proxies]:
            for task in _tasks(pid):
                mine = cpus if cpus != self.all_cpus else self._own.get(task, cpus)
                with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                    os.sched_setaffinity(task, mine)
        os.sched_setaffinity(0, cpus)

    def describe(self) -> str:
        if not self.enabled:
            return "not pinned"
        return f"1-client cells pinned to CPU {min(self.one_cpu)}; 16-client cells on all CPUs"


def _tasks(pid: int) -> list[int]:
    """The threads of a process (none if it exited, a backend since children() saw it)."""
    try:
        return [int(task) for task in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def children(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rpartition(")")[2].split()[1]) == parent:
                found.append(int(stat.parent.name))
    return found


# -- pgbench ---------------------------------------------------------------------

_TPS = re.compile(r"^tps = ([\d.]+)", re.M)
_LATENCY = re.compile(r"^latency average = ([\d.]+) ms", re.M)
_DONE = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)
# pgvouch's messages for a statement a policy denies (42501) or wants approved (PV001).
_REFUSED = re.compile(r"pgvouch: (?:denied by|approval required|this statement needs approval)")


def parse_pgbench(output: str, seconds: float, proxy_cpu_seconds: float | None = None) -> Run:
    tps, latency, done = _TPS.search(output), _LATENCY.search(output), _DONE.search(output)
    if tps is None or latency is None or done is None:
        raise BenchError(f"cannot read pgbench's output:\n{output}")
    failed = _FAILED.search(output)
    return Run(
        tps=float(tps.group(1)),
        latency_ms=float(latency.group(1)),
        transactions=int(done.group(1)),
        failed=int(failed.group(1)) if failed else 0,
        seconds=seconds,
        proxy_cpu_seconds=proxy_cpu_seconds,
    )


def run_pgbench(pgbench: str, target: Target, mode: Mode, clients: int, seconds: int) -> Run:
    argv = [
        pgbench, "-n", "-h", HOST, "-p", str(target.port), "-U", target.user,
        "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds),
        *mode.pgbench_args, target.dbname(mode),
    ]
    env = clean_env(PGPASSWORD=target.password) if target.password else clean_env()
    cpu_before = cpu_seconds(target.pid) if target.pid is not None else 0.0
    try:
        result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False,
                                timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        raise BenchError(
            f"pgbench against {target.name} ({mode.name}, {clients} clients) did not finish "
            f"within {seconds + 60} s; is a statement held for approval?"
            + (f"\n{target.name} log:\n{tail(target.log)}" if target.log else "")
        ) from None
    cpu_used = cpu_seconds(target.pid) - cpu_before if target.pid is not None else None
    if result.returncode != 0:
        refused = _REFUSED.search(result.stderr)
        if refused is not None:
            line = next(ln for ln in result.stderr.splitlines() if refused.group(0) in ln)
            raise PolicyRefused(line[line.index("pgvouch:"):].strip())
        raise BenchError(
            f"pgbench against {target.name} ({mode.name}, {clients} clients) failed "
            f"with {result.returncode}:\n{result.stderr.strip()}"
            + (f"\n{target.name} log:\n{tail(target.log)}" if target.log else "")
        )
    return parse_pgbench(result.stdout, seconds, cpu_used)


def reset_tpcb(pg: LocalPostgres) -> None:
    """What pgbench's own pre-run vacuum does, done directly so every target starts alike."""
    pg.psql(
        "VACUUM pgbench_branches, pgbench_tellers; TRUNCATE pgbench_history;",
        database=DATABASE,
    )


def rotated(items: Sequence[Target], by: int) -> list[Target]:
    shift = by % len(items)
    return [*items[shift:], *items[:shift]]


def measure(
    pg: LocalPostgres,
    pgbench: str,
    targets: Sequence[Target],
    placement: Placement,
    seconds_per_round: int,
    rounds: int,
) -> Iterator[Cell]:
    """Every (mode, clients) cell; targets interleaved, order rotating per round.

    A policy that refuses pgbench's writes (TPC-B-like) leaves that target out
    of the cell, marked refused; refusing select-only pgbench is an error.
    """
    turn = 0
    for mode in MODES:
        for clients in CLIENT_COUNTS:
            cell = Cell(mode, clients)
            for _ in range(rounds):
                for target in rotated(targets, turn):
                    measured = cell.by_target[target.name]
                    if measured.refused is not None:
                        continue
                    if not mode.select_only:
                        reset_tpcb(pg)
                    placement.apply(clients)
                    try:
                        run = run_pgbench(pgbench, target, mode, clients, seconds_per_round)
                    except PolicyRefused as exc:
                        if mode.select_only:
                            raise BenchError(
                                f"the policy refused select-only pgbench on {target.name}: {exc}"
                            ) from None
                        measured.refused = str(exc)
                        continue
                    measured.runs.append(run)
                turn += 1
            yield cell


def check_policy_enforced(psql: str, target: Target) -> None:
    """bench/policies/ is loaded and enforced: TRUNCATE is denied, a write needs approval."""
    expected = {
        "TRUNCATE pgbench_history": 'pgvouch: denied by policy "bench"',
        "UPDATE pgbench_branches SET bbalance = bbalance WHERE bid = 1":
            'pgvouch: approval required',
    }
    for sql, message in expected.items():
        result = subprocess.run(
            [psql, "-X", "-q", "-h", HOST, "-p", str(target.port), "-U", target.user,
             "-d", DATABASE, "-c", sql],
            env=clean_env(), capture_output=True, text=True, check=False, timeout=30,
        )
        if result.returncode == 0 or message not in result.stderr:
            raise BenchError(
                f"{target.name} did not enforce bench/policies/: {sql!r} should fail with "
                f"{message!r}, got exit {result.returncode}: {result.stderr.strip() or '(nothing)'}"
            )


# -- output ----------------------------------------------------------------------


def _cpu(measured: Measured) -> str:
    value = measured.cpu_us_per_transaction
    return "-" if value is None else f"{value:.1f}"


def _tps(measured: Measured) -> str:
    return f"{measured.tps:.0f}" if measured.runs else "-"


def _latency(measured: Measured) -> str:
    return f"{measured.latency_ms:.3f}" if measured.runs else "-"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def _goal(goal: float | None, meets: bool | None) -> str:
    """The goal and whether the cell meets it, as two columns."""
    mark = "" if meets is None else ("ok" if meets else "BELOW")
    return f"{'' if goal is None else f'{goal:.1f}x':>4} {mark:<5}"


def render_table(cells: Sequence[Cell]) -> str:
    header = (
        f"{'mode':<21} {'cli':>3} | {'tps direct':>10} {'pgbouncer':>9} {'bare':>6} "
        f"{'pgvouch':>9} {POLICY:>14} | "
        f"{'lat ms dir':>10} {'pgbouncer':>9} {'pgvouch':>9} {'+policy':>8} | "
        f"{'vouch/dir':>9} {'vouch/bnc':>9} {'goal':>4} {'':<5} | "
        f"{'bare/bnc':>8} {'vouch/bare':>10} | "
        f"{'policy/relay':>12} {'goal':>4} {'':<5} | "
        f"{'cpu us/tx bnc':>13} {'bare':>5} {'vouch':>6} {'+policy':>7}"
    )
    lines = [header, "-" * len(header)]
    for cell in cells:
        t = cell.by_target
        lines.append(
            f"{cell.mode.name:<21} {cell.clients:>3} | "
            f"{_tps(t['direct']):>10} {_tps(t['pgbouncer']):>9} {_tps(t[BARE]):>6} "
            f"{_tps(t[RELAY]):>9} {_tps(t[POLICY]):>14} | "
            f"{_latency(t['direct']):>10} {_latency(t['pgbouncer']):>9} "
            f"{_latency(t[RELAY]):>9} {_latency(t[POLICY]):>8} | "
            f"{_ratio(cell.ratio('direct')):>9} {_ratio(cell.ratio('pgbouncer')):>9} "
            f"{_goal(cell.goal, cell.meets_goal)} | "
            f"{_ratio(cell.ratio('pgbouncer', of=BARE)):>8} {_ratio(cell.ratio(BARE)):>10} | "
            f"{_ratio(cell.policy_ratio):>12} {_goal(cell.policy_goal, cell.meets_policy_goal)} | "
            f"{_cpu(t['pgbouncer']):>13} {_cpu(t[BARE]):>5} {_cpu(t[RELAY]):>6} "
            f"{_cpu(t[POLICY]):>7}"
        )
    return "\n".join(lines)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def cell_json(cell: Cell) -> dict[str, object]:
    return {
        "mode": cell.mode.name,
        "pgbench_args": list(cell.mode.pgbench_args),
        "clients": cell.clients,
        "threads": min(cell.clients, 2),
        "targets": {
            name: {
                "tps": round(m.tps, 1),
                "mean_tps": round(m.mean_tps, 1),
                "latency_ms": round(m.latency_ms, 4),
                "proxy_cpu_us_per_transaction": m.cpu_us_per_transaction,
                "refused": m.refused,
                "runs": [asdict(run) for run in m.runs],
            }
            for name, m in cell.by_target.items()
        },
        "pgvouch_vs_direct": _rounded(cell.ratio("direct")),
        "pgvouch_vs_pgbouncer": _rounded(cell.ratio("pgbouncer")),
        "goal_vs_pgbouncer": cell.goal,
        "meets_goal": cell.meets_goal,
        "bare_vs_pgbouncer": _rounded(cell.ratio("pgbouncer", of=BARE)),
        "pgvouch_vs_bare": _rounded(cell.ratio(BARE)),
        "policy_vs_relay": _rounded(cell.policy_ratio),
        "goal_policy_vs_relay": cell.policy_goal,
        "meets_policy_goal": cell.meets_policy_goal,
    }


def shown_path(path: Path) -> str:
    """``path`` relative to the repository when it is inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(resolved)


def git_revision() -> str:
    result = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True, text=True, check=False,
    )
    return result.stdout.strip() or "unknown"


def write_results(path: Path, meta: dict[str, object], cells: Sequence[Cell]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"meta": meta, "cells": [cell_json(cell) for cell in cells]}
    path.write_text(json.dumps(document, indent=2) + "\n")


# -- main ------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="pgbench against PostgreSQL directly, pgbouncer (session mode), pgvouch "
                    "(relay only), pgvouch+policy and a bare uvloop relay (one process's ceiling).",
    )
    parser.add_argument("--quick", action="store_true",
                        help="a short run to check the setup: 3 s per target and cell, 1 round")
    parser.add_argument("--duration", type=int, metavar="SECONDS",
                        help="seconds each target runs in each cell, split over the rounds "
                             "(default 10, or 3 with --quick)")
    parser.add_argument("--rounds", type=int,
                        help="interleaved rounds per cell, each a run of every target "
                             "(default 5, or 1 with --quick): short alternating runs average "
                             "out the run-to-run spread of a shared 2-core machine")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        metavar="N",
                        help="pgvouch's `workers:` (relay processes) for both pgvouch targets "
                             "(default: one per CPU, %(default)s here)")
    parser.add_argument("--unpinned-workers", action="store_true",
                        help="run pgvouch's workers without `pin_workers: true` (by default "
                             "each worker has a CPU of its own)")
    parser.add_argument("--policies", type=Path, metavar="DIR",
                        help="the policy directory of the pgvouch+policy target (config key "
                             f"`policies`; default {POLICIES.relative_to(REPO)}/)")
    parser.add_argument("--profile", action="store_true",
                        help=f"record the relay-only pgvouch with py-spy into {PROFILE.relative_to(REPO)} "
                             "and print its hottest functions")
    parser.add_argument("--no-pin", action="store_true",
                        help="let the scheduler place every process in 1-client cells too "
                             "(noisy on a small VM; see Placement)")
    parser.add_argument("--output", type=Path, default=RESULTS,
                        help="where to write the JSON results (default: %(default)s)")
    args = parser.parse_args(argv)
    args.duration = args.duration or (3 if args.quick else 10)
    args.rounds = args.rounds or (1 if args.quick else 5)
    if args.duration < args.rounds:
        parser.error("--duration must give each round at least one second")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.policies is not None and not args.policies.is_dir():
        parser.error(f"--policies {args.policies}: not a directory")
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_benchmark(args: argparse.Namespace) -> tuple[dict[str, object], list[Cell]]:
    """Start everything, measure every cell, stop everything; the figures and their context."""
    seconds_per_round = args.duration // args.rounds
    pgbench = find_client_binary("pgbench")
    psql = find_client_binary("psql")
    pgbouncer = find_pgbouncer()
    policies = args.policies if args.policies is not None else POLICIES
    with contextlib.ExitStack() as stack:
        print("starting PostgreSQL ...", file=sys.stderr)
        pg = start_postgres(stack)
        print(f"pgbench -i -s {SCALE} ...", file=sys.stderr)
        prepare_database(pg, pgbench)
        bouncer = start_pgbouncer(stack, pgbouncer, pg)
        pin = not args.unpinned_workers
        vouch, vouch_proc = start_pgvouch(stack, pg, None, args.workers, pin)
        vouch_policy, _ = start_pgvouch(stack, pg, policies, args.workers, pin)
        bare = start_bare_relay(stack, pg)
        if args.policies is None:
            check_policy_enforced(psql, vouch_policy)
        targets = [Target("direct", pg.port, ROLE, ROLE_PASSWORD), bouncer, bare, vouch,
                   vouch_policy]
        print("warming up ...", file=sys.stderr)
        for target in targets:
            run_pgbench(pgbench, target, MODES[0], 2, 2 if args.quick else 5)
        profiler = start_profiler(stack, vouch_proc.pid) if args.profile else None
        total = len(MODES) * len(CLIENT_COUNTS) * len(targets) * args.rounds
        print(
            f"measuring: {total} pgbench runs of {seconds_per_round} s "
            f"(about {total * seconds_per_round / 60:.1f} min)",
            file=sys.stderr,
        )
        cells: list[Cell] = []
        proxies = [target.pid for target in targets if target.pid is not None]
        proxies += [child for pid in proxies for child in children(pid)]  # pgvouch's workers
        placement = Placement(pg, proxies, enabled=not args.no_pin)
        for cell in measure(pg, pgbench, targets, placement, seconds_per_round, args.rounds):
            cells.append(cell)
            print(
                f"  {cell.mode.name}, {cell.clients} clients: "
                + ", ".join(f"{n} {m.tps:.0f} tps" if m.runs else f"{n} refused: {m.refused}"
                            for n, m in cell.by_target.items()),
                file=sys.stderr,
            )
        if profiler is not None:
            stop_process(profiler, signal.SIGINT)
        meta: dict[str, object] = {
            "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "git": git_revision(),
            "postgres": f"PostgreSQL {pg.version}",
            "pgbouncer": version_line(pgbouncer),
            "pgbench": version_line(pgbench),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "scale": SCALE,
            "seconds_per_run": seconds_per_round,
            "rounds": args.rounds,
            "placement": placement.describe(),
            "policies": shown_path(policies),
            "pgvouch_workers": args.workers,
            "pgvouch_pin_workers": args.workers > 1 and not args.unpinned_workers,
            "policy_tpcb_account": WRITER_ACCOUNT,
            "goals_vs_pgbouncer_select_only": GOALS,
            "goals_policy_vs_relay_select_only": POLICY_GOALS,
        }
    return meta, cells


def report(args: argparse.Namespace, meta: dict[str, object], cells: Sequence[Cell]) -> None:
    write_results(args.output, meta, cells)
    below = sum(cell.meets_goal is False for cell in cells)
    policy_below = sum(cell.meets_policy_goal is False for cell in cells)
    tpcb = [cell for cell in cells if not cell.mode.select_only]
    refused = next((c.by_target[POLICY].refused for c in tpcb if c.by_target[POLICY].refused), None)
    if refused is not None:
        tpcb_note = f"TPC-B-like: the policy set refused pgbench's writes ({refused}), so {POLICY} shows -."
    else:
        tpcb_note = (
            f"TPC-B-like: {POLICY} runs as account `{WRITER_ACCOUNT}` (dbname "
            f"{DATABASE}/{WRITER_ACCOUNT}), whose policy allows the pgbench writes: each UPDATE "
            "and INSERT is written durably to the audit store before it runs ("
            + ("SQLite, fsynced, while PostgreSQL here runs with fsync off)." if args.workers == 1
               else "the PostgreSQL store the workers share, in the bench cluster).")
        )
    print()
    print(render_table(cells))
    print()
    print(
        f"goal (issue #2): pgvouch/pgbouncer tps >= {GOALS[16]}x at 16 clients and >= "
        f"{GOALS[1]}x at 1 client on every select-only mode; {below} cell(s) BELOW.\n"
        f"goal (issue #3): {POLICY}/pgvouch tps (policy/relay) >= {POLICY_GOALS[16]}x at 16 "
        f"clients on every select-only mode; {policy_below} cell(s) BELOW. "
        f"Policies: {meta['policies']}.\n"
        f"pgvouch and {POLICY} run with workers: {args.workers} (relay processes)"
        + (", pin_workers: true (a CPU each)" if meta["pgvouch_pin_workers"] else "")
        + "; pgbouncer is one process.\n"
        f"bare: {BARE} (bench/bare_relay.py, one process of uvloop forwarding bytes unread); "
        "bare/bnc is the ceiling of vouch/bnc for any one-process Python relay here.\n"
        f"{tpcb_note}\n"
        f"tps and latency are medians of {args.rounds} interleaved run(s) of "
        f"{meta['seconds_per_run']} s per target; cpu us/tx is the proxy process's own "
        "user+system CPU per transaction.\n"
        f"{meta['postgres']}, {meta['pgbouncer']}, {meta['pgbench']}, {meta['cpus']} CPUs "
        f"shared by everything; {meta['placement']}."
    )
    print(f"results: {args.output}")
    if args.profile and PROFILE.exists():
        print()
        print(profile_summary(PROFILE))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    try:
        meta, cells = run_benchmark(args)
    except KeyboardInterrupt:
        print("\ninterrupted; everything started was stopped", file=sys.stderr)
        return 130
    except (BenchError, PgClusterError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    report(args, meta, cells)
    return 0


if __name__ == "__main__":
    sys.exit(main())
