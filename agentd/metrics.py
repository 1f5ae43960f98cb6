"""Per-agent metrics reported through UpdateStats (spec §7.4), kept in memory for ``/metrics``.

Each agent's ``Stats.metrics`` (counters and gauges with their own labels) are stored as series labelled
with the agent's identity — ``username``, ``workspace_name``, ``agent_name``, ``template_name``, the
label names coderd's agent-metrics collector uses — plus the metric's labels. The label sets are
bounded: at most ``max_series`` series in all and ``max_series_per_agent`` per agent (new series
beyond either are rejected and counted; stale ones are swept first), at most
``max_metrics_per_report`` metrics per report and ``max_labels`` labels per metric; series an agent
stopped reporting expire after ``expiry`` seconds. Invalid names, unknown types, a name reported with
two types, and labels clashing with the identity labels are skipped and counted.

``AgentMetrics`` is a prometheus_client collector over those bounded series (``collect()``, and
``render()``: the text exposition, version 0.0.4, written by prometheus_client's ``generate_latest``)
plus the batchers' own counters. Agent-reported names are exposed under their own prefix,
``agentd_agentstats_`` (as coderd exposes them under ``coderd_agentstats_``), which none of agentd's
own metric names uses, so an agent can never produce a second HELP/TYPE block for one of agentd's
names. A reported counter is exposed the way Prometheus names counters: its sample name ends in
``_total`` (added if the agent's name lacks it).
"""

from __future__ import annotations

import collections
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import attrs
import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "AGENT_METRIC_PREFIX",
    "CONTENT_TYPE",
    "AgentLabels",
    "AgentMetrics",
    "Families",
    "ReportedMetric",
    "exposition",
    "private_registry",
]

#: The Prometheus text exposition format's media type (what ``generate_latest`` writes).
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST

# Instruments (the build-duration Histogram) would add a `<name>_created` gauge per series: a
# timestamp that agentd.workers' merge would add up across workers. agentd exposes none.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

COUNTER = "counter"
GAUGE = "gauge"
_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
IDENTITY_LABELS = ("username", "workspace_name", "agent_name", "template_name")
#: Prepended to every agent-reported metric name in the exposition; agentd's own names never start so.
AGENT_METRIC_PREFIX = "agentd_agentstats_"

MAX_SERIES = 10_000
MAX_SERIES_PER_AGENT = 500
MAX_METRICS_PER_REPORT = 256
MAX_LABELS = 16
MAX_LABEL_VALUE_LEN = 1024
EXPIRY_S = 10 * 60.0


@attrs.frozen
class AgentLabels:
    """Who reported: the identity labels every series of that agent carries."""

    username: str
    workspace_name: str
    agent_name: str
    template_name: str

    def pairs(self) -> tuple[tuple[str, str], ...]:
        return (
            ("username", self.username),
            ("workspace_name", self.workspace_name),
            ("agent_name", self.agent_name),
            ("template_name", self.template_name),
        )


@attrs.frozen
class ReportedMetric:
    """One metric of a report: ``kind`` is ``"counter"``, ``"gauge"`` or anything else (skipped)."""

    name: str
    kind: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()


SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


@attrs.define
class _Sample:
    value: float
    updated: float


@attrs.frozen
class Families:
    """A prometheus_client collector over a function that yields metric families."""

    families: Callable[[], Iterable[Metric]]

    def collect(self) -> Iterable[Metric]:
        return self.families()


