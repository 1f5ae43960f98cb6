"""Enqueue user notifications (resource alerts spec §7.12, task status §7.18, enqueuer §9.6).

Coder's enqueuer de-duplicates identical content per day, which is why callers put a timestamp
into ``data`` when every alert must go out. Here the same rule is a unique index on
``notification_messages.dedupe_hash`` = sha256(template, user, method, payload, targets, UTC day).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from agentd.store.db import Database, Transaction

__all__ = [
    "TEMPLATE_WORKSPACE_OUT_OF_DISK",
    "TEMPLATE_WORKSPACE_OUT_OF_MEMORY",
    "enqueue_notification",
]

TEMPLATE_WORKSPACE_OUT_OF_MEMORY = uuid.UUID("a9d027b4-ac49-4fb1-9f6d-45af15f64e7a")
TEMPLATE_WORKSPACE_OUT_OF_DISK = uuid.UUID("f047f6a3-5713-40f7-85aa-0394cce9fa3a")


def _dedupe_hash(
    template_id: uuid.UUID,
    user_id: uuid.UUID,
    method: str,
    payload: str,
    targets: Sequence[uuid.UUID],
    day: str,
) -> str:
    digest = hashlib.sha256()
    for part in (str(template_id), str(user_id), method, payload, ",".join(str(t) for t in targets), day):
        digest.update(part.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


async def enqueue_notification(
    db: Database | Transaction,
    *,
    template_id: uuid.UUID,
    user_id: uuid.UUID,
    labels: Mapping[str, str],
    data: Mapping[str, Any],
    created_by: str,
    targets: Sequence[uuid.UUID] = (),
    method: str = "smtp",
    now: datetime | None = None,
) -> uuid.UUID | None:
    """Insert a pending notification; return its id, or None when identical content was already
    enqueued today (UTC)."""
    when = now or datetime.now(UTC)
    payload = json.dumps(
        {
            "notification_template_id": str(template_id),
            "user_id": str(user_id),
            "labels": dict(labels),
            "data": dict(data),
        },
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    message_id = uuid.uuid4()
    dedupe = _dedupe_hash(
        template_id, user_id, method, payload, targets, when.astimezone(UTC).date().isoformat()
    )
    inserted = await db.fetchval(
        "INSERT INTO notification_messages (id, notification_template_id, user_id, method, created_by,"
        " payload, targets, created_at, dedupe_hash)"
        " VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s)"
        " ON CONFLICT (dedupe_hash) DO NOTHING RETURNING id",
        [message_id, template_id, user_id, method, created_by, payload, list(targets), when, dedupe],
    )
    return None if inserted is None else message_id
