"""Prometheus metrics for the proxy.

Owns: the registry and the metric names. Hot-path counters (bytes,
statements) live as plain integers on each session and are summed here at
scrape time, so the relay never takes a lock per message; rare events
(connects, auth failures) use ordinary prometheus-client metrics.

Must not: serve HTTP (``proxy.api`` does) or hold references that keep
closed sessions alive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

# Gauges of what the workers share (the approvals store), not of each process: with
# several workers, /metrics shows the value of the process that serves it.
SHARED_GAUGES = frozenset({"pgvouch_requests_pending"})


class Totals(Protocol):
    def live_totals(self) -> tuple[int, int, int, int, dict[str, int]]:
        """(active sessions, total sessions, bytes in, bytes out, decisions by action)."""
        ...


class _SessionCollector(Collector):
    def __init__(self, source: Callable[[], tuple[int, int, int, int, dict[str, int]]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        active, total, bytes_in, bytes_out, decisions = self._source()
        yield GaugeMetricFamily(
            "pgvouch_client_connections_active", "Client sessions currently open", value=active
        )
        yield CounterMetricFamily(
            "pgvouch_client_connections", "Client connections accepted", value=total
        )
        yield CounterMetricFamily(
            "pgvouch_client_received_bytes", "Bytes received from clients", value=bytes_in
        )
        yield CounterMetricFamily(
            "pgvouch_client_sent_bytes", "Bytes sent to clients", value=bytes_out
        )
        statements = CounterMetricFamily(
            "pgvouch_statements", "Statement units by decision", labels=["decision"]
        )
        for action in sorted(set(decisions) | {"allow", "deny"}):
            statements.add_metric([action], decisions.get(action, 0))
        yield statements


class ProxyMetrics:
    def __init__(self, totals: Totals) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_SessionCollector(totals.live_totals))
        self.auth_failures = Counter(
            "pgvouch_auth_failures", "Client authentication failures", ["reason"],
            registry=self.registry,
        )
        self.upstream_connect_seconds = Histogram(
            "pgvouch_upstream_connect_seconds", "Time to connect and log in upstream",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.upstream_connect_failures = Counter(
            "pgvouch_upstream_connect_failures", "Failed upstream logins", registry=self.registry
        )
        self.policy_reloads = Counter(
            "pgvouch_policy_reloads", "Policy reloads by result", ["result"],
            registry=self.registry,
        )
        self.requests_pending = Gauge(
            "pgvouch_requests_pending", "Approval requests waiting for a decision",
            registry=self.registry,
        )
        self.request_decisions = Counter(
            "pgvouch_request_decisions", "Approval requests by final decision", ["outcome"],
            registry=self.registry,
        )
        self.decision_seconds = Histogram(
            "pgvouch_request_decision_seconds", "Time from request to decision",
            buckets=(5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 8 * 3600, 24 * 3600),
            registry=self.registry,
        )
        self.webhook_deliveries = Counter(
            "pgvouch_webhook_deliveries", "Outbound webhook deliveries by result", ["result"],
            registry=self.registry,
        )

    def observe_request(self, request: Any, events: Sequence[Any]) -> None:
        """An approvals-service listener: count creations and decisions."""
        for event in events:
            kind = str(event.type)
            if kind == "request.created":
                self.requests_pending.inc()
            elif kind in _DECISIONS:
                self.requests_pending.dec()
                self.request_decisions.labels(_DECISIONS[kind]).inc()
                if request.decided_at is not None:
                    self.decision_seconds.observe(max(0.0, request.decided_at - request.created_at))


_DECISIONS = {
    "request.approved": "approved", "request.denied": "denied",
    "request.cancelled": "cancelled", "request.expired": "expired",
}


class _Merged(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def merge_expositions(own: str, others: Sequence[str]) -> bytes:
    """One exposition for several workers: every sample summed over ``own`` and ``others``
    (``*_created`` the earliest), except :data:`SHARED_GAUGES`, which are ``own``'s."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for position, text in enumerate([own, *others]):
        for family in text_string_to_metric_families(text):
            if position and family.name in SHARED_GAUGES:
                continue
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            samples = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in samples:
                    samples[key] = sample.value
                elif sample.name.endswith("_created"):
                    samples[key] = min(samples[key], sample.value)
                else:
                    samples[key] += sample.value
    merged = []
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
        merged.append(family)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(merged))
    return generate_latest(registry)