def private_registry(*collectors: Collector) -> CollectorRegistry:
    """A registry of its own (never prometheus_client's global one) holding ``collectors``."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    return registry


def exposition(*collectors: Collector) -> str:
    """The Prometheus text exposition of ``collectors``."""
    return generate_latest(private_registry(*collectors)).decode("utf-8")


def _exposed_names(name: str, kind: str) -> tuple[str, str]:
    """(family, sample) names a reported metric takes in the exposition, before the prefix."""
    if kind == COUNTER:
        family = name.removesuffix("_total")
        return family, family + "_total"
    return name, name


@attrs.define(eq=False)
class AgentMetrics:
    max_series: int = MAX_SERIES
    max_series_per_agent: int = MAX_SERIES_PER_AGENT
    max_metrics_per_report: int = MAX_METRICS_PER_REPORT
    max_labels: int = MAX_LABELS
    expiry: float = EXPIRY_S
    clock: Callable[[], float] = time.monotonic
    #: Sources of extra counters for the exposition (name → (help, value getter)), e.g. batcher drops.
    extra_counters: dict[str, tuple[str, Callable[[], float]]] = attrs.field(factory=dict)
    rejected_series: int = attrs.field(default=0, init=False)
    invalid_metrics: int = attrs.field(default=0, init=False)
    _series: dict[SeriesKey, _Sample] = attrs.field(factory=dict, init=False)
    _types: dict[str, str] = attrs.field(factory=dict, init=False)
    #: exposed family and sample names (see _exposed_names) → the reported name that has them
    _owners: dict[str, str] = attrs.field(factory=dict, init=False)
    _per_agent: collections.Counter[tuple[tuple[str, str], ...]] = attrs.field(
        factory=collections.Counter, init=False
    )
    _last_sweep: float = attrs.field(default=-math.inf, init=False)

    def __attrs_post_init__(self) -> None:
        for name in self.extra_counters:
            if name.startswith(AGENT_METRIC_PREFIX):
                raise ValueError(f"{name}: the {AGENT_METRIC_PREFIX} prefix is for agent-reported metrics")

    def update(self, agent: AgentLabels, metrics: Sequence[ReportedMetric]) -> None:
        """Record one report of ``agent``: every valid metric becomes (or updates) a series."""
        now = self.clock()
        if len(metrics) > self.max_metrics_per_report:
            self.invalid_metrics += len(metrics) - self.max_metrics_per_report
            metrics = metrics[: self.max_metrics_per_report]
        identity = agent.pairs()
        for metric in metrics:
            key = self._key(metric, identity)
            if key is None:
                self.invalid_metrics += 1
                continue
            sample = self._series.get(key)
            if sample is not None:
                sample.value, sample.updated = metric.value, now
                continue
            full = (
                len(self._series) >= self.max_series or self._per_agent[identity] >= self.max_series_per_agent
            )
            if full and now - self._last_sweep >= 1.0:  # a sweep is O(series): at most once a second
                self._expire(now)
                full = (
                    len(self._series) >= self.max_series
                    or self._per_agent[identity] >= self.max_series_per_agent
                )
            if full:
                self.rejected_series += 1
                continue
            if metric.name not in self._types:
                self._types[metric.name] = metric.kind
                for exposed in _exposed_names(metric.name, metric.kind):
                    self._owners[exposed] = metric.name
            self._series[key] = _Sample(metric.value, now)
            self._per_agent[identity] += 1

    def _key(self, metric: ReportedMetric, identity: tuple[tuple[str, str], ...]) -> SeriesKey | None:
        if metric.kind not in (COUNTER, GAUGE) or not _NAME_RE.match(metric.name):
            return None
        if self._types.get(metric.name, metric.kind) != metric.kind:
            return None
        # e.g. a counter "x" (exposed as x_total) and a gauge "x_total": one exposed name, two metrics
        if any(
            self._owners.get(n, metric.name) != metric.name for n in _exposed_names(metric.name, metric.kind)
        ):
            return None
        if len(metric.labels) > self.max_labels:
            return None
        seen = set(IDENTITY_LABELS)
        for name, value in metric.labels:
            if name in seen or not _LABEL_RE.match(name) or name.startswith("__"):
                return None
            if len(value) > MAX_LABEL_VALUE_LEN:
                return None
            seen.add(name)
        return metric.name, identity + tuple(sorted(metric.labels))

    def _drop(self, key: SeriesKey) -> None:
        del self._series[key]
        identity = key[1][: len(IDENTITY_LABELS)]
        self._per_agent[identity] -= 1
        if self._per_agent[identity] <= 0:
            del self._per_agent[identity]

    def _expire(self, now: float) -> None:
        self._last_sweep = now
        stale = [k for k, s in self._series.items() if now - s.updated > self.expiry]
        for k in stale:
            self._drop(k)
        live = {name for name, _ in self._series}
        for name in [n for n in self._types if n not in live]:
            for exposed in _exposed_names(name, self._types.pop(name)):
                self._owners.pop(exposed, None)

    def forget(self, agent: AgentLabels) -> None:
        """Drop every series of ``agent`` (e.g. its workspace was deleted)."""
        identity = agent.pairs()
        for k in [k for k in self._series if k[1][: len(identity)] == identity]:
            self._drop(k)

    @property
    def series_count(self) -> int:
        return len(self._series)

    def samples(self) -> dict[SeriesKey, float]:
        """Live series → value (tests)."""
        self._expire(self.clock())
        return {k: s.value for k, s in self._series.items()}

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's Collector protocol: every live series and the bookkeeping counters."""
        return self.families()

    def families(self, *, timestamps: bool = False) -> Iterator[Metric]:
        """The metric families of every live series and of the bookkeeping counters.

        ``timestamps``: each agent-reported sample carries the wall-clock time it was reported, so
        that agentd.workers can keep the newest when an agent moved between workers."""
        now = self.clock()
        self._expire(now)
        wall = time.time()
        by_name: dict[str, Metric] = {}
        for (name, labels), sample in sorted(self._series.items()):
            family_name, sample_name = _exposed_names(name, self._types[name])
            family = by_name.get(name)
            if family is None:
                family = Metric(
                    AGENT_METRIC_PREFIX + family_name, "Reported by workspace agents.", self._types[name]
                )
                by_name[name] = family
            family.add_sample(
                AGENT_METRIC_PREFIX + sample_name,
                dict(labels),
                sample.value,
                wall - (now - sample.updated) if timestamps else None,
            )
        yield from by_name.values()
        counters: list[tuple[str, str, float]] = [
            (
                "agentd_agent_metrics_rejected_series_total",
                "Agent metric series refused because the series limit was reached.",
                self.rejected_series,
            ),
            (
                "agentd_agent_metrics_invalid_total",
                "Agent metrics skipped: invalid name, type or labels, or over the per-report limit.",
                self.invalid_metrics,
            ),
        ]
        counters.extend((n, h, get()) for n, (h, get) in sorted(self.extra_counters.items()))
        for name, help_text, value in counters:
            yield CounterMetricFamily(name, help_text, value=value)

    def render(self, *, timestamps: bool = False) -> str:
        """The Prometheus text exposition of :meth:`families`."""
        return exposition(Families(lambda: self.families(timestamps=timestamps)))
