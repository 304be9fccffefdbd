"""proxy.function_catalog: reading, refreshing and the strict window after DDL.

The reader is replaced by a function returning prepared rows, and the clock
by a counter, so refresh timing is exact; reading a real pg_proc is covered
end to end in tests/e2e/test_function_volatility.py.
"""

from __future__ import annotations

import asyncio

import pytest

from config.settings import Account, FunctionSettings, Resource
from policies.classify import classify
from policies.kinds import Kind
from proxy.function_catalog import CatalogError, FunctionCatalog, Functions, functions_from_rows

ROWS = [
    ("pg_catalog", "now", "false", "true"),
    ("pg_catalog", "random", "true", "true"),
    ("pg_catalog", "count", "false", "true"),
    ("public", "wipe", "true", "false"),
    ("public", "answer", "false", "false"),
    ("app", "touch", "true", "false"),
    ("PG_CATALOG", "Sneaky", "true", "false"),  # not the system schema: PostgreSQL's flag says so
]
RELATIONS = [("public", "wipe_view", "runs"), ("public", "plain_view", "may"),
             ("public", "wipe_view", "may"), ("app", "guarded", "may")]
RESOURCE = Resource("db", "127.0.0.1", 5432, "db", "app", {"app": Account("app", "u")})
ACCOUNT = RESOURCE.accounts["app"]


def test_rows_become_names_bare_and_qualified() -> None:
    functions = functions_from_rows(ROWS, RELATIONS, started_at=1.0)
    assert functions.volatile == {"wipe", "public.wipe", "touch", "app.touch", "sneaky",
                                  "pg_catalog.sneaky"}
    assert functions.user == functions.volatile | {"answer", "public.answer"}
    assert {"now", "pg_catalog.now", "random", "count", "app.touch"} <= functions.known
    assert "random" not in functions.volatile  # built-in: side effects are listed statically
    assert functions.runs == {"wipe_view", "public.wipe_view"}
    assert functions.may_run == {"wipe_view", "public.wipe_view", "plain_view",
                                 "public.plain_view", "guarded", "app.guarded"}
    every = functions_from_rows(ROWS, started_at=1.0, count_all=True)
    assert every.volatile == every.user  # functions.user: all


def test_names_are_lowercased_as_the_classifier_does() -> None:
    functions = functions_from_rows([("public", "ÀB", "true", "false"),
                                     ("public", "àb", "false", "false")], started_at=1.0)
    assert "àb" in functions.volatile  # "ÀB"() reads as àb: counted, never shadowed by "àb"
    assert classify('SELECT "ÀB"()', volatile_functions=functions.volatile,
                    known_functions=functions.known).kind is Kind.WRITE


def _classify(sql: str, functions: Functions, strict: bool = False) -> Kind:
    if strict:
        return classify(sql, volatile_functions=functions.volatile, known_functions=frozenset(),
                        volatile_relations=functions.may_run | functions.runs).kind
    return classify(sql, volatile_functions=functions.volatile, known_functions=functions.known,
                    volatile_relations=functions.runs).kind


def test_what_the_classifier_makes_of_it() -> None:
    functions = functions_from_rows(ROWS, RELATIONS, started_at=1.0)
    assert _classify("SELECT now(), count(*), random() FROM t", functions) is Kind.READ
    assert _classify("SELECT answer()", functions) is Kind.READ
    assert _classify("SELECT wipe()", functions) is Kind.WRITE
    assert _classify("SELECT app.touch()", functions) is Kind.WRITE
    assert _classify("SELECT other.touch()", functions) is Kind.WRITE  # never seen: may be volatile
    assert _classify("SELECT brand_new()", functions) is Kind.WRITE
    assert _classify("SELECT answer()", functions, strict=True) is Kind.WRITE
    assert _classify("SELECT now()", functions, strict=True) is Kind.WRITE  # a new overload?
    result = classify("SELECT brand_new()", volatile_functions=functions.volatile,
                      known_functions=functions.known)
    assert "brand_new(), which pgvouch cannot vouch for" in result.reason
    assert _classify("SELECT * FROM wipe_view", functions) is Kind.WRITE
    assert _classify("SELECT * FROM public.wipe_view v JOIN t USING (id)", functions) is Kind.WRITE
    assert _classify("SELECT * FROM plain_view", functions) is Kind.READ
    assert _classify("SELECT * FROM plain_view", functions, strict=True) is Kind.WRITE
    assert _classify("SELECT * FROM app.guarded", functions, strict=True) is Kind.WRITE
    assert _classify("SELECT * FROM t", functions, strict=True) is Kind.READ
    # nothing to classify differently without function calls; DDL stays DDL
    assert _classify("SELECT 1", functions) is Kind.READ
    assert _classify("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
                     functions) is Kind.DDL


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Reader:
    def __init__(self, clock: _Clock) -> None:
        self.clock = clock
        self.calls = 0
        self.fail = False
        self.rows = list(ROWS)

    async def __call__(self, resource: Resource, account: Account, started: float,
                       count_all: bool) -> Functions:
        self.calls += 1
        await asyncio.sleep(0)
        if self.fail:
            raise CatalogError("permission denied for table pg_proc")
        return functions_from_rows(self.rows, RELATIONS, started_at=started, count_all=count_all)


def _catalog(refresh: float = 60.0) -> tuple[FunctionCatalog, _Reader, _Clock]:
    clock = _Clock()
    reader = _Reader(clock)
    catalog = FunctionCatalog(FunctionSettings(refresh=refresh), reader=reader, clock=clock)
    return catalog, reader, clock


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_first_sessions_wait_for_one_read() -> None:
    async def run() -> None:
        catalog, reader, _ = _catalog()
        assert catalog.view("db") is None
        await asyncio.gather(*(catalog.ensure(RESOURCE, ACCOUNT) for _ in range(5)))
        assert reader.calls == 1
        view = catalog.view("db")
        assert view is not None and "wipe" in view[0]

    asyncio.run(run())


