"""The interface every tailnet coordinator offers the Tailnet service (spec §8.4).

Two implementations: ``trio_coordinator.Coordinator`` (in memory, one process) and
``pg_coordinator.PgCoordinator`` (state in PostgreSQL, shared by every replica on the database).
``coordinator = "memory" | "postgres"`` in the configuration picks one (``build_coordinator``).
"""

from __future__ import annotations

import uuid
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Protocol

import trio

from agentd.tailnet.coordinator import Auth, Node, Request, Response

if TYPE_CHECKING:
    from agentd.store import Database

COORDINATOR_KINDS = ("memory", "postgres")


class PeerConnection(Protocol):
    """One coordinate connection: requests in, responses out until the coordinator ends the queue."""

    @property
    def peer_id(self) -> uuid.UUID: ...

    @property
    def active(self) -> bool: ...

    async def send(self, request: Request) -> bool: ...

    def disconnect(self) -> None: ...

    def close(self, error: str = "") -> None: ...

    async def receive(self) -> Response: ...

    def __aiter__(self) -> PeerConnection: ...

    async def __anext__(self) -> Response: ...


class TailnetCoordinator(Protocol):
    """A process-wide coordinator: start ``run`` in the root nursery, then ``connect`` peers."""

    @property
    def running(self) -> bool: ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None: ...

    def connect(
        self, peer_id: uuid.UUID, name: str, auth: Auth
    ) -> AbstractAsyncContextManager[PeerConnection]: ...

    def node(self, peer_id: uuid.UUID) -> Node | None: ...


def build_coordinator(
    kind: str, db: Database | None, *, heartbeat_interval: float = 2.0
) -> TailnetCoordinator:
    """The coordinator ``kind`` names; "postgres" needs the daemon's database."""
    if kind == "memory":
        from agentd.tailnet.trio_coordinator import Coordinator

        return Coordinator()
    if kind == "postgres":
        if db is None:
            raise ValueError('coordinator "postgres" needs a database')
        from agentd.tailnet.pg_coordinator import PgCoordinator

        return PgCoordinator(db, heartbeat_interval=heartbeat_interval)
    raise ValueError(f"unknown coordinator {kind!r} (expected one of {', '.join(COORDINATOR_KINDS)})")
