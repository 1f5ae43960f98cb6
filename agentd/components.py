"""Daemon-wide components shared by every agent connection (DESIGN task tree: process-wide batchers,
tailnet coordinator, DERP map source, metrics, connection monitor, workspace cache refresher). The
daemon starts each one's ``run`` in its root nursery before accepting agents and flushes them on
shutdown; tests start them in their own nursery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from agentd.server_metrics import ServerMetrics

if TYPE_CHECKING:
    from agentd.batchers.activity import ActivityBumper
    from agentd.batchers.boundary_usage import BoundaryUsageTracker
    from agentd.batchers.connection_log import ConnectionLogBatcher
    from agentd.batchers.last_used import LastUsedTracker
    from agentd.batchers.metadata import MetadataBatcher
    from agentd.batchers.stats import StatsBatcher
    from agentd.metrics import AgentMetrics
    from agentd.monitor import ConnectionMonitor
    from agentd.services.lifecycle import BuildDurationHistogram
    from agentd.services.workspace_cache import WorkspaceCacheRefresher
    from agentd.tailnet.api import TailnetCoordinator
    from agentd.tailnet.derpmap import DERPMapSource


@attrs.define
class Components:
    """Each field is filled by the daemon (or a test) with a running component; None = not configured."""

    metadata_batcher: MetadataBatcher | None = None  # spec §9.1
    stats_batcher: StatsBatcher | None = None  # spec §9.2
    last_used: LastUsedTracker | None = None  # spec §9.2
    activity_bumper: ActivityBumper | None = None  # spec §9.3
    connection_logs: ConnectionLogBatcher | None = None  # spec §9.7
    boundary_usage: BoundaryUsageTracker | None = None  # spec §9.5
    coordinator: TailnetCoordinator | None = None  # memory or postgres (spec §8.4)
    derp_map: DERPMapSource | None = None  # spec §8.2
    metrics: AgentMetrics | None = None  # issue 6
    build_durations: BuildDurationHistogram | None = None  # spec §7.5
    connection_monitor: ConnectionMonitor | None = None  # spec §2.8; sessions need it
    workspace_cache: WorkspaceCacheRefresher | None = None  # spec §4.3
    #: sessions, RPC counts and latencies, batcher writes for /metrics (always present)
    server_metrics: ServerMetrics = attrs.field(factory=ServerMetrics)
