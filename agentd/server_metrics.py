"""agentd's own operating figures for ``/metrics``: agent sessions, RPCs (rate, latency, failures by
kind, database failures among them) and the batchers' writes.

One :class:`ServerMetrics` per process (a field of `agentd.components.Components`). Sessions and
RPCs are counted where they happen (`agentd.connection`: a session's start and end, every call an
API task runs); the batchers' figures are read from their own public counters when ``/metrics`` is
rendered. Every label set is bounded: ``api`` and ``method`` come from the composed services (the
RPC table), ``kind`` and ``batcher`` from the fixed lists below.
"""

from __future__ import annotations

import bisect
from typing import Any

import attrs
import outcome

from agentd.drpc.errors import RpcError
from agentd.metrics import format_value
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


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@attrs.define(eq=False)
class ServerMetrics:
    """Counters and histograms of this process; ``render(components)`` is their exposition."""

    #: agent sessions open now / started since the process started
    sessions_open: int = 0
    sessions_total: int = 0
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

    def render(self, components: Any = None) -> str:
        """Prometheus text exposition (0.0.4) of these figures and of ``components``' batchers."""
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        family("agentd_agent_sessions", "gauge", "Agent sessions open on this process.")
        out.append(f"agentd_agent_sessions {self.sessions_open}")
        family("agentd_agent_sessions_total", "counter", "Agent sessions started on this process.")
        out.append(f"agentd_agent_sessions_total {self.sessions_total}")

        family("agentd_rpc_calls_total", "counter", "Agent RPCs served, by API and method.")
        for (api, method), n in sorted(self._calls.items()):
            out.append(f'agentd_rpc_calls_total{{api="{_label(api)}",method="{_label(method)}"}} {n}')
        family(
            "agentd_rpc_errors_total",
            "counter",
            "Agent RPCs that failed, by kind: rejected (bad request), database, internal.",
        )
        for (api, method, kind), n in sorted(self._errors.items()):
            labels = f'api="{_label(api)}",method="{_label(method)}",kind="{kind}"'
            out.append(f"agentd_rpc_errors_total{{{labels}}} {n}")
        family(
            "agentd_rpc_duration_seconds",
            "histogram",
            "Unary RPCs: time from the hand-off to the API until the answer.",
        )
        for (api, method), h in sorted(self._durations.items()):
            labels = f'api="{_label(api)}",method="{_label(method)}"'
            cumulative = 0
            for bound, count in zip(RPC_DURATION_BUCKETS, h.counts, strict=True):
                cumulative += count
                out.append(
                    f'agentd_rpc_duration_seconds_bucket{{{labels},le="{format_value(bound)}"}} {cumulative}'
                )
            out.append(f'agentd_rpc_duration_seconds_bucket{{{labels},le="+Inf"}} {h.count}')
            out.append(f"agentd_rpc_duration_seconds_sum{{{labels}}} {format_value(h.total)}")
            out.append(f"agentd_rpc_duration_seconds_count{{{labels}}} {h.count}")

        family("agentd_batcher_flushes_total", "counter", "Batches the process-wide batchers wrote.")
        batchers = [(name, getattr(components, name, None)) for name in BATCHERS]
        for name, batcher in batchers:
            if batcher is not None and hasattr(batcher, "flushes"):
                out.append(f'agentd_batcher_flushes_total{{batcher="{name}"}} {batcher.flushes}')
        family(
            "agentd_batcher_dropped_total",
            "counter",
            "Updates the batchers dropped because their buffer was full.",
        )
        for name, batcher in batchers:
            if batcher is not None and hasattr(batcher, "dropped"):
                out.append(f'agentd_batcher_dropped_total{{batcher="{name}"}} {batcher.dropped}')
        return "\n".join(out) + "\n"
