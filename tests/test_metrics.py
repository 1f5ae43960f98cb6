"""Per-agent metrics kept in memory (issue 6): series per agent identity, bounded, Prometheus text."""

from __future__ import annotations

import math

import attrs
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from agentd.metrics import AgentLabels, AgentMetrics, ReportedMetric

ALICE = AgentLabels("alice", "dev", "main", "docker")
BOB = AgentLabels("bob", "ws", "main", "docker")


@attrs.define
class Clock:
    t: float = 0.0

    def __call__(self) -> float:
        return self.t


def test_series_carry_identity_and_metric_labels() -> None:
    m = AgentMetrics()
    m.update(ALICE, [ReportedMetric("agent_scripts_executed_total", "counter", 3, (("success", "true"),))])
    m.update(ALICE, [ReportedMetric("agent_scripts_executed_total", "counter", 5, (("success", "true"),))])
    key = (
        "agent_scripts_executed_total",
        (
            ("username", "alice"),
            ("workspace_name", "dev"),
            ("agent_name", "main"),
            ("template_name", "docker"),
            ("success", "true"),
        ),
    )
    assert m.samples() == {key: 5}


def families(text: str) -> dict[str, tuple[str, str, list[Sample]]]:
    """Each family's name in its TYPE line -> (type, help, samples), as prometheus_client's parser
    reads the exposition (it names a counter family without the _total its samples carry)."""
    return {
        f.name + "_total" if f.type == "counter" else f.name: (f.type, f.documentation, f.samples)
        for f in text_string_to_metric_families(text)
    }


def identity(agent: AgentLabels) -> dict[str, str]:
    return dict(agent.pairs())


def test_render_exposition_format() -> None:
    m = AgentMetrics()
    m.update(ALICE, [ReportedMetric("agent_load", "gauge", 0.25), ReportedMetric("agent_up", "counter", 1)])
    m.update(BOB, [ReportedMetric("agent_load", "gauge", 2)])
    text = m.render()
    assert text.endswith("\n")
    parsed = families(text)
    assert parsed["agentd_agentstats_agent_load"] == (
        "gauge",
        "Reported by workspace agents.",
        [
            Sample("agentd_agentstats_agent_load", identity(ALICE), 0.25),
            Sample("agentd_agentstats_agent_load", identity(BOB), 2.0),
        ],
    )
    # a counter's samples end in _total, the name Prometheus gives counters
    kind, _, samples = parsed["agentd_agentstats_agent_up_total"]
    assert kind == "counter" and samples == [Sample("agentd_agentstats_agent_up_total", identity(ALICE), 1.0)]
    for name in ("agentd_agent_metrics_rejected_series_total", "agentd_agent_metrics_invalid_total"):
        assert parsed[name][0] == "counter" and parsed[name][2] == [Sample(name, {}, 0.0)]


def test_label_values_are_escaped() -> None:
    m = AgentMetrics()
    m.update(AgentLabels('we"ird\\\n', "w", "a", "t"), [ReportedMetric("x", "gauge", 1)])
    assert 'username="we\\"ird\\\\\\n"' in m.render()
    [sample] = families(m.render())["agentd_agentstats_x"][2]
    assert sample.labels["username"] == 'we"ird\\\n'


def test_special_values() -> None:
    m = AgentMetrics()
    values = {"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "three": 3.0, "half": 1.5}
    m.update(ALICE, [ReportedMetric(name, "gauge", value) for name, value in values.items()])
    lines = {line.split("{")[0]: line.rsplit(" ", 1)[1] for line in m.render().splitlines() if "{" in line}
    assert lines == {
        "agentd_agentstats_nan": "NaN",
        "agentd_agentstats_inf": "+Inf",
        "agentd_agentstats_ninf": "-Inf",
        "agentd_agentstats_three": "3.0",
        "agentd_agentstats_half": "1.5",
    }


def test_a_counter_and_a_gauge_cannot_share_an_exposed_name() -> None:
    m = AgentMetrics()
    m.update(ALICE, [ReportedMetric("x", "counter", 1)])  # exposed as agentd_agentstats_x_total
    m.update(BOB, [ReportedMetric("x_total", "gauge", 2), ReportedMetric("x_total", "counter", 3)])
    assert m.invalid_metrics == 2 and m.series_count == 1
    names = [line.split()[2] for line in m.render().splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names))


def test_series_cap_rejects_new_series_and_counts() -> None:
    m = AgentMetrics(max_series=2)
    m.update(ALICE, [ReportedMetric(f"m{i}", "gauge", i) for i in range(3)])
    assert m.series_count == 2 and m.rejected_series == 1
    m.update(ALICE, [ReportedMetric("m0", "gauge", 9)])  # an existing series still updates
    assert m.rejected_series == 1
    assert families(m.render())["agentd_agent_metrics_rejected_series_total"][2][0].value == 1


