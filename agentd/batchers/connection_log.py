"""Connection-log batcher (spec §9.7): connect/disconnect events of every agent, upserted in batches.

Events arrive through ``submit`` (a bounded channel: a full one makes the reporting RPC wait). A batch is
written when it holds ``batch_size`` distinct connections or every ``interval`` seconds. Within a batch,
events of one connection merge into one row exactly as the SQL upsert merges rows (earliest connect time,
first disconnect kept), so the result does not depend on where batch boundaries fall; a disconnect without
its connect uses its own time for both. Events without a connection id are kept as separate rows. A failed
write is retried up to ``max_retries`` times ``retry_delay`` apart from a queue of ``retry_slots`` batches
(the oldest is dropped, with an error logged, when it overflows). Cancelling ``run`` writes what is held
(bounded by ``shutdown_timeout`` and the daemon's cleanup deadline, agentd.shutdown).
"""

from __future__ import annotations

import collections
import logging
import math
import uuid
from time import perf_counter
from typing import TypeVar

import attrs
import trio

from agentd.logfmt import elapsed_ms
from agentd.shutdown import CleanupDeadline
from agentd.store import Database
from agentd.store.connection_logs import ConnectionLogRow, upsert_connection_logs

log = logging.getLogger("agentd.connection_log")

BATCH_SIZE = 1000
FLUSH_INTERVAL_S = 5.0
MAX_RETRIES = 3
RETRY_DELAY_S = 1.0
RETRY_SLOTS = 10
SHUTDOWN_FLUSH_TIMEOUT_S = 15.0

T = TypeVar("T")


def merge(existing: ConnectionLogRow, new: ConnectionLogRow) -> ConnectionLogRow:
    """Two events of one connection as one row: the SQL upsert's rule, applied in memory."""
    return attrs.evolve(
        existing,
        connect_time=min(existing.connect_time, new.connect_time),
        disconnect_time=_first(existing.disconnect_time, new.disconnect_time),
        disconnect_reason=_first(existing.disconnect_reason, new.disconnect_reason),
        code=_first(existing.code, new.code),
    )


def _first(held: T | None, new: T | None) -> T | None:
    return held if held is not None else new


@attrs.define
class Batch:
    """Rows waiting for the next write: merged by (connection_id, workspace_id, agent_name)."""

    keyed: dict[tuple[uuid.UUID, uuid.UUID, str], ConnectionLogRow] = attrs.field(factory=dict)
    loose: list[ConnectionLogRow] = attrs.field(factory=list)

    def add(self, row: ConnectionLogRow) -> None:
        if row.connection_id is None:
            self.loose.append(row)
            return
        key = (row.connection_id, row.workspace_id, row.agent_name)
        held = self.keyed.get(key)
        self.keyed[key] = row if held is None else merge(held, row)

    def __len__(self) -> int:
        return len(self.keyed) + len(self.loose)

    def take(self) -> list[ConnectionLogRow]:
        rows = [*self.keyed.values(), *self.loose]
        self.keyed, self.loose = {}, []
        return rows


@attrs.define
class _Retry:
    rows: list[ConnectionLogRow]
    attempts: int = 0


