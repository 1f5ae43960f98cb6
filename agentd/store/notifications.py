"""Enqueued user notifications (spec §9.6): rows an external sender drains from notification_messages."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from agentd.store.db import Database, Transaction

__all__ = ["Notification", "NotificationWorkspace", "enqueue_notification", "notification_workspace"]

Queryable = Database | Transaction

#: Version tag of the payload layout (Coder's MessagePayload "_version").
PAYLOAD_VERSION = "1.2"


@attrs.frozen
class Notification:
    """What an enqueuer hands over: template, recipient, labels, data, who created it, targets."""

    template_id: uuid.UUID
    user_id: uuid.UUID
    labels: Mapping[str, str]
    data: Mapping[str, Any]
    created_by: str
    targets: Sequence[uuid.UUID] = ()
    method: str = "smtp"

    def payload(self) -> dict[str, Any]:
        return {
            "_version": PAYLOAD_VERSION,
            "notification_template_id": str(self.template_id),
            "user_id": str(self.user_id),
            "labels": dict(self.labels),
            "data": dict(self.data),
            "targets": [str(t) for t in self.targets],
        }

    def dedupe_hash(self, day: dt.date) -> str:
        """Identical content for the same user on the same day collapses into one message (§9.6)."""
        body = json.dumps(
            [str(self.template_id), str(self.user_id), self.method, self.payload(), day.isoformat()],
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(body.encode()).hexdigest()


@attrs.frozen
class NotificationWorkspace:
    """The workspace fields notifications name and target (loaded fresh, spec §7.12)."""

    id: uuid.UUID
    name: str
    owner_id: uuid.UUID
    organization_id: uuid.UUID


async def notification_workspace(db: Queryable, workspace_id: uuid.UUID) -> NotificationWorkspace | None:
    row = await db.fetchone(
        "SELECT id, name, owner_id, organization_id FROM workspaces WHERE id = %s", [workspace_id]
    )
    if row is None:
        return None
    return NotificationWorkspace(
        id=row["id"], name=row["name"], owner_id=row["owner_id"], organization_id=row["organization_id"]
    )


async def enqueue_notification(db: Queryable, note: Notification, *, now: dt.datetime) -> uuid.UUID | None:
    """Insert one pending message; returns its id, or None when today's identical message exists."""
    msg_id = uuid.uuid4()
    inserted = await db.fetchval(
        "INSERT INTO notification_messages"
        " (id, notification_template_id, user_id, method, created_by, payload, targets, created_at,"
        "  dedupe_hash)"
        " VALUES (%s, %s, %s, %s::notification_method, %s, %s::jsonb, %s::uuid[], %s, %s)"
        " ON CONFLICT (dedupe_hash) DO NOTHING RETURNING id",
        [
            msg_id,
            note.template_id,
            note.user_id,
            note.method,
            note.created_by,
            json.dumps(note.payload(), separators=(",", ":")),
            list(note.targets),
            now,
            note.dedupe_hash(now.astimezone(dt.UTC).date()),
        ],
    )
    return None if inserted is None else msg_id
