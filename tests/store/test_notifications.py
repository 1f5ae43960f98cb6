"""enqueue_notification: stored payload and per-day de-duplication."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from agentd.store import Database
from agentd.store.notifications import TEMPLATE_WORKSPACE_OUT_OF_MEMORY, enqueue_notification
from agentd.store.testing import seed_workspace


async def test_enqueue_and_dedupe(db: Database) -> None:
    ws = await seed_workspace(db)
    now = datetime(2026, 7, 24, 12, 0, tzinfo=UTC)
    args = {
        "template_id": TEMPLATE_WORKSPACE_OUT_OF_MEMORY,
        "user_id": ws.owner_id,
        "labels": {"workspace": "ws", "threshold": "90%"},
        "data": {"timestamp": "2026-07-24T12:00:00Z"},
        "created_by": "workspace-monitor-memory",
        "targets": [ws.workspace_id, ws.owner_id, ws.organization_id],
    }
    first = await enqueue_notification(db, **args, now=now)
    assert first is not None
    row = await db.fetchone("SELECT * FROM notification_messages WHERE id = %s", [first])
    assert row is not None
    assert row["status"] == "pending" and row["created_by"] == "workspace-monitor-memory"
    assert row["payload"]["labels"] == {"workspace": "ws", "threshold": "90%"}
    assert row["payload"]["data"] == {"timestamp": "2026-07-24T12:00:00Z"}
    assert row["targets"] == [ws.workspace_id, ws.owner_id, ws.organization_id]
    # Same content the same day: dropped. Next day, or different data: enqueued.
    assert await enqueue_notification(db, **args, now=now + timedelta(hours=1)) is None
    assert await enqueue_notification(db, **args, now=now + timedelta(days=1)) is not None
    assert await enqueue_notification(db, **{**args, "data": {"timestamp": "later"}}, now=now) is not None
    assert await db.fetchval("SELECT count(*) FROM notification_messages") == 3
