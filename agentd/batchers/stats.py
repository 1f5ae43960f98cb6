"""The process-wide agent stats batcher (spec §9.2): workspace_agent_stats rows, written in batches.

``add`` never blocks an RPC. Rows are written every ``interval`` (1 s), or at once when the buffer is
80 % of ``batch_size`` (1024) full, as one multi-row insert. While a write is in flight the buffer may
grow past ``batch_size`` (as coderd's does) up to ``max_buffered`` rows; beyond that rows are refused
and counted (``dropped``: the RPC still succeeds, as in coderd). A failed write is logged with its
number of rows and not retried while serving; those rows are counted in ``lost``.

Cancelling ``run`` (shutdown) writes every accepted row, shielded, retrying failed writes until
``shutdown_timeout`` (15 s) or the daemon's cleanup deadline (agentd.shutdown), whichever comes
first: the rows were acknowledged to the agent, which will not send them again. Whatever is still
unwritten then is counted in ``lost`` and logged with its number.
"""

from __future__ import annotations

import logging
from time import perf_counter

import attrs
import trio

from agentd.logfmt import elapsed_ms
from agentd.shutdown import CleanupDeadline
from agentd.store import Database
from agentd.store.errors import DataError, IntegrityError, StoreError
from agentd.store.stats import AgentStatsRow, insert_agent_stats

__all__ = ["BATCH_SIZE", "StatsBatcher"]

log = logging.getLogger("agentd.batchers.stats")

BATCH_SIZE = 1024
FLUSH_INTERVAL_S = 1.0
EARLY_FLUSH_FRACTION = 0.8
SHUTDOWN_FLUSH_TIMEOUT_S = 15.0
#: First pause between two attempts of the shutdown flush (doubling up to the max).
RETRY_DELAY_S = 0.1
MAX_RETRY_DELAY_S = 1.0


@attrs.define(eq=False)
class StatsBatcher:
    db: Database
    batch_size: int = BATCH_SIZE
    interval: float = FLUSH_INTERVAL_S
    shutdown_timeout: float = SHUTDOWN_FLUSH_TIMEOUT_S
    max_buffered: int = 16 * BATCH_SIZE
    cleanup: CleanupDeadline = attrs.field(factory=CleanupDeadline)
    #: rows refused by ``add`` (buffer full, or stopped)
    dropped: int = attrs.field(default=0, init=False)
    #: acknowledged rows never written (a failed write, or still held at the shutdown deadline)
    lost: int = attrs.field(default=0, init=False)
    flushes: int = attrs.field(default=0, init=False)
    _rows: list[AgentStatsRow] = attrs.field(factory=list, init=False)
    _lever: trio.Event = attrs.field(factory=trio.Event, init=False)
    _stopped: bool = attrs.field(default=False, init=False)
    #: rows of the write in flight (taken out of ``_rows`` until it returns)
    _writing: int = attrs.field(default=0, init=False)

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
            await self._final_flush()

    async def _final_flush(self) -> None:
        """Write every held row, retrying, until the shutdown bound; count and log what is left."""
        delay = RETRY_DELAY_S
        with self.cleanup.shield(self.shutdown_timeout):
            while self._rows:
                if not await self._flush(keep_on_error=True):
                    await trio.sleep(delay)
                    delay = min(2 * delay, MAX_RETRY_DELAY_S)
        self.give_up()

    def give_up(self) -> int:
        """Count every row not known to be written (held, or in a write still in flight) as lost and
        log their number: the process is stopping without writing them."""
        left = len(self._rows) + self._writing
        self._rows, self._writing = [], 0
        if left:
            self.lost += left
            log.error("%d acknowledged agent stats rows not written before the shutdown deadline: lost", left)
        return left

    async def _flush(self, *, keep_on_error: bool = False) -> bool:
        """Write the held rows; False when the write failed (the rows are then kept if
        ``keep_on_error`` and the failure may pass, else counted as lost)."""
        self._lever = trio.Event()
        if not self._rows:
            return True
        rows, self._rows = self._rows[: self.max_buffered], self._rows[self.max_buffered :]
        self.flushes += 1
        self._writing = len(rows)
        started = perf_counter()
        try:
            await insert_agent_stats(self.db, rows)
            log.debug("flush batcher=stats rows=%d duration_ms=%.1f", len(rows), elapsed_ms(started))
            return True
        except trio.Cancelled:
            self._rows[:0] = rows  # shutdown mid-write: the final flush inserts them
            raise
        except StoreError as exc:
            # Refused data (a value out of range …) fails again however often it is sent.
            if keep_on_error and not isinstance(exc, (DataError, IntegrityError)):
                self._rows[:0] = rows
                log.warning("writing %d agent stats rows failed (will retry): %s", len(rows), exc)
            else:
                self.lost += len(rows)
                log.error("writing %d agent stats rows failed; they are lost: %s", len(rows), exc)
            return False
        finally:
            self._writing = 0
