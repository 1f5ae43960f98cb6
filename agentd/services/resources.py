"""Resource monitoring (spec §7.11 GetResourcesMonitoringConfiguration, §7.12 PushResourcesMonitoringUsage).

The agent samples memory and volume usage every 10 s and pushes the last 20 datapoints. The decision
whether a monitor is in alert (NOK) and whether to notify the owner is a pure function of the monitor's
stored state, its threshold and the datapoints: :func:`datapoint_state`, :func:`next_state` and
:func:`debounce` below. The service only loads monitors (once, at connection start), applies those
functions, writes the monitor rows on every push and enqueues notifications.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import uuid
from collections.abc import Mapping, Sequence

import attrs
import trio

from agentd.clock import Now
from agentd.drpc.errors import RpcError
from agentd.drpc.registry import Handler
from agentd.proto import agent_pb2
from agentd.services.base import AGENT, ConnectionScope
from agentd.services.boundary import rfc3339_nano  # Go marshals time.Time in JSON as RFC3339Nano
from agentd.store import monitors as store
from agentd.store import notifications

log = logging.getLogger("agentd.resources")

#: Datapoints the agent keeps and the seconds between them (spec §7.11: always sent, never 0).
NUM_DATAPOINTS = 20
COLLECTION_INTERVAL_SECONDS = 10
#: Alert when the longest run of consecutive NOK datapoints reaches this percentage of all datapoints…
CONSECUTIVE_NOK_PERCENT = 50
#: …or when NOK datapoints in total reach this percentage.
MINIMUM_NOK_PERCENT = 20
#: After a notification, no other one for this long (spec §7.12).
DEBOUNCE = dt.timedelta(minutes=30)

MEMORY_TEMPLATE_ID = uuid.UUID("a9d027b4-ac49-4fb1-9f6d-45af15f64e7a")
VOLUME_TEMPLATE_ID = uuid.UUID("f047f6a3-5713-40f7-85aa-0394cce9fa3a")
MEMORY_CREATED_BY = "workspace-monitor-memory"
VOLUME_CREATED_BY = "workspace-monitor-volumes"


class DatapointState(enum.Enum):
    OK = "OK"
    NOK = "NOK"
    #: No sample for this monitor in the datapoint: it could have been either, so it never flips state.
    UNKNOWN = "UNKNOWN"


class MonitorState(enum.Enum):
    """The stored monitor state (enum workspace_agent_monitor_state)."""

    OK = "OK"
    NOK = "NOK"


# --------------------------------------------------------------------------------------------------
# Pure core
# --------------------------------------------------------------------------------------------------


def datapoint_state(used: int | None, total: int | None, threshold: int) -> DatapointState:
    """One sample against the monitor's threshold (percent, integer, truncated as Go's ``int(f)``).

    A missing sample is UNKNOWN. So is a sample with ``total <= 0``: Coder divides by it as a float and
    gets ±Inf/NaN, whose integer conversion is platform-dependent; agentd refuses to guess.
    """
    if used is None or total is None or total <= 0:
        return DatapointState.UNKNOWN
    pct = int(used / total * 100)
    return DatapointState.OK if pct < threshold else DatapointState.NOK


def _percent_at_least(count: int, n: int, percent: int) -> bool:
    """``round(100*count/n) >= percent`` with Go's math.Round (half away from zero), exactly.

    For non-negative values round(x) >= p  ⇔  x >= p - 1/2  ⇔  200*count >= (2p - 1)*n.
    """
    return 200 * count >= (2 * percent - 1) * n


def longest_run(states: Sequence[DatapointState], target: DatapointState) -> int:
    best = run = 0
    for s in states:
        run = run + 1 if s is target else 0
        best = max(best, run)
    return best


def next_state(previous: MonitorState, states: Sequence[DatapointState]) -> MonitorState:
    """The monitor's new state after a push (spec §7.12 "Next state").

    With no datapoints at all there is nothing to judge and the state is kept (Coder would divide by zero).
    """
    n = len(states)
    if n == 0:
        return previous
    if _percent_at_least(longest_run(states, DatapointState.NOK), n, CONSECUTIVE_NOK_PERCENT):
        return MonitorState.NOK
    noks = sum(1 for s in states if s is DatapointState.NOK)
    if _percent_at_least(noks, n, MINIMUM_NOK_PERCENT):
        return MonitorState.NOK
    if all(s is DatapointState.OK for s in states):
        return MonitorState.OK
    return previous


@attrs.frozen
class Decision:
    state: MonitorState
    notify: bool
    debounced_until: dt.datetime


def debounce(
    previous: MonitorState, new: MonitorState, now: dt.datetime, debounced_until: dt.datetime
) -> Decision:
    """Notify iff ``now > debounced_until`` and the monitor went OK → NOK; then debounce for 30 min."""
    if now > debounced_until and previous is MonitorState.OK and new is MonitorState.NOK:
        return Decision(new, True, now + DEBOUNCE)
    return Decision(new, False, debounced_until)


def evaluate(
    previous: MonitorState,
    debounced_until: dt.datetime,
    samples: Sequence[tuple[int, int] | None],
    threshold: int,
    now: dt.datetime,
) -> Decision:
    """Datapoints → per-datapoint states → next state → debounce, for one monitor."""
    states = [
        datapoint_state(None, None, threshold) if s is None else datapoint_state(s[0], s[1], threshold)
        for s in samples
    ]
    return debounce(previous, next_state(previous, states), now, debounced_until)


def memory_samples(
    datapoints: Sequence[agent_pb2.PushResourcesMonitoringUsageRequest.Datapoint],
) -> list[tuple[int, int] | None]:
    return [(d.memory.used, d.memory.total) if d.HasField("memory") else None for d in datapoints]


def volume_samples(
    datapoints: Sequence[agent_pb2.PushResourcesMonitoringUsageRequest.Datapoint], path: str
) -> list[tuple[int, int] | None]:
    """Per datapoint, the first volume whose name equals the monitor's path (missing → None)."""
    out: list[tuple[int, int] | None] = []
    for d in datapoints:
        sample = next(((v.used, v.total) for v in d.volumes if v.volume == path), None)
        out.append(sample)
    return out