def test_stale_series_expire_and_free_room() -> None:
    clock = Clock()
    m = AgentMetrics(max_series=1, expiry=60, clock=clock)
    m.update(ALICE, [ReportedMetric("a", "gauge", 1)])
    clock.t = 61
    m.update(BOB, [ReportedMetric("a", "gauge", 2)])
    assert m.rejected_series == 0
    assert list(m.samples().values()) == [2]
    clock.t = 200
    assert m.samples() == {}
    assert "# TYPE agentd_agentstats_a gauge" not in m.render().splitlines()


def test_invalid_metrics_are_skipped_and_counted() -> None:
    m = AgentMetrics(max_labels=2)
    m.update(
        ALICE,
        [
            ReportedMetric("bad name", "gauge", 1),
            ReportedMetric("ok", "unspecified", 1),
            ReportedMetric("clash", "gauge", 1, (("username", "mallory"),)),
            ReportedMetric("bad_label", "gauge", 1, (("0x", "v"),)),
            ReportedMetric("reserved", "gauge", 1, (("__name__", "v"),)),
            ReportedMetric("many", "gauge", 1, (("a", "1"), ("b", "2"), ("c", "3"))),
            ReportedMetric("fine", "gauge", 1),
        ],
    )
    assert m.invalid_metrics == 6 and m.series_count == 1


def test_one_name_keeps_its_first_type() -> None:
    m = AgentMetrics()
    m.update(ALICE, [ReportedMetric("x", "counter", 1)])
    m.update(BOB, [ReportedMetric("x", "gauge", 1)])
    assert m.series_count == 1 and m.invalid_metrics == 1


def test_per_report_limit() -> None:
    m = AgentMetrics(max_metrics_per_report=3)
    m.update(ALICE, [ReportedMetric(f"m{i}", "gauge", i) for i in range(5)])
    assert m.series_count == 3 and m.invalid_metrics == 2


def test_forget_drops_an_agents_series() -> None:
    m = AgentMetrics()
    m.update(ALICE, [ReportedMetric("a", "gauge", 1)])
    m.update(BOB, [ReportedMetric("a", "gauge", 1)])
    m.forget(ALICE)
    assert [k[1][0] for k in m.samples()] == [("username", "bob")]


def test_extra_counters_are_rendered() -> None:
    m = AgentMetrics(
        extra_counters={"agentd_metadata_dropped_total": ("Dropped metadata updates.", lambda: 7)}
    )
    assert families(m.render())["agentd_metadata_dropped_total"][2] == [
        Sample("agentd_metadata_dropped_total", {}, 7.0)
    ]


def test_agent_reported_names_cannot_duplicate_agentds_own() -> None:
    m = AgentMetrics(extra_counters={"agentd_agent_stats_dropped_total": ("Stats rows refused.", lambda: 3)})
    own = ["agentd_agent_stats_dropped_total", "agentd_agent_metrics_invalid_total"]
    m.update(ALICE, [ReportedMetric(name, "counter", 99) for name in own])
    lines = m.render().splitlines()
    for kind in ("HELP", "TYPE"):
        blocks = [line.split()[2] for line in lines if line.startswith(f"# {kind} ")]
        assert len(blocks) == len(set(blocks)), blocks
    assert "agentd_agent_stats_dropped_total 3.0" in lines
    assert any(line.startswith("agentd_agentstats_agentd_agent_stats_dropped_total{") for line in lines)
    with pytest.raises(ValueError, match="prefix"):
        AgentMetrics(extra_counters={"agentd_agentstats_x": ("no", lambda: 0)})


def test_one_agent_cannot_take_every_series() -> None:
    m = AgentMetrics(max_series=10, max_series_per_agent=3)
    m.update(ALICE, [ReportedMetric("m", "gauge", i, (("i", str(i)),)) for i in range(5)])
    m.update(BOB, [ReportedMetric("m", "gauge", 1)])
    assert m.series_count == 4 and m.rejected_series == 2
    m.forget(ALICE)
    m.update(ALICE, [ReportedMetric("m", "gauge", i, (("i", str(i)),)) for i in range(3)])
    assert m.series_count == 4 and m.rejected_series == 2


def test_sweeps_are_rate_limited_when_full() -> None:
    clock = Clock()
    m = AgentMetrics(max_series=1, expiry=10, clock=clock)
    m.update(ALICE, [ReportedMetric("a", "gauge", 1)])
    clock.t = 0.5
    m.update(BOB, [ReportedMetric("a", "gauge", 1)])  # full: sweeps once (nothing stale yet)
    clock.t = 11
    m.update(BOB, [ReportedMetric("a", "gauge", 1)])  # full, sweep allowed again: alice expired
    assert m.rejected_series == 1 and [k[1][0][1] for k in m.samples()] == ["bob"]
