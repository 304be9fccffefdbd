"""Settings for several replicas: ``store_env`` and the holds' poll / sweep intervals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from config.settings import HoldSettings, Settings, available_cpus, settings_from_node
from config.yamlnodes import ConfigError, load_text

BASE = """\
resources:
  - name: db
    host: 127.0.0.1
    database: app
    accounts: [{name: app, user: app}]
"""


def load(extra: str) -> Settings:
    return settings_from_node(load_text(BASE + extra, "pgvouch.yaml"))


def test_store_env_reads_the_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGV_STORE_URL", "postgresql://u:secret@db:5432/pgvouch?schema=team")
    assert load("store_env: PGV_STORE_URL\n").store == "postgresql://u:secret@db:5432/pgvouch?schema=team"


def test_store_env_problems_name_the_line_and_never_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGV_STORE_URL", raising=False)
    with pytest.raises(ConfigError, match=r"pgvouch.yaml:6: .*PGV_STORE_URL is not set"):
        load("store_env: PGV_STORE_URL\n")
    monkeypatch.setenv("PGV_STORE_URL", "mysql://u:hunter2@db/x")
    with pytest.raises(ConfigError, match="store must be") as refused:
        load("store_env: PGV_STORE_URL\n")
    assert "hunter2" not in str(refused.value)
    with pytest.raises(ConfigError, match="not both"):
        load("store: sqlite:///x.db\nstore_env: PGV_STORE_URL\n")


def test_poll_and_sweep_intervals() -> None:
    assert load("").hold.poll_interval == HoldSettings().poll_interval == 2.0
    assert load("").hold.sweep_interval == 5.0
    hold = load("hold: {poll_interval: 500ms, sweep_interval: 1m}\n").hold
    assert (hold.poll_interval, hold.sweep_interval) == (0.5, 60.0)
    for bad in ("0s", "2h"):
        with pytest.raises(ConfigError, match="poll_interval must be"):
            load(f"hold: {{poll_interval: {bad}}}\n")


def test_workers_default_to_one_and_take_a_number_or_auto() -> None:
    assert load("").workers == 1
    assert load("workers: 4\n").workers == 4
    assert load("workers: auto\n").workers == min(64, available_cpus())
    assert available_cpus() <= len(os.sched_getaffinity(0))
    for bad, error in (("0", "at least 1"), ("65", "at most 64"), ("many", "integer")):
        with pytest.raises(ConfigError, match=rf"pgvouch.yaml:6: .*{error}"):
            load(f"workers: {bad}\n")


def test_pin_workers_is_off_unless_set_to_true() -> None:
    assert load("").pin_workers is False
    assert load("workers: 2\npin_workers: true\n").pin_workers is True
    assert load("workers: 2\npin_workers: false\n").pin_workers is False
    with pytest.raises(ConfigError, match=r"pgvouch.yaml:6: expected true or false"):
        load("pin_workers: sometimes\n")


def test_workers_with_policies_need_a_postgresql_store() -> None:
    policies = "policies: /nonexistent/policies\n"
    with pytest.raises(ConfigError, match=r"pgvouch.yaml:6: workers above 1 with policies need "
                                          r"a PostgreSQL store"):
        load(f"workers: 2\n{policies}")
    with pytest.raises(ConfigError, match="need a PostgreSQL store"):
        load(f"workers: 2\n{policies}store: sqlite:///x.db\n")
    assert load(f"workers: 2\n{policies}store: postgresql://u@db/pgvouch\n").workers == 2
    assert load("workers: 2\n").workers == 2  # relay only: no store at all
    assert load(f"workers: 1\n{policies}").workers == 1


def test_auto_workers_respect_a_cgroup_cpu_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    for text, expected in (("max 100000\n", affinity), ("100000 100000\n", 1),
                           ("150000 100000\n", min(2, affinity)), ("junk\n", affinity)):
        cpu_max.write_text(text)
        assert available_cpus(cpu_max) == expected
    v1 = tmp_path / "cpu"
    v1.mkdir()
    assert available_cpus(tmp_path / "missing", v1) == affinity
    for quota, expected in (("-1", affinity), ("100000", 1)):
        (v1 / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        (v1 / "cpu.cfs_period_us").write_text("100000\n")
        assert available_cpus(tmp_path / "missing", v1) == expected
