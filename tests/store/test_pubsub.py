"""PubSub over LISTEN/NOTIFY: two replicas sharing a database, limits, overflow, reconnect."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from agentd.store import Database, open_database
from agentd.store import pubsub as pubsub_module
from agentd.store.errors import PayloadTooLarge
from agentd.store.pubsub import MAX_PAYLOAD_BYTES, MISSED, Missed, PubSub, Subscription

WAIT = 5.0


@asynccontextmanager
async def running(pubsub: PubSub) -> AsyncIterator[PubSub]:
    async with trio.open_nursery() as nursery:
        await nursery.start(pubsub.run)
        yield pubsub
        nursery.cancel_scope.cancel()


async def next_item(sub: Subscription) -> str | Missed:
    with trio.fail_after(WAIT):
        return await sub.__anext__()


async def test_two_replicas_share_messages(db_url: str) -> None:
    async with (
        open_database(db_url, max_size=2) as db_a,
        open_database(db_url, max_size=2) as db_b,
        running(PubSub(db_a)) as replica_a,
        running(PubSub(db_b)) as replica_b,
        replica_a.subscribe("workspace_owner:6a1e") as on_a,
        replica_b.subscribe("workspace_owner:6a1e") as on_b,
    ):
        await replica_a.publish("workspace_owner:6a1e", '{"kind":"agt_lifecycle_update"}')
        await replica_b.publish("workspace_owner:6a1e", b"from-b")
        assert [await next_item(on_a), await next_item(on_a)] == ['{"kind":"agt_lifecycle_update"}', "from-b"]
        assert [await next_item(on_b), await next_item(on_b)] == ['{"kind":"agt_lifecycle_update"}', "from-b"]


async def test_fan_out_and_channel_isolation(pubsub: PubSub) -> None:
    async with (
        pubsub.subscribe("a") as first,
        pubsub.subscribe("a") as second,
        pubsub.subscribe("b") as other,
    ):
        assert pubsub.subscriber_count("a") == 2
        await pubsub.publish("a", "one")
        await pubsub.publish("b", "two")
        assert await next_item(first) == "one"
        assert await next_item(second) == "one"
        assert await next_item(other) == "two"
        assert first.pending() == 0 and other.pending() == 0
    assert pubsub.subscriber_count() == 0


async def test_unsubscribed_channel_stops_delivering(db: Database) -> None:
    async with running(PubSub(db)) as pubsub:
        async with pubsub.subscribe("c") as sub:
            await pubsub.publish("c", "1")
            assert await next_item(sub) == "1"
        async with pubsub.subscribe("c") as again:
            await pubsub.publish("c", "2")
            assert await next_item(again) == "2"
            assert again.pending() == 0
        with pytest.raises(trio.ClosedResourceError):
            await sub.__anext__()


async def test_payload_limit(db: Database) -> None:
    async with running(PubSub(db)) as pubsub, pubsub.subscribe("big") as sub:
        biggest = "x" * MAX_PAYLOAD_BYTES
        await pubsub.publish("big", biggest)
        assert await next_item(sub) == biggest
        with pytest.raises(PayloadTooLarge, match="7999 bytes"):
            await pubsub.publish("big", "x" * (MAX_PAYLOAD_BYTES + 1))
        # Multi-byte characters count as bytes, not characters.
        with pytest.raises(PayloadTooLarge):
            await pubsub.publish("big", "é" * 4000)
        with pytest.raises(ValueError):
            await pubsub.publish("c" * 64, "x")


async def test_publish_in_transaction_is_sent_on_commit(db: Database) -> None:
    async with running(PubSub(db)) as pubsub, pubsub.subscribe("tx") as sub:
        with pytest.raises(RuntimeError):
            async with db.transaction() as tx:
                await pubsub.publish("tx", "rolled-back", tx=tx)
                raise RuntimeError
        async with db.transaction() as tx:
            await pubsub.publish("tx", "committed", tx=tx)
            with trio.move_on_after(0.2):
                await sub.__anext__()
                raise AssertionError("delivered before commit")
        assert await next_item(sub) == "committed"
        assert sub.pending() == 0


async def test_overflow_delivers_missed(db: Database) -> None:
    async with (
        running(PubSub(db)) as pubsub,
        pubsub.subscribe("o", buffer_size=3) as sub,
        pubsub.subscribe("o") as sentinel,
    ):
        for i in range(6):
            await pubsub.publish("o", str(i))
        # Fan-out is synchronous: once the roomy sentinel has all six, sub has seen them too.
        assert [await next_item(sentinel) for _ in range(6)] == [str(i) for i in range(6)]
        assert sub.pending() == 3
        assert [await next_item(sub) for _ in range(4)] == ["0", "1", "2", MISSED]
        await pubsub.publish("o", "after")
        assert await next_item(sub) == "after"


async def test_reconnect_after_backend_terminated(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="agentd.pubsub")
    async with running(PubSub(db, reconnect_delay=0.05)) as pubsub, pubsub.subscribe("r") as sub:
        await pubsub.publish("r", "before")
        assert await next_item(sub) == "before"
        killed = await db.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE 'LISTEN%%'"
        )
        assert killed == 1
        assert await next_item(sub) is MISSED
        assert pubsub.reconnects == 1
        await pubsub.publish("r", "after")
        assert await next_item(sub) == "after"
    # --log-level debug shows the loss and the reconnect
    assert any(m.startswith("pubsub LISTEN connection lost, reconnecting in 0.05 s") for m in caplog.messages)
    assert "pubsub reconnected reconnects=1" in caplog.messages


async def test_subscribe_requires_running_listener(db: Database) -> None:
    pubsub = PubSub(db)
    with pytest.raises(RuntimeError, match="run"):
        async with pubsub.subscribe("x"):
            pass


async def test_subscription_breaks_when_pubsub_stops(db: Database) -> None:
    pubsub = PubSub(db)
    run_scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with run_scope:
            await pubsub.run(task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(run)
        async with pubsub.subscribe("s") as sub, pubsub.subscribe("s") as sentinel:
            await pubsub.publish("s", "queued")
            # Fan-out is synchronous: once the sentinel has it, so does sub.
            assert await next_item(sentinel) == "queued"
            run_scope.cancel()
            assert await next_item(sub) == "queued"
            with pytest.raises(trio.BrokenResourceError), trio.fail_after(WAIT):
                await sub.__anext__()
    with pytest.raises(trio.BrokenResourceError):
        await sub.__anext__()


class ListenRoundGate:
    """Pauses the listener's next LISTEN/UNLISTEN round that matches, *before* its SQL is sent.

    A pass-through around `Database._run_on` (the real statements still run on the real server);
    it only lets a test hold the listener inside the window between deciding a round and applying
    it, which is where a concurrent subscribe used to be lost.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, listen: str = "", unlisten: str = "") -> None:
        self.paused = trio.Event()
        self.release = trio.Event()
        self.applied = trio.Event()
        original = Database._run_on

        async def run_on(db: Database, conn: Any, fn: Any, *args: Any) -> Any:
            if fn is pubsub_module._listen and not self.paused.is_set():
                listening, unlistening = args
                if listen in listening or unlisten in unlistening:
                    self.paused.set()
                    await self.release.wait()
                    try:
                        return await original(db, conn, fn, *args)
                    finally:
                        self.applied.set()
            return await original(db, conn, fn, *args)

        monkeypatch.setattr(Database, "_run_on", run_on)


