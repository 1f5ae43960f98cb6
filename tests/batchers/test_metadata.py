"""Metadata batcher (spec §9.1): dedupe, capacity / interval flushes, bounded buffer with counted drops,
chunked NOTIFY payloads and the final flush on shutdown."""

from __future__ import annotations

import base64
import datetime as dt
import logging
import uuid

import pytest
import trio
import trio.testing

import agentd.testing
from agentd.batchers.metadata import (
    MAX_IDS_PER_MESSAGE,
    MetadataBatcher,
    encode_agent_ids,
    notify_payloads,
)
from agentd.channels import METADATA_BATCH_CHANNEL
from agentd.store import Database, PubSub
from agentd.store.metadata import MetadataUpdate, metadata_rows
from tests.services.audit_support import T0
from tests.services.test_metadata import seed_with_metadata


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Autojump only after real idleness, so database round trips never look like idle time."""
    return agentd.testing.virtual_clock(0.2)


class Recorder:
    """A publisher that remembers what it was asked to NOTIFY."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self._changed = trio.Event()

    async def publish(self, channel: str, payload: str | bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.sent.append((channel, payload if isinstance(payload, str) else payload.decode()))
        self._changed.set()

    async def wait_for(self, n: int) -> None:
        """Until ``n`` messages were sent (no polling: polling costs real time under the clock)."""
        while len(self.sent) < n:
            self._changed = trio.Event()
            await self._changed.wait()


def upd(agent: uuid.UUID, key: str, value: str, seconds: float = 0) -> MetadataUpdate:
    return MetadataUpdate(agent, key, value, "", T0 + dt.timedelta(seconds=seconds))


def decode_ids(payload: str) -> list[uuid.UUID]:
    assert len(payload) % 22 == 0
    return [uuid.UUID(bytes=base64.b64decode(payload[i : i + 22] + "==")) for i in range(0, len(payload), 22)]


# ---- pure parts ---------------------------------------------------------------------------------


def test_agent_ids_are_raw_std_base64_concatenated() -> None:
    ids = [uuid.UUID(int=0), uuid.UUID(int=2**128 - 1), uuid.uuid4()]
    payload = encode_agent_ids(ids)
    assert len(payload) == 66 and "=" not in payload
    assert payload[:22] == "A" * 22 and payload[22:44] == "/" * 21 + "w"
    assert decode_ids(payload) == ids


def test_notify_payloads_are_chunked_below_8000_bytes() -> None:
    ids = [uuid.uuid4() for _ in range(2 * MAX_IDS_PER_MESSAGE + 5)]
    payloads = notify_payloads(ids)
    assert [len(p) // 22 for p in payloads] == [363, 363, 5]
    assert all(len(p.encode()) < 8000 for p in payloads)
    assert [i for p in payloads for i in decode_ids(p)] == ids


async def test_full_buffer_drops_are_counted_and_warned_at_most_every_10_s(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    b = MetadataBatcher(db=None, publisher=Recorder(), buffer_size=3)  # type: ignore[arg-type]
    a = uuid.uuid4()
    with caplog.at_level(logging.WARNING, "agentd.batchers.metadata"):
        assert [b.add(upd(a, f"k{i}", "v")) for i in range(5)] == [True, True, True, False, False]
        await trio.sleep(5)
        b.add(upd(a, "x", "v"))
        await trio.sleep(6)
        b.add(upd(a, "y", "v"))
    assert b.dropped == 4
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "metadata buffer full: dropped 1 updates (1 in total)",
        "metadata buffer full: dropped 3 updates (4 in total)",
    ]


# ---- with the database ----------------------------------------------------------------------------


async def values(db: Database, agent: uuid.UUID) -> dict[str, str]:
    return {k: r.value for k, r in (await metadata_rows(db, agent)).items()}


async def test_later_collected_at_wins_and_older_updates_are_ignored(
    db: Database, clock: trio.testing.MockClock
) -> None:
    [(ident, _)] = await seed_with_metadata(db, ["k", "j", "m"])
    a = ident.agent_id
    b = MetadataBatcher(db, Recorder(), interval=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run)
        b.add(upd(a, "k", "new", 10))
        b.add(upd(a, "k", "old", 5))  # collected before the value already batched: ignored
        b.add(upd(a, "j", "j", 0))
        b.add(upd(a, "m", "first", 10))
        b.add(upd(a, "m", "same-time-later-call", 10))  # same collected_at: the later call wins
        nursery.cancel_scope.cancel()  # the final flush writes what the batch holds
    assert await values(db, a) == {"k": "new", "j": "j", "m": "same-time-later-call"}
    assert b.flushes == 1  # one batch, deduped by (agent, key): one UPDATE per row


async def test_interval_flush_after_5_s(db: Database, clock: trio.testing.MockClock) -> None:
    [(ident, _)] = await seed_with_metadata(db, ["a"])
    rec = Recorder()
    b = MetadataBatcher(db, rec)
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run)
        start = trio.current_time()
        b.add(upd(ident.agent_id, "a", "1"))
        await trio.sleep(4)
        assert await values(db, ident.agent_id) == {"a": ""}
        await rec.wait_for(1)
        assert 5 <= trio.current_time() - start < 6.5
        assert await values(db, ident.agent_id) == {"a": "1"}
        assert rec.sent == [(METADATA_BATCH_CHANNEL, encode_agent_ids([ident.agent_id]))]
        nursery.cancel_scope.cancel()
    assert b.flushes == 1


async def test_capacity_flush_comes_early_and_resets_the_timer(
    db: Database, clock: trio.testing.MockClock
) -> None:
    [(ident, _)] = await seed_with_metadata(db, ["k0", "k1", "k2", "k3"])
    rec = Recorder()
    b = MetadataBatcher(db, rec, capacity=3, interval=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run)
        await trio.sleep(3)
        for i in range(3):
            b.add(upd(ident.agent_id, f"k{i}", "v"))
        await rec.wait_for(1)
        flushed_at = trio.current_time()
        assert flushed_at < 4  # at capacity, not at the 5 s tick
        assert await values(db, ident.agent_id) == {"k0": "v", "k1": "v", "k2": "v", "k3": ""}
        b.add(upd(ident.agent_id, "k3", "late"))
        await rec.wait_for(2)
        # The timer restarted at the capacity flush: the next write is ~5 s after it, not at t = 5.
        assert trio.current_time() - flushed_at > 4.5
        nursery.cancel_scope.cancel()
    assert await values(db, ident.agent_id) == {"k0": "v", "k1": "v", "k2": "v", "k3": "late"}


async def test_flush_on_shutdown_loses_nothing(db: Database, clock: trio.testing.MockClock) -> None:
    """Every accepted update — in the batch or still in the buffer — is written when the daemon stops."""
    keys = [f"k{i}" for i in range(7)]
    (a, _), (b_ident, _) = await seed_with_metadata(db, keys, agents=("a", "b"))
    rec = Recorder()
    batcher = MetadataBatcher(db, rec, capacity=5, interval=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        for k in keys:
            batcher.add(upd(a.agent_id, k, "A" + k))
            batcher.add(upd(b_ident.agent_id, k, "B" + k))
        nursery.cancel_scope.cancel()  # before the run task has even drained the buffer
    assert await values(db, a.agent_id) == {k: "A" + k for k in keys}
    assert await values(db, b_ident.agent_id) == {k: "B" + k for k in keys}
    notified = {i for _, p in rec.sent for i in decode_ids(p)}
    assert notified == {a.agent_id, b_ident.agent_id}
    assert not batcher.add(upd(a.agent_id, "k0", "after"))  # stopped: refused and counted
    assert batcher.dropped == 1


async def test_notify_reaches_pubsub_subscribers_in_chunks(
    db: Database, clock: trio.testing.MockClock
) -> None:
    pubsub = PubSub(db)
    agents = [uuid.uuid4() for _ in range(MAX_IDS_PER_MESSAGE + 2)]  # unknown agents: nothing updated
    b = MetadataBatcher(db, pubsub, capacity=10_000, interval=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(pubsub.run)
        async with pubsub.subscribe(METADATA_BATCH_CHANNEL) as sub:
            await nursery.start(b.run)
            for agent in agents:
                b.add(upd(agent, "k", "v"))
            first = await sub.__anext__()
            second = await sub.__anext__()
        nursery.cancel_scope.cancel()
    assert isinstance(first, str) and isinstance(second, str)
    assert decode_ids(first) + decode_ids(second) == agents


async def test_a_failed_write_is_logged_and_not_retried(
    db: Database, clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    b = MetadataBatcher(db, rec, interval=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run)
        b.add(MetadataUpdate(uuid.uuid4(), "k", "v", "", dt.datetime(1, 1, 1, tzinfo=dt.UTC)))
        await db.execute("ALTER TABLE workspace_agent_metadata RENAME TO wam_gone")
        await trio.sleep(2)
        await db.execute("ALTER TABLE wam_gone RENAME TO workspace_agent_metadata")
        assert b.pending == 0 and rec.sent == []
        nursery.cancel_scope.cancel()
    assert any("write 1 metadata updates" in r.getMessage() for r in caplog.records)