@attrs.define(eq=False)
class ConnectionLogBatcher:
    db: Database
    batch_size: int = BATCH_SIZE
    interval: float = FLUSH_INTERVAL_S
    max_retries: int = MAX_RETRIES
    retry_delay: float = RETRY_DELAY_S
    retry_slots: int = RETRY_SLOTS
    shutdown_timeout: float = SHUTDOWN_FLUSH_TIMEOUT_S
    cleanup: CleanupDeadline = attrs.field(factory=CleanupDeadline)
    batch: Batch = attrs.field(factory=Batch)
    retries: collections.deque[_Retry] = attrs.field(factory=collections.deque)
    _running: bool = attrs.field(default=False, init=False)
    _done: trio.Event = attrs.field(factory=trio.Event, init=False)
    _send: trio.MemorySendChannel[ConnectionLogRow] = attrs.field(init=False)
    _recv: trio.MemoryReceiveChannel[ConnectionLogRow] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[ConnectionLogRow](self.batch_size)

    async def submit(self, row: ConnectionLogRow) -> None:
        """Queue one event; raises trio.ClosedResourceError once the batcher has shut down."""
        await self._send.send(row)

    def _requeue(self, rows: list[ConnectionLogRow]) -> None:
        for r in rows:
            self.batch.add(r)

    async def _write(self, rows: list[ConnectionLogRow]) -> None:
        started = perf_counter()
        try:
            await upsert_connection_logs(self.db, rows)
            log.debug("flush batcher=connection_log rows=%d duration_ms=%.1f", len(rows), elapsed_ms(started))
        except trio.Cancelled:
            self._requeue(rows)  # shutdown mid-write: the final flush writes them (the upsert is idempotent)
            raise
        except Exception:
            log.exception("write %d connection logs; will retry", len(rows))
            if len(self.retries) >= self.retry_slots:
                dropped = self.retries.popleft()
                log.error("connection-log retry queue full: dropped %d logs", len(dropped.rows))
            self.retries.append(_Retry(rows))

    async def _retry_once(self) -> None:
        for _ in range(len(self.retries)):
            item = self.retries.popleft()
            started = perf_counter()
            try:
                await upsert_connection_logs(self.db, item.rows)
                log.debug(
                    "flush batcher=connection_log rows=%d duration_ms=%.1f retry=%d",
                    len(item.rows),
                    elapsed_ms(started),
                    item.attempts + 1,
                )
            except trio.Cancelled:
                self._requeue(item.rows)
                raise
            except Exception:
                item.attempts += 1
                if item.attempts >= self.max_retries:
                    log.exception(
                        "dropped %d connection logs after %d retries", len(item.rows), item.attempts
                    )
                else:
                    self.retries.append(item)

    def _drain(self) -> None:
        while True:
            try:
                self.batch.add(self._recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._running = True
        task_status.started()
        try:
            next_flush = trio.current_time() + self.interval
            next_retry = math.inf
            while True:
                row: ConnectionLogRow | None = None
                with trio.move_on_at(min(next_flush, next_retry)):
                    try:
                        row = await self._recv.receive()
                    except trio.EndOfChannel:
                        return  # intake closed by close(): the final write below takes the rest
                if row is not None:
                    self.batch.add(row)
                    if len(self.batch) >= self.batch_size:
                        await self._write(self.batch.take())
                        next_flush = trio.current_time() + self.interval
                now = trio.current_time()
                if now >= next_retry:
                    await self._retry_once()
                    next_retry = math.inf
                if now >= next_flush:
                    if len(self.batch):
                        await self._write(self.batch.take())
                    next_flush = now + self.interval
                if self.retries and next_retry == math.inf:
                    next_retry = trio.current_time() + self.retry_delay
        finally:
            try:
                with self.cleanup.shield(self.shutdown_timeout):
                    await self._write_everything()
            finally:
                self._running = False
                self._done.set()

    async def close(self) -> None:
        """Stop intake and wait until everything held is written (what cancelling ``run`` does)."""
        self._send.close()
        if self._running:
            await self._done.wait()
        else:
            await self._write_everything()

    async def _write_everything(self) -> None:
        """Final write: queued retries merged with the open batch and whatever is still in the channel."""
        self._send.close()
        held = Batch()
        for item in self.retries:
            for r in item.rows:
                held.add(r)
        self.retries.clear()
        for r in self.batch.take():
            held.add(r)
        self.batch = held
        self._drain()
        rows = self.batch.take()
        if not rows:
            return
        started = perf_counter()
        try:
            await upsert_connection_logs(self.db, rows)
            log.debug(
                "flush batcher=connection_log rows=%d duration_ms=%.1f final=1",
                len(rows),
                elapsed_ms(started),
            )
        except Exception:
            log.exception("final write of %d connection logs failed; they are lost", len(rows))
