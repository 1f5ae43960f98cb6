"""Cross-replica publish/subscribe over PostgreSQL LISTEN/NOTIFY.

One dedicated LISTEN connection per `PubSub`, owned by the task running `PubSub.run` (it waits for
notifications with trio's own socket wait, `trio_pg.wait_notifies`, which is safe to cancel); it fans
notifications out to any number of `Subscription`s, each with a bounded buffer. When the buffer
is full, or the LISTEN connection is lost and re-established, subscribers receive the `MISSED`
marker: they may have lost messages and should re-read the state they follow.

    pubsub = PubSub(db)
    await nursery.start(pubsub.run)
    async with pubsub.subscribe("agent-logs:" + str(agent_id)) as sub:
        async for item in sub:
            if item is MISSED: ...   # else item is the str payload
"""

from __future__ import annotations

import collections
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Final

import attrs
import trio
from psycopg import sql as pgsql

from agentd.store.db import Conn, Database, Transaction
from agentd.store.errors import PayloadTooLarge, StoreError
from agentd.store.trio_pg import wait_notifies

log = logging.getLogger("agentd.pubsub")

__all__ = ["MAX_CHANNEL_BYTES", "MAX_PAYLOAD_BYTES", "MISSED", "Missed", "PubSub", "Subscription"]

# PostgreSQL refuses NOTIFY payloads of 8000 bytes or more (default build), and channel names are
# identifiers (NAMEDATALEN - 1 = 63 bytes).
MAX_PAYLOAD_BYTES: Final = 7999
MAX_CHANNEL_BYTES: Final = 63


@attrs.frozen
class Missed:
    """Marker delivered to a subscriber that may have missed messages."""

    def __repr__(self) -> str:
        return "MISSED"


MISSED: Final = Missed()


def _check_channel(channel: str) -> None:
    size = len(channel.encode("utf-8"))
    if size == 0 or size > MAX_CHANNEL_BYTES:
        raise PayloadTooLarge(f"pubsub channel name must be 1..{MAX_CHANNEL_BYTES} bytes, got {size}")


def _payload_text(payload: str | bytes) -> str:
    text = payload.decode("utf-8") if isinstance(payload, bytes) else payload
    size = len(text.encode("utf-8"))
    if size > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(
            f"pubsub payload of {size} bytes exceeds PostgreSQL's NOTIFY limit of {MAX_PAYLOAD_BYTES} bytes"
        )
    if "\x00" in text:
        raise ValueError("pubsub payload must not contain NUL characters")
    return text


@attrs.define(eq=False)
class Subscription:
    """Async iterator over one channel's payloads (``str``) and `MISSED` markers.

    Once drained, raises `trio.BrokenResourceError` if the owning `PubSub` has stopped and
    `trio.ClosedResourceError` after its ``subscribe`` block has been left.
    """

    channel: str
    _capacity: int
    _buffer: collections.deque[str | Missed] = attrs.field(factory=collections.deque)
    _overflowed: bool = False
    _closed: type[trio.ClosedResourceError | trio.BrokenResourceError] | None = None
    _lot: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)
    _listening: trio.Event = attrs.field(factory=trio.Event)

    def _deliver(self, item: str | Missed) -> None:
        if isinstance(item, Missed):
            if not self._buffer or self._buffer[-1] is not MISSED:
                self._buffer.append(MISSED)
            self._overflowed = False
        elif len(self._buffer) >= self._capacity:
            # Dropped. A MISSED marker still queued at the tail already covers this loss: the
            # consumer re-reads its state after taking it, which includes this message's effect.
            if self._buffer[-1] is not MISSED:
                self._overflowed = True
            return
        else:
            if self._overflowed:
                self._buffer.append(MISSED)
                self._overflowed = False
            self._buffer.append(item)
        self._lot.unpark_all()

    def _close(self, error: type[trio.ClosedResourceError | trio.BrokenResourceError]) -> None:
        if self._closed is None:
            self._closed = error
        self._listening.set()
        self._lot.unpark_all()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> str | Missed:
        while True:
            if self._buffer:
                await trio.lowlevel.checkpoint()
                return self._buffer.popleft()
            if self._overflowed:
                self._overflowed = False
                await trio.lowlevel.checkpoint()
                return MISSED
            if self._closed is trio.ClosedResourceError:
                raise trio.ClosedResourceError("subscription closed")
            if self._closed is not None:
                raise trio.BrokenResourceError("pubsub stopped")
            await self._lot.park()

    def pending(self) -> int:
        """Number of buffered items (for tests and metrics)."""
        return len(self._buffer)


