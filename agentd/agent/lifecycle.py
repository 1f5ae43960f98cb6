"""Lifecycle states the agent has entered and how many of them the server has acknowledged.

The state list lives for the whole agent process; each connection's reporter sends the unsent tail
in order (Coder's ``reportLifecycle``), so states entered while disconnected are delivered after
the redial and a state whose RPC failed is sent again.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import TypeAlias

import attrs
import trio

from agentd.proto import agent_pb2

__all__ = ["TERMINAL_STARTUP", "Lifecycle", "LifecycleState", "state_name"]

LifecycleState: TypeAlias = agent_pb2.Lifecycle.State
S = agent_pb2.Lifecycle

#: The agent only ever moves forward through this order (spec §7.5).
ORDER: tuple[LifecycleState, ...] = (
    S.CREATED,
    S.STARTING,
    S.START_TIMEOUT,
    S.START_ERROR,
    S.READY,
    S.SHUTTING_DOWN,
    S.SHUTDOWN_TIMEOUT,
    S.SHUTDOWN_ERROR,
    S.OFF,
)
TERMINAL_STARTUP = frozenset({S.READY, S.START_ERROR, S.START_TIMEOUT})


def state_name(state: LifecycleState) -> str:
    """``READY`` → ``ready`` (the database's spelling)."""
    return S.State.Name(state).lower()


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@attrs.define(eq=False)
class Lifecycle:
    """Entered states (with their times) and the count the server acknowledged."""

    now: Callable[[], dt.datetime] = _utcnow
    states: list[tuple[LifecycleState, dt.datetime]] = attrs.field(factory=list, init=False)
    reported: int = attrs.field(default=0, init=False)
    _changed: trio.Event = attrs.field(factory=trio.Event, init=False)

    @property
    def current(self) -> LifecycleState | None:
        return self.states[-1][0] if self.states else None

    def enter(self, state: LifecycleState) -> bool:
        """Move to ``state`` if it is ahead of the current one; False (ignored) otherwise."""
        current = self.current
        if current is not None and ORDER.index(state) <= ORDER.index(current):
            return False
        self.states.append((state, self.now()))
        self._wake()
        return True

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def pending(self) -> list[tuple[LifecycleState, dt.datetime]]:
        return self.states[self.reported :]

    def acknowledge(self) -> None:
        """The oldest unsent state reached the server."""
        self.reported += 1
        self._wake()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def was_reported(self, states: frozenset[LifecycleState]) -> LifecycleState | None:
        """The first acknowledged state among ``states``, if any."""
        for state, _ in self.states[: self.reported]:
            if state in states:
                return state
        return None

    async def wait_reported(self, states: frozenset[LifecycleState]) -> LifecycleState:
        """Until one of ``states`` has been acknowledged by the server; returns it."""
        while (found := self.was_reported(states)) is None:
            await self.wait_changed()
        return found

    @staticmethod
    def request(state: LifecycleState, changed_at: dt.datetime) -> agent_pb2.UpdateLifecycleRequest:
        request = agent_pb2.UpdateLifecycleRequest()
        request.lifecycle.state = state
        request.lifecycle.changed_at.FromDatetime(changed_at)
        return request
