"""Script output waiting to be sent with BatchCreateLogs, per log source (Coder's agentsdk LogSender).

The queue outlives connections: each connection's sender takes batches of at most
:data:`MAX_BATCH_BYTES` of output per source and removes them only once the server accepted them,
so a dropped connection loses nothing. ``log_limit_exceeded`` stops log sending for good and drops
what is queued (the server will not store more).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import deque
from typing import TypeAlias

import attrs
import trio

from agentd.proto import agent_pb2

__all__ = ["FLUSH_INTERVAL", "MAX_BATCH_BYTES", "LogQueue", "QueuedLog"]

#: Output bytes per BatchCreateLogs call (spec §11: ≤ 1 MiB of output per batch).
MAX_BATCH_BYTES = 1 << 20
#: How long a log line may wait for company before it is sent.
FLUSH_INTERVAL = 1.0
#: Bound on queued output; beyond it the oldest lines are dropped (and counted).
MAX_QUEUED_BYTES = 16 << 20

Level: TypeAlias = agent_pb2.Log.Level


@attrs.frozen
class QueuedLog:
    created_at: dt.datetime
    output: str
    level: Level = agent_pb2.Log.INFO

    @property
    def size(self) -> int:
        return len(self.output.encode("utf-8", "surrogateescape"))


@attrs.define(eq=False)
class LogQueue:
    """Per-source FIFO of log lines; ``take_batch`` / ``commit`` for the sender."""

    _sources: dict[uuid.UUID, deque[QueuedLog]] = attrs.field(factory=dict, init=False)
    queued_bytes: int = attrs.field(default=0, init=False)
    sent: int = attrs.field(default=0, init=False)
    dropped: int = attrs.field(default=0, init=False)
    limit_exceeded: bool = attrs.field(default=False, init=False)
    _arrived: trio.Event = attrs.field(factory=trio.Event, init=False)
    _drained: trio.Event = attrs.field(factory=trio.Event, init=False)

    def __attrs_post_init__(self) -> None:
        self._drained.set()

    def add(self, source: uuid.UUID, log: QueuedLog) -> None:
        if self.limit_exceeded:
            self.dropped += 1
            return
        self._sources.setdefault(source, deque()).append(log)
        self.queued_bytes += log.size
        while self.queued_bytes > MAX_QUEUED_BYTES:
            self._drop_oldest()
        if self._drained.is_set():
            self._drained = trio.Event()
        self._arrived.set()

    def _drop_oldest(self) -> None:
        oldest = min((q for q in self._sources.values() if q), key=lambda q: q[0].created_at, default=None)
        if oldest is None:
            return
        self.queued_bytes -= oldest.popleft().size
        self.dropped += 1

    @property
    def empty(self) -> bool:
        return not any(self._sources.values())

    def take_batch(self) -> tuple[uuid.UUID, list[QueuedLog]] | None:
        """The oldest source with queued lines and its next ≤ 1 MiB of them (at least one line)."""
        for source, queue in self._sources.items():
            if not queue:
                continue
            batch: list[QueuedLog] = []
            size = 0
            for log in queue:
                if batch and size + log.size > MAX_BATCH_BYTES:
                    break
                batch.append(log)
                size += log.size
            return source, batch
        return None

    def commit(self, source: uuid.UUID, count: int) -> None:
        """The server stored the first ``count`` lines of ``source``."""
        queue = self._sources[source]
        for _ in range(count):
            self.queued_bytes -= queue.popleft().size
        self.sent += count
        if not queue:
            del self._sources[source]
        self._settle()

    def exceed_limit(self) -> None:
        """The server said log_limit_exceeded: stop sending, forget what is queued."""
        self.limit_exceeded = True
        self.dropped += sum(len(q) for q in self._sources.values())
        self._sources.clear()
        self.queued_bytes = 0
        self._settle()

    def _settle(self) -> None:
        if self.empty:
            self._drained.set()

    async def wait_arrived(self) -> None:
        """Until something is queued."""
        while self.empty:
            self._arrived = trio.Event()
            await self._arrived.wait()

    async def wait_drained(self) -> None:
        """Until nothing is queued (sent, or dropped after the log limit)."""
        await self._drained.wait()

    @staticmethod
    def request(source: uuid.UUID, batch: list[QueuedLog]) -> agent_pb2.BatchCreateLogsRequest:
        request = agent_pb2.BatchCreateLogsRequest(log_source_id=source.bytes)
        for log in batch:
            entry = request.logs.add(output=log.output, level=log.level)
            entry.created_at.FromDatetime(log.created_at)
        return request
