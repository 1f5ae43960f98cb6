"""BatchUpdateMetadata (spec §7.8): the agent's metadata results, handed to the metadata batcher.

Entries are processed in order: value and error are trimmed; the sum of key lengths may not pass
6144 bytes (processing stops at the entry that passes it, the accepted part is still applied and the
call fails with ``metadata keys of <n> bytes exceeded 6144 bytes``); a value over 2048 bytes is cut
to 2048 and its error becomes ``value of <n> bytes exceeded 2048 bytes``; an error over 2048 bytes is
replaced by ``error of <n> bytes exceeded 2048 bytes``. The agent's ``collected_at`` is ignored: every
entry gets the server's time. Only the authenticated agent's rows are touched — the agent id comes
from the connection, never from the request — and only rows that already exist (unknown keys are
ignored by the update).
"""

from __future__ import annotations

import logging
import uuid
from typing import Protocol

import attrs
import trio

from agentd.batchers.metadata import Publisher, write_and_notify
from agentd.clock import Now, utcnow
from agentd.drpc.errors import RpcError
from agentd.drpc.registry import Handler
from agentd.proto import agent_pb2
from agentd.services.base import AGENT, ConnectionScope
from agentd.store import Database
from agentd.store.metadata import MetadataUpdate, batch_update_metadata

__all__ = ["MAX_ALL_KEYS_LEN", "MAX_ERROR_LEN", "MAX_VALUE_LEN", "MetadataService", "build"]

log = logging.getLogger("agentd.services.metadata")

MAX_ALL_KEYS_LEN = 6144
MAX_VALUE_LEN = 2048
MAX_ERROR_LEN = MAX_VALUE_LEN


class UpdateSink(Protocol):
    """agentd.batchers.metadata.MetadataBatcher"""

    def add(self, update: MetadataUpdate) -> bool: ...


def _clean(text: str) -> str:
    # PostgreSQL text cannot hold NUL; one agent's NUL must not fail a batch shared with other agents.
    return text.replace("\x00", "").strip()


def _cut(text: str, limit: int) -> str:
    """The first ``limit`` bytes of ``text`` as UTF-8, without a split character at the end."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


@attrs.define(eq=False)
class MetadataService:
    agent_id: uuid.UUID
    batcher: UpdateSink | None
    db: Database
    publisher: Publisher | None
    now: Now = utcnow

    def handlers(self) -> dict[str, Handler]:
        return {AGENT + "BatchUpdateMetadata": self.batch_update_metadata}

    def accept(self, request: agent_pb2.BatchUpdateMetadataRequest) -> tuple[list[MetadataUpdate], int]:
        """The entries to apply and the key-byte total (> 6144 when processing stopped early)."""
        collected_at = self.now()
        for i, md in enumerate(request.metadata):
            if not md.HasField("result"):
                raise RpcError(f"invalid metadata[{i}].result: required (key {md.key!r})")
        accepted: list[MetadataUpdate] = []
        all_keys_len = 0
        for md in request.metadata:
            all_keys_len += len(md.key.encode("utf-8"))
            if all_keys_len > MAX_ALL_KEYS_LEN:
                break
            value = _clean(md.result.value)
            error = _clean(md.result.error)
            value_len = len(value.encode("utf-8"))
            error_len = len(error.encode("utf-8"))
            if value_len > MAX_VALUE_LEN:
                error = f"value of {value_len} bytes exceeded {MAX_VALUE_LEN} bytes"
                value = _cut(value, MAX_VALUE_LEN)
            if error_len > MAX_ERROR_LEN:
                error = f"error of {error_len} bytes exceeded {MAX_ERROR_LEN} bytes"
            if "\x00" in md.key:
                continue  # can never name a row (keys are varchar); still counted in the key budget
            accepted.append(MetadataUpdate(self.agent_id, md.key, value, error, collected_at))
        return accepted, all_keys_len

    async def batch_update_metadata(
        self, request: agent_pb2.BatchUpdateMetadataRequest
    ) -> agent_pb2.BatchUpdateMetadataResponse:
        accepted, all_keys_len = self.accept(request)
        if self.batcher is not None:
            for update in accepted:
                self.batcher.add(update)
            await trio.lowlevel.checkpoint()
        elif self.publisher is not None:
            # No batcher configured (tools, tests): write through at once, with the same NOTIFY.
            await write_and_notify(self.db, self.publisher, accepted)
        else:
            await batch_update_metadata(self.db, accepted)
        if all_keys_len > MAX_ALL_KEYS_LEN:
            raise RpcError(f"metadata keys of {all_keys_len} bytes exceeded {MAX_ALL_KEYS_LEN} bytes")
        return agent_pb2.BatchUpdateMetadataResponse()


def build(scope: ConnectionScope) -> MetadataService:
    events = scope.events
    return MetadataService(
        agent_id=scope.ident.agent_id,
        batcher=getattr(scope.components, "metadata_batcher", None),
        db=scope.db,
        publisher=getattr(events, "pubsub", None),
        now=scope.now,
    )
