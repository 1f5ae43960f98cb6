"""The per-connection APIs of spec §7 and §8, one module each, composed by agentd.connection.

Contract for a service module ``agentd/services/<api>.py``:

* ``def build(scope: ConnectionScope) -> Service`` — called once per authenticated agent, before any
  RPC is served. Cheap and synchronous: no I/O here.
* the service object has ``def handlers(self) -> Mapping[str, Handler]`` (full RPC path → bound async
  method following the agentd.drpc handler contract);
* optionally ``async def load(self) -> None`` — per-connection state read before the first RPC is
  served (e.g. resource monitors, spec §4.1 step 4); an exception refuses the connection. What many
  connections need is better read by the connect query itself (``agentd.store.sessions.
  authenticate_connection``) and handed over in ``scope.preload``: one round trip per connect;
* optionally ``async def run(self, *, task_status=trio.TASK_STATUS_IGNORED)`` — a long-lived task of
  that API (started before the first RPC, cancelled when the session ends).

Every call of an API runs inside the nursery of the connection's APIs (agentd.connection.run_apis);
RPCs of the Agent and Tailnet services that no composed module handles answer code 12
(Unimplemented).
"""

from __future__ import annotations

#: Service modules in DESIGN's task-tree order; together they handle every Agent RPC of API 2.10 and
#: the Tailnet RPCs an agent uses (RefreshResumeToken / WorkspaceUpdates answer code 12 by design).
SERVICE_MODULES: tuple[str, ...] = (
    "manifest",
    "stats",
    "lifecycle",
    "apps",
    "metadata",
    "logs",
    "scripts",
    "resources",
    "connections",
    "subagents",
    "boundary",
    "banners",
    "context",
    "tailnet",
)
