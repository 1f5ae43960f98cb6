"""The process-wide agent stats batcher (spec §9.2): workspace_agent_stats rows, written in batches.

``add`` never blocks an RPC. Rows are written every ``interval`` (1 s), or at once when the buffer is
80 % of ``batch_size`` (1024) full, as one multi-row insert. While a write is in flight the buffer may
grow past ``batch_size`` (as coderd's does) up to ``max_buffered`` rows; beyond that rows are refused
and counted. A failed write is logged and not retried. Cancelling ``run`` (shutdown) writes every
accepted row, shielded and bounded by 15 s.
"""

from __future__ import annotations

import logging
from time import perf_counter

import attrs
import trio

from agentd.logfmt import elapsed_ms
from agentd.store import Database
from agentd.store.errors import QueryCanceled, StoreError
from agentd.store.stats import AgentStatsRow, insert_agent_stats

__all__ = ["BATCH_SIZE", "StatsBatcher"]

log = logging.getLogger("agentd.batchers.stats")

BATCH_SIZE = 1024
FLUSH_INTERVAL_S = 1.0
EARLY_FLUSH_FRACTION = 0.8
SHUTDOWN_FLUSH_TIMEOUT_S = 15.0


@attrs.define(eq=False)
class StatsBatcher:
    db: Database
    batch_size: int = BATCH_SIZE
    interval: float = FLUSH_INTERVAL_S
    shutdown_timeout: float = SHUTDOWN_FLUSH_TIMEOUT_S
    max_buffered: int = 16 * BATCH_SIZE
    dropped: int = attrs.field(default=0, init=False)
    flushes: int = attrs.field(default=0, init=False)
    _rows: list[AgentStatsRow] = attrs.field(factory=list, init=False)
    _lever: trio.Event = attrs.field(factory=trio.Event, init=False)
    _stopped: bool = attrs.field(default=False, init=False)

    def add(self, row: AgentStatsRow) -> bool:
        """Queue one row; False (counted) when the buffer is at ``max_buffered`` or the batcher stopped."""
        if self._stopped or len(self._rows) >= self.max_buffered:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("stats buffer full: %d rows dropped in total", self.dropped)
            return False
        self._rows.append(row)
        if len(self._rows) >= EARLY_FLUSH_FRACTION * self.batch_size:
            self._lever.set()
        return True

    @property
    def pending(self) -> int:
        return len(self._rows)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            deadline = trio.current_time() + self.interval
            while True:
                with trio.move_on_at(deadline):
                    await self._lever.wait()
                await self._flush()
                deadline = trio.current_time() + self.interval
        finally:
            self._stopped = True
            with trio.CancelScope(shield=True), trio.move_on_after(self.shutdown_timeout):
                while self._rows:
                    await self._flush()

    async def _flush(self) -> None:
        self._lever = trio.Event()
        if not self._rows:
            return
        rows, self._rows = self._rows[: self.max_buffered], self._rows[self.max_buffered :]
        self.flushes += 1
        started = perf_counter()
        try:
            await insert_agent_stats(self.db, rows)
            log.debug("flush batcher=stats rows=%d duration_ms=%.1f", len(rows), elapsed_ms(started))
        except trio.Cancelled:
            self._rows[:0] = rows  # shutdown mid-write: the final flush inserts them
            raise
        except QueryCanceled:
            pass
        except StoreError:
            log.exception("insert %d agent stats rows", len(rows))