async def test_resubscribe_while_unlisten_in_flight(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = ListenRoundGate(monkeypatch, unlisten="chan")
    async with running(PubSub(db)) as pubsub:
        async with pubsub.subscribe("chan") as first:
            await pubsub.publish("chan", "a")
            assert await next_item(first) == "a"
        with trio.fail_after(WAIT):
            await gate.paused.wait()  # the listener has decided to UNLISTEN "chan" and is about to

        async def resubscribe() -> None:
            async with pubsub.subscribe("chan") as again:
                # The body may only start once LISTEN is active, and it must stay active: the
                # in-flight UNLISTEN (which this subscription raced) has to be undone.
                with trio.fail_after(WAIT):
                    await gate.applied.wait()
                await pubsub.publish("chan", "b")
                assert await next_item(again) == "b"
                assert again.pending() == 0

        async with trio.open_nursery() as nursery:
            nursery.start_soon(resubscribe)
            while pubsub.subscriber_count("chan") == 0:
                await trio.lowlevel.checkpoint()
            gate.release.set()


async def test_churn_during_listen_rounds_converges(db: Database) -> None:
    """Any interleaving of leave/re-enter against the listener's rounds ends LISTENing."""
    async with running(PubSub(db)) as pubsub:
        for i in range(30):
            async with pubsub.subscribe("churn") as sub:
                await pubsub.publish("churn", f"a{i}")
                assert await next_item(sub) == f"a{i}"
            for _ in range(i % 6):
                await trio.lowlevel.checkpoint()
            async with pubsub.subscribe("churn") as sub:
                await pubsub.publish("churn", f"b{i}")
                assert await next_item(sub) == f"b{i}"


async def terminate_listener(db: Database) -> None:
    killed = await db.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND query LIKE 'LISTEN%%'"
    )
    assert killed == 1


async def test_subscribe_during_reconnect_round(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """Subscribers racing the re-LISTEN after a reconnect start LISTENing; only those that were
    live across the loss get MISSED."""
    async with (
        running(PubSub(db, reconnect_delay=0.05)) as pubsub,
        pubsub.subscribe("r") as survivor,
    ):
        async with pubsub.subscribe("gone"):  # live across the loss, then leaves
            await terminate_listener(db)
            gate = ListenRoundGate(monkeypatch, listen="r")
            with trio.fail_after(WAIT):
                await gate.paused.wait()  # new connection, about to re-LISTEN "r" and "gone"

        async def late(channel: str) -> None:
            async with pubsub.subscribe(channel) as sub:
                await pubsub.publish(channel, "fresh")
                assert await next_item(sub) == "fresh"  # no spurious MISSED: it missed nothing

        async with trio.open_nursery() as nursery:
            nursery.start_soon(late, "r")
            nursery.start_soon(late, "gone")
            while pubsub.subscriber_count("gone") == 0 or pubsub.subscriber_count("r") < 2:
                await trio.lowlevel.checkpoint()
            gate.release.set()
        assert await next_item(survivor) is MISSED
        assert await next_item(survivor) == "fresh"
        assert pubsub.reconnects == 1
