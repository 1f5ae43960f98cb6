"""The process-wide metadata batcher (spec §9.1): agents' metadata results, written in batches.

``add`` never blocks an RPC: updates go through a bounded buffer (2500) and are dropped — counted,
with a warning at most every 10 s — when it is full. The batch dedupes by (agent, key), the later
``collected_at`` winning, and is written when it holds ``capacity`` (500) distinct entries or every
``interval`` (5 s; a capacity write restarts the timer). A write is one ``UPDATE … FROM unnest`` of
existing rows followed by NOTIFYs on ``workspace_agent_metadata_batch`` naming the agents of the
batch (22-character raw-std base64 ids, concatenated, ≤ 363 per message so each stays < 8000 bytes).
A failed write is logged and not retried (the agent reports again within its interval). Cancelling
``run`` (shutdown) writes everything accepted so far, shielded and bounded by 15 s or the daemon's
cleanup deadline (agentd.shutdown), whichever comes first.
"""

from __future__ import annotations

import base64
import logging
import math
import uuid
from collections.abc import Iterable, Sequence
from time import perf_counter
from typing import Protocol

import attrs
import trio

from agentd.channels import METADATA_BATCH_CHANNEL
from agentd.logfmt import elapsed_ms
from agentd.shutdown import CleanupDeadline
from agentd.store import Database
from agentd.store.errors import QueryCanceled, StoreError
from agentd.store.metadata import MetadataUpdate, batch_update_metadata

__all__ = [
    "CAPACITY",
    "MAX_IDS_PER_MESSAGE",
    "MetadataBatcher",
    "encode_agent_ids",
    "notify_payloads",
    "write_and_notify",
]

log = logging.getLogger("agentd.batchers.metadata")

CAPACITY = 500
BUFFER_SIZE = 5 * CAPACITY
FLUSH_INTERVAL_S = 5.0
SHUTDOWN_FLUSH_TIMEOUT_S = 15.0
DROP_WARN_INTERVAL_S = 10.0
#: A raw-std base64 UUID is 22 bytes; 363 of them (7986 bytes) fit PostgreSQL's 8000-byte NOTIFY limit.
MAX_IDS_PER_MESSAGE = 363


class Publisher(Protocol):
    async def publish(self, channel: str, payload: str | bytes) -> None: ...


def encode_agent_ids(ids: Iterable[uuid.UUID]) -> str:
    """Agent ids as base64 raw standard encoding (no padding), concatenated without separators."""
    return "".join(base64.b64encode(i.bytes).decode("ascii").rstrip("=") for i in ids)


def notify_payloads(ids: Sequence[uuid.UUID], per_message: int = MAX_IDS_PER_MESSAGE) -> list[str]:
    """The NOTIFY payloads announcing ``ids``: chunks of at most ``per_message`` ids."""
    return [encode_agent_ids(ids[i : i + per_message]) for i in range(0, len(ids), per_message)]


async def write_and_notify(db: Database, publisher: Publisher, updates: Sequence[MetadataUpdate]) -> None:
    """One batch: the UPDATE of existing rows, then the NOTIFYs of the agents it names."""
    if not updates:
        return
    await batch_update_metadata(db, updates)
    agents = list(dict.fromkeys(u.agent_id for u in updates))
    for payload in notify_payloads(agents):
        await publisher.publish(METADATA_BATCH_CHANNEL, payload)


@attrs.define(eq=False)
class MetadataBatcher:
    """Collects metadata updates of every agent of this replica; ``run`` writes them."""

    db: Database
    publisher: Publisher
    capacity: int = CAPACITY
    buffer_size: int = BUFFER_SIZE
    interval: float = FLUSH_INTERVAL_S
    shutdown_timeout: float = SHUTDOWN_FLUSH_TIMEOUT_S
    drop_warn_interval: float = DROP_WARN_INTERVAL_S
    #: the daemon's: a stop bounds (and a second signal cuts) the final write
    cleanup: CleanupDeadline = attrs.field(factory=CleanupDeadline)
    #: Updates refused because the buffer was full (or the batcher had stopped).
    dropped: int = attrs.field(default=0, init=False)
    #: Batches written (tests and metrics look at it).
    flushes: int = attrs.field(default=0, init=False)
    _batch: dict[tuple[uuid.UUID, str], MetadataUpdate] = attrs.field(factory=dict, init=False)
    _last_drop_warning: float = attrs.field(default=-math.inf, init=False)
    _dropped_since_warning: int = attrs.field(default=0, init=False)
    _send: trio.MemorySendChannel[MetadataUpdate] = attrs.field(init=False)
    _recv: trio.MemoryReceiveChannel[MetadataUpdate] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[MetadataUpdate](self.buffer_size)

    def add(self, update: MetadataUpdate) -> bool:
        """Queue one update without waiting; False (and counted) when it had to be dropped."""
        try:
            self._send.send_nowait(update)
            return True
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self._dropped(1)
            return False

    def _dropped(self, n: int) -> None:
        self.dropped += n
        self._dropped_since_warning += n
        now = trio.current_time()
        if now - self._last_drop_warning >= self.drop_warn_interval:
            log.warning(
                "metadata buffer full: dropped %d updates (%d in total)",
                self._dropped_since_warning,
                self.dropped,
            )
            self._last_drop_warning = now
            self._dropped_since_warning = 0

    def _put(self, update: MetadataUpdate) -> None:
        key = (update.agent_id, update.key)
        held = self._batch.get(key)
        if held is not None and held.collected_at > update.collected_at:
            return  # an older result than the one already batched
        self._batch[key] = update

    @property
    def pending(self) -> int:
        """Distinct (agent, key) entries waiting for the next write (not counting the buffer)."""
        return len(self._batch)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            deadline = trio.current_time() + self.interval
            while True:
                update: MetadataUpdate | None = None
                with trio.move_on_at(deadline):
                    update = await self._recv.receive()
                while update is not None:
                    self._put(update)
                    if len(self._batch) >= self.capacity:
                        await self._flush()
                        deadline = trio.current_time() + self.interval
                    # Take whatever else is queued without a wait (and its cancel scope) per update.
                    try:
                        update = self._recv.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        update = None
                if trio.current_time() >= deadline:
                    await self._flush()
                    deadline = trio.current_time() + self.interval
        finally:
            with self.cleanup.shield(self.shutdown_timeout):
                await self._final_flush()

    async def _final_flush(self) -> None:
        self._send.close()
        while True:
            try:
                self._put(self._recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if len(self._batch) >= self.capacity:
                await self._flush()
        await self._flush()

    async def _flush(self) -> None:
        if not self._batch:
            return
        updates = list(self._batch.values())
        self._batch = {}
        self.flushes += 1
        started = perf_counter()
        try:
            await write_and_notify(self.db, self.publisher, updates)
            log.debug("flush batcher=metadata updates=%d duration_ms=%.1f", len(updates), elapsed_ms(started))
        except trio.Cancelled:
            # Shutdown during a write: the final flush writes them again (the update is idempotent).
            for u in updates:
                self._put(u)
            raise
        except QueryCanceled:
            pass
        except StoreError:
            log.exception("write %d metadata updates", len(updates))
