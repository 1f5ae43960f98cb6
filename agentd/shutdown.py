"""The shutdown budget of `agentd serve` (issue 11 item 3): how long each stage of a graceful stop may
take, and the deadline that bounds every shielded final write.

A graceful stop (first SIGTERM/SIGINT at time t0, ``shutdown_timeout`` = T) runs in stages:

1. stop accepting (listeners closed), STOPPING=1, ``/healthz`` answers 503 "draining";
2. every agent session is sent a yamux GoAway (normal): the agent opens no new stream, so no new RPC
   starts, while the calls already in flight go on;
3. wait until no session has a call in flight (long-lived streams — tailnet Coordinate,
   StreamDERPMaps, WorkspaceUpdates — do not count: they never end by themselves), at most until
   t0 + T;
4. close every transport (calls still running are cancelled), then each session's disconnect is
   written; then the process-wide batchers write what they hold (acknowledged agent stats are retried
   until the deadline; what is still unwritten then is counted, logged and exported). These final
   writes end by the *cleanup deadline*: the rest of T, but at least ``FINAL_WRITES_MIN`` after the
   drain;
5. close the database pool, at most ``POOL_CLOSE_TIMEOUT`` more;
6. exit (an embedded PostgreSQL is stopped after that, outside the bound).

So agentd exits within T + ``MARGIN`` seconds of the first signal. A second signal cancels
whatever still runs and expires the cleanup deadline at once. If something that cannot be cancelled
(a driver's own shielded cleanup) still holds the process ``FORCE_GRACE`` after the second signal or
at t0 + T + ``MARGIN``, the ``agentd serve`` process logs it and exits without waiting
(:class:`Backstop`): a supervisor's SIGKILL would end it anyway, only later and without a word.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import attrs
import trio

__all__ = [
    "FINAL_WRITES_MIN",
    "FORCE_GRACE",
    "MARGIN",
    "POOL_CLOSE_TIMEOUT",
    "Backstop",
    "CleanupDeadline",
    "ShutdownPlan",
]

log = logging.getLogger("agentd.shutdown")

#: The final writes (disconnects, batcher flushes) get at least this long after the drain ends.
FINAL_WRITES_MIN = 3.0
#: Closing the database pool after the final writes.
POOL_CLOSE_TIMEOUT = 1.5
#: What agentd may take beyond ``shutdown_timeout`` after the first signal (documented bound).
MARGIN = 5.0
#: After a second signal: how long the cancelled stop may still take before the process exits anyway.
FORCE_GRACE = 1.0
#: Exit status when the backstop ends the process.
BACKSTOP_EXIT_STATUS = 70  # EX_SOFTWARE


@attrs.define(eq=False)
class CleanupDeadline:
    """When the shielded final writes of a stopping process must end.

    Components write what they hold in shielded scopes when they are cancelled (a cancelled task
    cannot do I/O otherwise). Opened through :meth:`shield`, such a scope ends at its own timeout or
    at this deadline, whichever comes first — also when the deadline moves earlier while the scope
    is open (:meth:`move_to`; :meth:`expire` for a second signal). Until a shutdown sets it, the
    deadline is infinitely far: only each scope's own timeout applies.
    """

    at: float = math.inf
    _scopes: set[trio.CancelScope] = attrs.field(factory=set, init=False)

    @contextmanager
    def shield(self, timeout: float) -> Iterator[trio.CancelScope]:
        """A shielded cancel scope ending after ``timeout`` seconds or at the deadline."""
        deadline = min(trio.current_time() + timeout, self.at)
        with trio.CancelScope(shield=True, deadline=deadline) as scope:
            self._scopes.add(scope)
            try:
                yield scope
            finally:
                self._scopes.discard(scope)

    def move_to(self, at: float) -> None:
        """Bring the deadline forward to ``at`` (never later), for open scopes too."""
        if at >= self.at:
            return
        self.at = at
        for scope in self._scopes:
            scope.deadline = min(scope.deadline, at)

    def expire(self) -> None:
        """End every open shielded write now, and every later one at once."""
        self.move_to(-math.inf)

    @property
    def remaining(self) -> float:
        return self.at - trio.current_time()


@attrs.define
class ShutdownPlan:
    """The deadlines of one graceful stop that began at ``start`` (trio time)."""

    start: float
    timeout: float

    @property
    def drain_deadline(self) -> float:
        """In-flight calls may run until here."""
        return self.start + self.timeout

    def cleanup_deadline(self, drained_at: float) -> float:
        """The final writes end here: the rest of the timeout, at least FINAL_WRITES_MIN."""
        return max(self.start + self.timeout, drained_at + FINAL_WRITES_MIN)

    def pool_deadline(self, cleaned_at: float) -> float:
        return min(cleaned_at + POOL_CLOSE_TIMEOUT, self.hard_deadline)

    @property
    def hard_deadline(self) -> float:
        return self.start + self.timeout + MARGIN


@attrs.define(eq=False)
class Backstop:
    """The last resort behind the bound: ``run`` sleeps until ``at`` and then ends the process.

    Only for a process of its own (``agentd serve``); ``exit=False`` (tests that run a daemon in
    the test process) only logs. ``disarm`` once the bounded part of the stop is over.
    """

    exit: bool = False
    at: float = math.inf
    armed: bool = False
    #: called when it fires, before the exit: each logs what the process is leaving unwritten
    reports: list[Callable[[], object]] = attrs.field(factory=list)
    _wake: trio.Event = attrs.field(factory=trio.Event, init=False)

    def arm(self, at: float) -> None:
        """Fire at ``at`` (or earlier, if already armed for earlier)."""
        self.at = min(self.at, at) if self.armed else at
        self.armed = True
        self._wake.set()

    def disarm(self) -> None:
        self.armed = False
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake = trio.Event()
            if not self.armed:
                await self._wake.wait()
                continue
            with trio.move_on_at(self.at):
                await self._wake.wait()
                continue
            if self.armed:
                self._fire()
                return

    def _fire(self) -> None:
        log.error(
            "shutdown did not finish within its bound (something that cannot be cancelled is still "
            "running, e.g. a database driver's cleanup); exiting now"
        )
        for report in self.reports:
            try:
                report()
            except Exception:
                log.exception("shutdown report failed")
        if not self.exit:
            return
        for handler in logging.getLogger().handlers:
            try:
                handler.flush()
            except Exception:  # exiting anyway
                pass
        sys.stderr.flush()
        os._exit(BACKSTOP_EXIT_STATUS)
