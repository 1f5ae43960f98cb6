"""PushContextState (spec §7.19): the agent's snapshot of resolved workspace context for AI features.

The request is validated completely before anything is written (each violation names its field); then the
snapshot and its resources are stored in one repeatable-read transaction (agentd.store.context_state).
Replays and out-of-order pushes (not ``initial`` and ``version`` not above the stored one) answer
``accepted: false`` and change nothing. Bodies are stored as protojson with proto field names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import attrs
from google.protobuf import json_format

from agentd.clock import Now
from agentd.drpc.errors import RpcError
from agentd.drpc.registry import Handler
from agentd.proto import agent_pb2
from agentd.services.base import AGENT, ConnectionScope
from agentd.store import context_state as store

INT64_MAX = 2**63 - 1
MAX_AGGREGATE_HASH = 64
MAX_SNAPSHOT_ERROR = 4096
MAX_RESOURCES = 1000
MAX_SOURCE = 1024
MAX_SOURCE_PATH = 1024
MAX_ERROR = 4096
MAX_CONTENT_HASH = 64
MAX_BODY = 256 * 1024
MAX_TOTAL_BODY = 4 * 1024 * 1024

Status = agent_pb2.ContextResource.Status
STATUSES = {
    Status.OK: "ok",
    Status.OVERSIZE: "oversize",
    Status.UNREADABLE: "unreadable",
    Status.INVALID: "invalid",
    Status.EXCLUDED: "excluded",
}
#: Body oneof field → workspace_agent_context_body_kind.
BODY_KINDS = {
    "instruction_file": "instruction_file",
    "skill": "skill",
    "mcp_config": "mcp_config",
    "mcp_server": "mcp_server",
}


def _too_long(field: str, size: int, limit: int) -> RpcError:
    return RpcError(f"invalid {field}: {size} bytes exceeds maximum of {limit}")


def body_json(resource: agent_pb2.ContextResource, kind: str) -> str:
    """protojson of the body variant: proto field names, unpopulated fields omitted, compact."""
    body = getattr(resource, kind)
    as_dict = json_format.MessageToDict(body, preserving_proto_field_name=True)
    return json.dumps(as_dict, separators=(",", ":"), ensure_ascii=False)


def validate(request: agent_pb2.PushContextStateRequest) -> list[store.ContextResourceRow]:
    """All caps of spec §7.19; returns the rows to store. Raises RpcError naming the first bad field."""
    if request.version > INT64_MAX:
        raise RpcError(f"invalid version: {request.version} exceeds maximum of {INT64_MAX}")
    if len(request.aggregate_hash) > MAX_AGGREGATE_HASH:
        raise _too_long("aggregate_hash", len(request.aggregate_hash), MAX_AGGREGATE_HASH)
    snapshot_error = len(request.snapshot_error.encode())
    if snapshot_error > MAX_SNAPSHOT_ERROR:
        raise _too_long("snapshot_error", snapshot_error, MAX_SNAPSHOT_ERROR)
    if len(request.resources) > MAX_RESOURCES:
        raise RpcError(
            f"invalid resources: {len(request.resources)} resources exceeds maximum of {MAX_RESOURCES}"
        )
    rows: list[store.ContextResourceRow] = []
    seen: set[str] = set()
    total = 0
    for i, r in enumerate(request.resources):
        where = f"resources[{i}]"
        source = len(r.source.encode())
        if source == 0:
            raise RpcError(f"invalid {where}.source: must not be empty")
        if source > MAX_SOURCE:
            raise _too_long(f"{where}.source", source, MAX_SOURCE)
        if r.source in seen:
            raise RpcError(f"invalid {where}.source: duplicate source {r.source!r}")
        seen.add(r.source)
        source_path = len(r.source_path.encode())
        if source_path > MAX_SOURCE_PATH:
            raise _too_long(f"{where}.source_path", source_path, MAX_SOURCE_PATH)
        error = len(r.error.encode())
        if error > MAX_ERROR:
            raise _too_long(f"{where}.error", error, MAX_ERROR)
        if len(r.content_hash) > MAX_CONTENT_HASH:
            raise _too_long(f"{where}.content_hash", len(r.content_hash), MAX_CONTENT_HASH)
        if r.size_bytes > INT64_MAX:
            raise RpcError(f"invalid {where}.size_bytes: {r.size_bytes} exceeds maximum of {INT64_MAX}")
        kind = r.WhichOneof("body")
        if kind is None or kind not in BODY_KINDS:
            raise RpcError(f"invalid {where}.body: no body set")
        status = STATUSES.get(r.status)
        if status is None:
            raise RpcError(f"invalid {where}.status: status must be set (got {r.status})")
        body = body_json(r, kind)
        body_size = len(body.encode())
        if body_size > MAX_BODY:
            raise _too_long(f"{where}.body", body_size, MAX_BODY)
        total += body_size
        if total > MAX_TOTAL_BODY:
            raise RpcError(f"invalid resources: total body size exceeds maximum of {MAX_TOTAL_BODY} bytes")
        rows.append(
            store.ContextResourceRow(
                source=r.source,
                source_path=r.source_path,
                body_kind=BODY_KINDS[kind],
                body_json=body,
                content_hash=bytes(r.content_hash),
                size_bytes=r.size_bytes,
                status=status,
                error=r.error,
            )
        )
    return rows


@attrs.define(eq=False)
class ContextService:
    scope: ConnectionScope
    now: Now

    def handlers(self) -> Mapping[str, Handler]:
        return {AGENT + "PushContextState": self.push_context_state}

    async def push_context_state(
        self, request: agent_pb2.PushContextStateRequest
    ) -> agent_pb2.PushContextStateResponse:
        rows = validate(request)
        accepted = await store.apply_context_push(
            self.scope.db,
            store.ContextPush(
                agent_id=self.scope.ident.agent_id,
                version=request.version,
                aggregate_hash=bytes(request.aggregate_hash),
                snapshot_error=request.snapshot_error,
                initial=request.initial,
                resources=rows,
                received_at=self.now(),
            ),
        )
        return agent_pb2.PushContextStateResponse(accepted=accepted)


def build(scope: ConnectionScope) -> ContextService:
    return ContextService(scope=scope, now=scope.now)
