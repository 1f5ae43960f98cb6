"""agentd's own operating figures for ``/metrics``: agent sessions, RPCs (rate, latency, failures by
kind, database failures among them) and the batchers' writes.

One :class:`ServerMetrics` per process (a field of `agentd.components.Components`). Sessions and
RPCs are counted where they happen (`agentd.connection`: a session's start and end, every call an
API task runs) in plain dicts: the per-RPC path stays one increment, without the lock and label
lookup of a prometheus_client instrument (every caller is on the one trio thread); ``families``
exposes them as prometheus_client metric families. The batchers' figures are read from their own
public counters when ``/metrics`` is rendered. Every label set is bounded: ``api`` and ``method``
come from the composed services (the RPC table), ``kind`` and ``batcher`` from the fixed lists below.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any

import attrs
import outcome
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from agentd.drpc.errors import RpcError
from agentd.metrics import Families, exposition
from agentd.store.errors import StoreError

__all__ = ["BATCHERS", "ERROR_KINDS", "RPC_DURATION_BUCKETS", "ServerMetrics", "error_kind"]

#: Upper bounds (seconds) of the RPC latency histogram.
RPC_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: ``kind`` of a failed RPC: the handler refused the request (an RpcError it raised), the database
#: failed (a StoreError), or anything else (a bug; logged by the DRPC server).
ERROR_KINDS = ("rejected", "database", "internal")

#: The Components fields whose ``flushes`` (and ``dropped``, where they keep one) are exported.
BATCHERS = ("metadata_batcher", "stats_batcher", "last_used")


def error_kind(error: BaseException) -> str:
    if isinstance(error, StoreError) or isinstance(error.__cause__, StoreError):
        return "database"
    if isinstance(error, RpcError):
        return "rejected"
    return "internal"


@attrs.define
class _Histogram:
    counts: list[int] = attrs.field(factory=lambda: [0] * len(RPC_DURATION_BUCKETS))
    total: float = 0.0
    count: int = 0


@attrs.define(eq=False)
class ServerMetrics:
    """Counters and histograms of this process; ``render(components)`` is their exposition."""

    #: agent sessions open now / started since the process started
    sessions_open: int = 0
    sessions_total: int = 0
    #: unary RPCs being handled now (a database that stalls shows here first)
    in_flight: int = 0
    _calls: dict[tuple[str, str], int] = attrs.field(factory=dict, init=False)
    _errors: dict[tuple[str, str, str], int] = attrs.field(factory=dict, init=False)
    _durations: dict[tuple[str, str], _Histogram] = attrs.field(factory=dict, init=False)

    def session_started(self) -> None:
        self.sessions_open += 1
        self.sessions_total += 1

    def session_ended(self) -> None:
        self.sessions_open -= 1

    def record_call(
        self, api: str, method: str, seconds: float | None, result: outcome.Outcome[Any] | None
    ) -> None:
        """One finished call of ``method`` on ``api``: its latency (None: a streaming call, whose
        duration is the stream's life, not a latency) and, if it failed, why."""
        key = (api, method)
        self._calls[key] = self._calls.get(key, 0) + 1
        if seconds is not None:
            histogram = self._durations.get(key)
            if histogram is None:
                histogram = self._durations[key] = _Histogram()
            index = bisect.bisect_left(RPC_DURATION_BUCKETS, seconds)
            if index < len(RPC_DURATION_BUCKETS):
                histogram.counts[index] += 1
            histogram.total += seconds
            histogram.count += 1
        if isinstance(result, outcome.Error):
            error_key = (api, method, error_kind(result.error))
            self._errors[error_key] = self._errors.get(error_key, 0) + 1

    def calls(self, api: str, method: str) -> int:
        return self._calls.get((api, method), 0)

    def errors(self, api: str, method: str, kind: str) -> int:
        return self._errors.get((api, method, kind), 0)

    def families(self, components: Any = None) -> Iterator[Metric]:
        """These figures and ``components``' batchers as prometheus_client metric families."""
        yield GaugeMetricFamily(
            "agentd_agent_sessions", "Agent sessions open on this process.", self.sessions_open
        )
        yield GaugeMetricFamily(
            "agentd_rpc_in_flight", "Unary agent RPCs being handled on this process now.", self.in_flight
        )
        yield CounterMetricFamily(
            "agentd_agent_sessions_total", "Agent sessions started on this process.", self.sessions_total
        )
        calls = CounterMetricFamily(
            "agentd_rpc_calls_total", "Agent RPCs served, by API and method.", labels=("api", "method")
        )
        for (api, method), n in sorted(self._calls.items()):
            calls.add_metric((api, method), n)
        yield calls
        errors = CounterMetricFamily(
            "agentd_rpc_errors_total",
            "Agent RPCs that failed, by kind: rejected (bad request), database, internal.",
            labels=("api", "method", "kind"),
        )
        for (api, method, kind), n in sorted(self._errors.items()):
            errors.add_metric((api, method, kind), n)
        yield errors
        durations = HistogramMetricFamily(
            "agentd_rpc_duration_seconds",
            "Unary RPCs: time from the hand-off to the API until the answer.",
            labels=("api", "method"),
        )
        for (api, method), h in sorted(self._durations.items()):
            buckets: list[tuple[str, float]] = []
            cumulative = 0
            for bound, count in zip(RPC_DURATION_BUCKETS, h.counts, strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
            buckets.append(("+Inf", h.count))
            durations.add_metric((api, method), buckets, h.total)
        yield durations

        batchers = [(name, getattr(components, name, None)) for name in BATCHERS]
        flushes = CounterMetricFamily(
            "agentd_batcher_flushes_total", "Batches the process-wide batchers wrote.", labels=("batcher",)
        )
        dropped = CounterMetricFamily(
            "agentd_batcher_dropped_total",
            "Updates the batchers dropped because their buffer was full.",
            labels=("batcher",),
        )
        for name, batcher in batchers:
            if batcher is not None and hasattr(batcher, "flushes"):
                flushes.add_metric((name,), batcher.flushes)
            if batcher is not None and hasattr(batcher, "dropped"):
                dropped.add_metric((name,), batcher.dropped)
        yield flushes
        yield dropped

    def render(self, components: Any = None) -> str:
        """Prometheus text exposition of :meth:`families`."""
        return exposition(Families(lambda: self.families(components)))
