"""PubSub over LISTEN/NOTIFY: two replicas sharing a database, limits, overflow, reconnect."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from agentd.store import Database, open_database
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


async def test_reconnect_after_backend_terminated(db: Database) -> None:
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