# --------------------------------------------------------------------------------------------------
# Service
# --------------------------------------------------------------------------------------------------


@attrs.define(eq=False)
class ResourcesMonitoringService:
    """Per-connection resource monitoring: monitors cached at connection start, updated on every push."""

    scope: ConnectionScope
    now: Now
    memory: store.MemoryMonitor | None = None
    volumes: list[store.VolumeMonitor] = attrs.field(factory=list)
    loaded: bool = False
    _lock: trio.Lock = attrs.field(factory=trio.Lock)

    async def load(self) -> None:
        """Read the agent's monitor rows; the connection awaits this before serving (spec §4.1 step 4).

        A database error propagates and aborts the connection, as in Coder.
        """
        preload = self.scope.preload
        if preload is not None:
            # Read with the token lookup (agentd.store.sessions.authenticate_connection).
            self.memory = preload.memory_monitor
            self.volumes = list(preload.volume_monitors)
        else:
            agent_id = self.scope.ident.agent_id
            self.memory = await store.fetch_memory_monitor(self.scope.db, agent_id)
            self.volumes = await store.fetch_volume_monitors(self.scope.db, agent_id)
        self.loaded = True

    def handlers(self) -> Mapping[str, Handler]:
        return {
            AGENT + "GetResourcesMonitoringConfiguration": self.get_configuration,
            AGENT + "PushResourcesMonitoringUsage": self.push_usage,
        }

    async def get_configuration(
        self, request: agent_pb2.GetResourcesMonitoringConfigurationRequest
    ) -> agent_pb2.GetResourcesMonitoringConfigurationResponse:
        """Pure read of the cached monitors; ``config`` is always present (agents build a ticker from it)."""
        resp = agent_pb2.GetResourcesMonitoringConfigurationResponse()
        resp.config.num_datapoints = NUM_DATAPOINTS
        resp.config.collection_interval_seconds = COLLECTION_INTERVAL_SECONDS
        if self.memory is not None:
            resp.memory.enabled = self.memory.enabled
        for v in self.volumes:
            resp.volumes.add(enabled=v.enabled, path=v.path)
        return resp

    async def push_usage(
        self, request: agent_pb2.PushResourcesMonitoringUsageRequest
    ) -> agent_pb2.PushResourcesMonitoringUsageResponse:
        """Evaluate memory and every enabled volume monitor; a failure of one does not skip the others."""
        async with self._lock:
            errors: list[str] = []
            try:
                await self._memory(request.datapoints)
            except Exception as exc:
                log.exception("memory monitor failed agent_id=%s", self.scope.ident.agent_id)
                errors.append(f"monitor memory: {exc}")
            try:
                errors.extend(await self._volumes(request.datapoints))
            except Exception as exc:
                log.exception("volume monitors failed agent_id=%s", self.scope.ident.agent_id)
                errors.append(f"monitor volumes: {exc}")
            if errors:
                raise RpcError("\n".join(errors))
        return agent_pb2.PushResourcesMonitoringUsageResponse()

    async def _memory(
        self, datapoints: Sequence[agent_pb2.PushResourcesMonitoringUsageRequest.Datapoint]
    ) -> None:
        monitor = self.memory
        if monitor is None or not monitor.enabled:
            return
        now = self.now()
        previous = MonitorState(monitor.state)
        decision = evaluate(
            previous, monitor.debounced_until, memory_samples(datapoints), monitor.threshold, now
        )
        await store.update_memory_monitor(
            self.scope.db,
            monitor.agent_id,
            state=decision.state.value,
            updated_at=now,
            debounced_until=decision.debounced_until,
        )
        self.memory = attrs.evolve(
            monitor, state=decision.state.value, updated_at=now, debounced_until=decision.debounced_until
        )
        if not decision.notify:
            return
        ws = await self._workspace()
        await notifications.enqueue_notification(
            self.scope.db,
            notifications.Notification(
                template_id=MEMORY_TEMPLATE_ID,
                user_id=ws.owner_id,
                labels={"workspace": ws.name, "threshold": f"{monitor.threshold}%"},
                data={"timestamp": rfc3339_nano(now)},
                created_by=MEMORY_CREATED_BY,
                targets=(ws.id, ws.owner_id, ws.organization_id),
            ),
            now=now,
        )

    async def _volumes(
        self, datapoints: Sequence[agent_pb2.PushResourcesMonitoringUsageRequest.Datapoint]
    ) -> list[str]:
        errors: list[str] = []
        alerting: list[dict[str, str]] = []
        now = self.now()
        for i, monitor in enumerate(self.volumes):
            if not monitor.enabled:
                continue
            previous = MonitorState(monitor.state)
            decision = evaluate(
                previous,
                monitor.debounced_until,
                volume_samples(datapoints, monitor.path),
                monitor.threshold,
                now,
            )
            try:
                await store.update_volume_monitor(
                    self.scope.db,
                    monitor.agent_id,
                    monitor.path,
                    state=decision.state.value,
                    updated_at=now,
                    debounced_until=decision.debounced_until,
                )
            except Exception as exc:
                log.exception("update volume monitor %r failed", monitor.path)
                errors.append(f"update volume monitor {monitor.path!r}: {exc}")
                continue
            self.volumes[i] = attrs.evolve(
                monitor,
                state=decision.state.value,
                updated_at=now,
                debounced_until=decision.debounced_until,
            )
            if decision.notify:
                alerting.append({"path": monitor.path, "threshold": f"{monitor.threshold}%"})
        if alerting:
            ws = await self._workspace()
            await notifications.enqueue_notification(
                self.scope.db,
                notifications.Notification(
                    template_id=VOLUME_TEMPLATE_ID,
                    user_id=ws.owner_id,
                    labels={"workspace": ws.name},
                    data={"volumes": alerting, "timestamp": rfc3339_nano(now)},
                    created_by=VOLUME_CREATED_BY,
                    targets=(ws.id, ws.owner_id, ws.organization_id),
                ),
                now=now,
            )
        return errors

    async def _workspace(self) -> notifications.NotificationWorkspace:
        """Fresh workspace row: after a prebuild claim the owner is no longer the one at authentication."""
        wid = self.scope.ident.workspace_id
        ws = await notifications.notification_workspace(self.scope.db, wid)
        if ws is None:
            raise LookupError(f"get workspace by id {wid}: no rows")
        return ws


def build(scope: ConnectionScope) -> ResourcesMonitoringService:
    """No database access here: the connection calls ``await service.load()`` before serving."""
    return ResourcesMonitoringService(scope=scope, now=scope.now)
