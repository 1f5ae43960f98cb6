"""``agentd agents``: what an operator runs first when something is off.

Lists every live agent (`agentd.store.agent_list`) with its workspace, owner, agent and API
version, lifecycle state, connection status, the replica holding its session, the tailnet
coordinator of its Coordinate stream and when it was last seen. ``--json`` prints the same as a
JSON array. ``--watch`` prints the list, then one line per change as it happens: it LISTENs on the
workspace channel of every owner it has seen (the events agentd publishes for lifecycle,
connection, app health …, from any replica) and re-reads the list on each event, and at least every
``refresh_interval`` seconds (a silent agent turns ``disconnected`` without any event; new owners
are picked up then). With ``--json`` each change is one JSON object per line.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

import attrs
import trio

from agentd.channels import workspace_channel
from agentd.config import Config, UserError
from agentd.store import Database, PubSub
from agentd.store.agent_list import AgentListing, AgentSummary, list_agents

__all__ = [
    "WATCHED_FIELDS",
    "Change",
    "diff_agents",
    "format_change",
    "render_table",
    "run_agents_command",
    "watch_agents",
]

#: What a change line reports. ``last_seen`` moves every monitor tick (15 s) for every connected
#: agent, so it is shown but does not make a line of its own.
WATCHED_FIELDS = ("status", "lifecycle", "version", "api_version", "replica_id", "coordinator_id")

DEFAULT_REFRESH_INTERVAL = 10.0

Write = Callable[[str], None]


def _age(now: datetime, then: datetime | None) -> str:
    if then is None:
        return "never"
    seconds = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _short(value: uuid.UUID | None) -> str:
    return "-" if value is None else str(value)[:8]


_COLUMNS = (
    "AGENT",
    "WORKSPACE",
    "OWNER",
    "STATUS",
    "LIFECYCLE",
    "VERSION",
    "API",
    "REPLICA",
    "COORD",
    "LAST SEEN",
)


def _cells(agent: AgentSummary, now: datetime) -> tuple[str, ...]:
    return (
        agent.name,
        agent.workspace_name,
        agent.owner,
        agent.status,
        agent.lifecycle,
        agent.version or "-",
        agent.api_version or "-",
        _short(agent.replica_id),
        _short(agent.coordinator_id),
        _age(now, agent.last_connected_at),
    )


def render_table(listing: AgentListing) -> str:
    """The list as aligned columns (one header line; ``no agents`` when there are none)."""
    if not listing.agents:
        return "no agents\n"
    rows = [_COLUMNS, *(_cells(a, listing.now) for a in listing.agents)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return "".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n" for row in rows
    )


@attrs.frozen
class Change:
    """``added`` / ``changed`` / ``removed``; ``fields``: (name, before, after) of each watched field."""

    kind: str
    agent: AgentSummary
    fields: tuple[tuple[str, object, object], ...] = ()


def diff_agents(
    before: Mapping[uuid.UUID, AgentSummary], after: Mapping[uuid.UUID, AgentSummary]
) -> list[Change]:
    """The changes from ``before`` to ``after`` (both by agent id), in ``after``'s order, removals last."""
    changes: list[Change] = []
    for agent_id, agent in after.items():
        old = before.get(agent_id)
        if old is None:
            changes.append(Change("added", agent))
            continue
        fields = tuple(
            (name, getattr(old, name), getattr(agent, name))
            for name in WATCHED_FIELDS
            if getattr(old, name) != getattr(agent, name)
        )
        if fields:
            changes.append(Change("changed", agent, fields))
    changes.extend(Change("removed", agent) for agent_id, agent in before.items() if agent_id not in after)
    return changes


def _show(value: object) -> str:
    if isinstance(value, uuid.UUID):
        return _short(value)
    return str(value) if value not in (None, "") else "-"