async def _listen(conn: Conn, listen: list[str], unlisten: list[str]) -> None:
    for channel in listen:
        await conn.execute(pgsql.SQL("LISTEN {}").format(pgsql.Identifier(channel)))
    for channel in unlisten:
        await conn.execute(pgsql.SQL("UNLISTEN {}").format(pgsql.Identifier(channel)))


@attrs.define(eq=False)
class PubSub:
    """NOTIFY publisher and LISTEN fan-out; start `run` in a nursery before subscribing."""

    _db: Database
    buffer_size: int = attrs.field(default=2048, kw_only=True)
    reconnect_delay: float = attrs.field(default=0.25, kw_only=True)
    max_reconnect_delay: float = attrs.field(default=5.0, kw_only=True)
    _subs: dict[str, set[Subscription]] = attrs.field(factory=dict, init=False)
    # Channels LISTENed on the current connection, as applied (updated only after a round's SQL
    # has run); `_unlistening` holds the channels whose UNLISTEN is in flight right now.
    _listening: set[str] = attrs.field(factory=set, init=False)
    _unlistening: frozenset[str] = attrs.field(default=frozenset(), init=False)
    _dirty: bool = attrs.field(default=False, init=False)
    _wait_scope: trio.CancelScope | None = attrs.field(default=None, init=False)
    _running: bool = attrs.field(default=False, init=False)
    _stopped: bool = attrs.field(default=False, init=False)
    reconnects: int = attrs.field(default=0, init=False)

    @property
    def database(self) -> Database:
        """Where NOTIFYs go: a statement on this database may send them itself (``pg_notify``)."""
        return self._db

    async def publish(self, channel: str, payload: str | bytes, *, tx: Transaction | None = None) -> None:
        """NOTIFY ``channel``; inside ``tx`` the message is sent when that transaction commits.

        Raises `PayloadTooLarge` (a ValueError) for payloads over 7999 bytes or bad channel names.
        """
        _check_channel(channel)
        text = _payload_text(payload)
        query = "SELECT pg_notify(%s, %s)"
        if tx is None:
            await self._db.execute(query, [channel, text])
        else:
            await tx.execute(query, [channel, text])

    async def publish_many(self, messages: Sequence[tuple[str, str | bytes]]) -> None:
        """NOTIFY each ``(channel, payload)`` in one statement (in order); same checks as `publish`."""
        if not messages:
            return
        channels: list[str] = []
        payloads: list[str] = []
        for channel, payload in messages:
            _check_channel(channel)
            channels.append(channel)
            payloads.append(_payload_text(payload))
        await self._db.execute(
            "SELECT pg_notify(c, p) FROM unnest(%s::text[], %s::text[]) AS m(c, p)",
            [channels, payloads],
        )

    @asynccontextmanager
    async def subscribe(self, channel: str, *, buffer_size: int | None = None) -> AsyncIterator[Subscription]:
        """Subscribe to ``channel``; LISTEN is active when the body starts (messages published
        after entry are delivered). Waits while the listener is reconnecting. ``buffer_size``
        overrides the PubSub's default bound for this subscription."""
        _check_channel(channel)
        if not self._running:
            raise RuntimeError("PubSub.run() is not running; start it in a nursery first")
        sub = Subscription(channel, self.buffer_size if buffer_size is None else buffer_size)
        self._subs.setdefault(channel, set()).add(sub)
        try:
            if channel in self._listening and channel not in self._unlistening:
                sub._listening.set()
            else:
                # Not listened yet, or its UNLISTEN is in flight: the listener re-checks the wanted
                # set after that round and LISTENs again before this body may start.
                self._poke()
            await sub._listening.wait()
            if self._stopped:
                raise trio.BrokenResourceError("pubsub stopped")
            yield sub
        finally:
            sub._close(trio.ClosedResourceError)
            subs = self._subs.get(channel)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[channel]
                    self._poke()

    def _poke(self) -> None:
        self._dirty = True
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    def _dispatch(self, channel: str, item: str | Missed) -> None:
        for sub in list(self._subs.get(channel, ())):
            sub._deliver(item)

    async def _sync_listens(self, conn: Conn) -> None:
        """Apply LISTEN/UNLISTEN rounds until the applied set equals the current wanted set.

        Subscriptions can come and go while a round's SQL is in flight, so the wanted set is
        re-read after every round rather than trusted from before it; ``_listening`` only ever
        records what the server has actually applied. After each round, subscribers of channels
        now applied are released (their LISTEN is active), so churn elsewhere cannot starve them.
        """
        while True:
            self._dirty = False
            wanted = set(self._subs)
            listen = sorted(wanted - self._listening)
            unlisten = sorted(self._listening - wanted)
            if listen or unlisten:
                self._unlistening = frozenset(unlisten)
                try:
                    await self._db._run_on(conn, _listen, listen, unlisten)
                finally:
                    self._unlistening = frozenset()
                self._listening.update(listen)
                self._listening.difference_update(unlisten)
            for channel, subs in self._subs.items():
                if channel in self._listening:
                    for sub in subs:
                        sub._listening.set()
            if not listen and not unlisten:
                return

    async def _serve(self, conn: Conn, *, reconnected: bool) -> None:
        # Only subscribers live before the loss may have missed messages; those that arrived
        # while reconnecting have not started their body yet and get LISTEN before it starts.
        live = [sub for subs in self._subs.values() for sub in subs if sub._listening.is_set()]
        await self._sync_listens(conn)
        if reconnected:
            for sub in live:
                if sub._closed is None:
                    sub._deliver(MISSED)
        while True:
            if self._dirty:
                await self._sync_listens(conn)
                continue
            with trio.CancelScope() as scope:
                self._wait_scope = scope
                try:
                    notes = await self._db._wait_on(conn, wait_notifies)
                finally:
                    self._wait_scope = None
            if scope.cancelled_caught:
                continue
            for note in notes:
                self._dispatch(note.channel, note.payload)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the LISTEN connection until cancelled; reconnect (with backoff) when it is lost.

        The first connection must succeed (its error propagates); later losses are retried and
        every subscriber then receives `MISSED`.
        """
        if self._running:
            raise trio.BusyResourceError("PubSub.run() is already running")
        self._running = True
        started = False
        delay = self.reconnect_delay
        try:
            while True:
                try:
                    conn = await self._db._connect()
                except StoreError as exc:
                    if not started:
                        raise
                    log.debug("pubsub reconnect failed retry_in_s=%g: %s", delay, exc)
                    await trio.sleep(delay)
                    delay = min(delay * 2, self.max_reconnect_delay)
                    continue
                delay = self.reconnect_delay
                try:
                    if not started:
                        started = True
                        task_status.started()
                        await self._serve(conn, reconnected=False)
                    else:
                        self.reconnects += 1
                        log.debug("pubsub reconnected reconnects=%d", self.reconnects)
                        await self._serve(conn, reconnected=True)
                except StoreError as exc:
                    # Lost the connection (terminated backend, network, server restart).
                    log.debug("pubsub LISTEN connection lost, reconnecting in %g s: %s", delay, exc)
                    self._listening = set()
                finally:
                    await self._db._close_conn(conn)
                await trio.sleep(delay)
        finally:
            self._running = False
            self._stopped = True
            self._listening = set()
            for subs in self._subs.values():
                for sub in subs:
                    sub._close(trio.BrokenResourceError)

    def subscriber_count(self, channel: str | None = None) -> int:
        """How many subscriptions are open (on ``channel``, or in total)."""
        if channel is not None:
            return len(self._subs.get(channel, ()))
        return sum(len(s) for s in self._subs.values())
