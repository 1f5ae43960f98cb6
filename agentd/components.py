"""Daemon-wide components shared by every agent connection (DESIGN task tree: process-wide batchers,
tailnet coordinator, DERP map source, metrics, connection monitor, workspace cache refresher). The
daemon starts each one's ``run`` in its root nursery before accepting agents and flushes them on
shutdown; tests start them in their own nursery.
"""

from __future__ import annotations

from typing import Any

import attrs

from agentd.server_metrics import ServerMetrics


@attrs.define
class Components:
    """Each field is filled by the daemon (or a test) with a running component; None = not configured."""

    metadata_batcher: Any = None  # agentd.batchers.metadata.MetadataBatcher (spec §9.1)
    stats_batcher: Any = None  # agentd.batchers.stats.StatsBatcher (spec §9.2)
    last_used: Any = None  # agentd.batchers.last_used.LastUsedTracker (spec §9.2)
    activity_bumper: Any = None  # agentd.batchers.activity.ActivityBumper (spec §9.3)
    connection_logs: Any = None  # agentd.batchers.connection_log.ConnectionLogBatcher (spec §9.7)
    boundary_usage: Any = None  # agentd.batchers.boundary_usage.BoundaryUsageTracker (spec §9.5)
    coordinator: Any = None  # agentd.tailnet.api.TailnetCoordinator: memory or postgres (spec §8.4)
    derp_map: Any = None  # agentd.tailnet.derpmap.DerpMapSource (spec §8.2)
    metrics: Any = None  # agentd.metrics.AgentMetrics (issue 6)
    build_durations: Any = None  # agentd.services.lifecycle.BuildDurationHistogram (spec §7.5)
    connection_monitor: Any = None  # agentd.monitor.ConnectionMonitor (spec §2.8); sessions need it
    workspace_cache: Any = None  # agentd.services.workspace_cache.WorkspaceCacheRefresher (spec §4.3)
    #: sessions, RPC counts and latencies, batcher writes for /metrics (always present)
    server_metrics: ServerMetrics = attrs.field(factory=ServerMetrics)