def _plain(value: object) -> object:
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def format_change(change: Change, *, now: datetime, json_output: bool) -> str:
    """One line (no newline) describing ``change``."""
    agent = change.agent
    if json_output:
        body: dict[str, object] = {"event": change.kind, "at": now.isoformat(), "agent": agent.to_json()}
        if change.fields:
            body["changes"] = {name: [_plain(old), _plain(new)] for name, old, new in change.fields}
        return json.dumps(body, separators=(",", ":"))
    where = f"{agent.owner}/{agent.workspace_name}.{agent.name}"
    stamp = now.strftime("%H:%M:%S")
    if change.kind == "changed":
        what = ", ".join(f"{name} {_show(old)} -> {_show(new)}" for name, old, new in change.fields)
        return f"{stamp} changed {where}: {what}"
    return f"{stamp} {change.kind} {where} ({agent.status}, {agent.lifecycle})"


def _by_id(agents: Sequence[AgentSummary]) -> dict[uuid.UUID, AgentSummary]:
    return {a.id: a for a in agents}


async def _forward_events(
    pubsub: PubSub, channel: str, dirty: trio.MemorySendChannel[None], *, task_status: trio.TaskStatus[None]
) -> None:
    async with pubsub.subscribe(channel) as sub:
        task_status.started()
        async for _ in sub:  # a payload or MISSED: either way, read the list again
            try:
                dirty.send_nowait(None)
            except trio.WouldBlock:
                pass  # a re-read is already due


async def watch_agents(
    db: Database,
    pubsub: PubSub,
    write: Write,
    *,
    json_output: bool = False,
    refresh_interval: float = DEFAULT_REFRESH_INTERVAL,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Print the list, then every change, until cancelled. ``started`` once the list is printed and
    the owners' channels are listened to (a change after that is reported)."""
    dirty_send, dirty_receive = trio.open_memory_channel[None](1)
    listened: set[uuid.UUID] = set()
    async with trio.open_nursery() as nursery:
        listing = await list_agents(db)
        while True:
            # LISTEN on new owners' channels before trusting the list: re-read after subscribing, so
            # an event between the read and the LISTEN cannot be lost.
            new_owners = {a.owner_id for a in listing.agents} - listened
            if not new_owners:
                break
            for owner in sorted(new_owners):
                await nursery.start(_forward_events, pubsub, workspace_channel(owner), dirty_send)
                listened.add(owner)
            listing = await list_agents(db)
        if json_output:
            write(
                json.dumps(
                    {
                        "event": "list",
                        "at": listing.now.isoformat(),
                        "agents": [a.to_json() for a in listing.agents],
                    }
                )
            )
        else:
            write(render_table(listing).rstrip("\n"))
        known = _by_id(listing.agents)
        task_status.started()
        while True:
            with trio.move_on_after(refresh_interval):
                await dirty_receive.receive()
            listing = await list_agents(db)
            for owner in sorted({a.owner_id for a in listing.agents} - listened):
                await nursery.start(_forward_events, pubsub, workspace_channel(owner), dirty_send)
                listened.add(owner)
            current = _by_id(listing.agents)
            for change in diff_agents(known, current):
                write(format_change(change, now=listing.now, json_output=json_output))
            known = current


async def run_agents_command(config: Config, *, json_output: bool, watch: bool, write: Write) -> int:
    """``agentd agents``: the database of ``config`` (embedded unless postgres_url), read only."""
    from agentd.daemon import open_store
    from agentd.store import asyncio_loop
    from agentd.store.migrate import CURRENT_VERSION, schema_version

    async with asyncio_loop(), open_store(config, migrate=False) as db:
        version = await schema_version(db)
        if version is None:
            raise UserError(
                "agents: the database has no agentd schema yet (run `agentd migrate` or `agentd serve`)"
            )
        if version < CURRENT_VERSION:
            raise UserError(
                f"agents: the database schema is at version {version}, this agentd reads {CURRENT_VERSION}"
                " (run `agentd migrate`)"
            )
        if not watch:
            listing = await list_agents(db)
            if json_output:
                write(json.dumps([a.to_json() for a in listing.agents], indent=2))
            else:
                write(render_table(listing).rstrip("\n"))
            return 0
        pubsub = PubSub(db)
        async with trio.open_nursery() as nursery:
            await nursery.start(pubsub.run)
            await watch_agents(db, pubsub, write, json_output=json_output)
    return 0