def test_a_failed_first_read_refuses_and_the_next_session_tries_again() -> None:
    async def run() -> None:
        catalog, reader, _ = _catalog()
        reader.fail = True
        with pytest.raises(CatalogError, match="could not read the functions of resource 'db'"):
            await catalog.ensure(RESOURCE, ACCOUNT)
        assert catalog.view("db") is None
        reader.fail = False
        await catalog.ensure(RESOURCE, ACCOUNT)
        assert catalog.view("db") is not None

    asyncio.run(run())


def test_any_reader_failure_is_a_catalog_error() -> None:
    async def run() -> None:
        async def broken(resource: Resource, account: Account, started: float,
                         count_all: bool) -> Functions:
            raise KeyError("PGV_PASSWORD")

        catalog = FunctionCatalog(FunctionSettings(), reader=broken)
        with pytest.raises(CatalogError, match="PGV_PASSWORD"):
            await catalog.ensure(RESOURCE, ACCOUNT)

    asyncio.run(run())


def _fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Timers of a few tens of milliseconds instead of seconds."""
    from proxy import function_catalog

    monkeypatch.setattr(function_catalog, "SETTLE", 0.05)
    monkeypatch.setattr(function_catalog, "RETRY_AFTER", 0.05)


def test_names_are_read_again_after_refresh_and_a_failure_keeps_the_old_ones(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _fast(monkeypatch)

    async def run() -> None:
        catalog = FunctionCatalog(FunctionSettings(refresh=0.2), reader=(reader := _Reader(_Clock())))
        await catalog.ensure(RESOURCE, ACCOUNT)
        assert reader.calls == 1
        await asyncio.sleep(0.1)
        assert reader.calls == 1  # not yet due
        reader.rows.append(("public", "later", "true", "false"))
        await asyncio.sleep(0.2)
        assert reader.calls == 2  # the periodic read
        view = catalog.view("db")
        assert view is not None and "later" in view[0]
        reader.fail = True
        await asyncio.sleep(0.22)
        assert reader.calls >= 3
        view = catalog.view("db")
        assert view is not None and "later" in view[0]  # the last good read stays
        failed = reader.calls
        reader.fail = False
        await asyncio.sleep(0.1)  # retried after RETRY_AFTER, not after a whole refresh
        assert reader.calls > failed

    asyncio.run(run())


async def _read_once() -> tuple[FunctionCatalog, _Reader]:
    """A catalog on the real clock (its timers run), read once."""
    reader = _Reader(_Clock())
    catalog = FunctionCatalog(FunctionSettings(refresh=3600), reader=reader)
    await catalog.ensure(RESOURCE, ACCOUNT)
    return catalog, reader


def test_after_a_change_nothing_is_vouched_for_until_a_read_that_started_later(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _fast(monkeypatch)

    async def run() -> None:
        catalog, reader = await _read_once()
        functions = functions_from_rows(ROWS, RELATIONS, started_at=0)
        normal = (functions.volatile, functions.known, functions.runs)
        strict = (functions.volatile, frozenset(), functions.may_run | functions.runs)
        assert catalog.view("db") == normal
        catalog.note_change("db")
        assert catalog.view("db") == strict  # at once, before any read
        assert reader.calls == 1
        await asyncio.sleep(0.1)  # SETTLE has passed: a read ran, and its result ends it
        assert reader.calls == 2
        assert catalog.view("db") == normal
        catalog.note_change("other-resource")  # other resources are not affected
        assert catalog.view("db") == normal
        assert catalog.strict("db") == strict  # what a session that changed functions gets

    asyncio.run(run())


def test_a_read_that_began_before_a_change_does_not_end_the_window(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _fast(monkeypatch)

    async def run() -> None:
        catalog, reader = await _read_once()
        gate = asyncio.Event()
        original = reader.__call__

        async def slow(resource: Resource, account: Account, started: float,
                       count_all: bool) -> Functions:
            await gate.wait()
            return await original(resource, account, started, count_all)

        catalog._reader = slow
        catalog._start("db")  # a read under way ...
        await asyncio.sleep(0.01)
        catalog.note_change("db")  # ... when a change passes
        gate.set()
        await asyncio.sleep(0.01)
        view = catalog.view("db")
        assert view is not None and view[1] == frozenset()  # still strict
        await asyncio.sleep(0.2)
        view = catalog.view("db")
        assert view is not None and view[1] != frozenset()  # a later read ended it

    asyncio.run(run())


def _settings(extra: str) -> FunctionSettings:
    from config.settings import settings_from_node
    from config.yamlnodes import load_text

    text = ("resources:\n  - name: app\n    host: 127.0.0.1\n    database: app\n"
            "    accounts: [{name: app, user: app}]\n" + extra)
    return settings_from_node(load_text(text, "pgvouch.yaml")).functions


def test_settings_default_to_looking_volatility_up() -> None:
    from config.yamlnodes import ConfigError

    assert _settings("") == FunctionSettings(volatility=True, refresh=60, user="volatile")
    assert _settings("functions: {volatility: false, refresh: 5m, user: all}\n") == (
        FunctionSettings(volatility=False, refresh=300, user="all"))
    with pytest.raises(ConfigError, match="refresh must be a duration between 1s and 24h"):
        _settings("functions: {refresh: 0s}\n")
    with pytest.raises(ConfigError, match=r"pgvouch\.yaml:6"):
        _settings("functions: {volatile: true}\n")
