"""Group commit without a timer: callers that arrive while a statement runs share the next one.

A lone call takes the lock and writes its own item at once (no waiting for a batch to fill); calls
arriving meanwhile queue up, and whoever gets the lock next writes every queued item in one
statement. Each caller returns only once its own item is written (or the statement failed), with
its own result. Used for the connection monitor's start writes and for activity bumps.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import attrs
import trio

__all__ = ["GroupCommit"]

T = TypeVar("T")
R = TypeVar("R")


@attrs.define(eq=False)
class _Waiting(Generic[T, R]):
    item: T
    done: trio.Event = attrs.field(factory=trio.Event)
    result: R | None = None
    error: BaseException | None = None


@attrs.define(eq=False)
class GroupCommit(Generic[T, R]):
    """``write(items)`` writes a batch in one statement and returns one result per item, in order;
    an exception it raises is every caller's. ``write`` decides its own shielding and bounds."""

    write: Callable[[list[T]], Awaitable[Sequence[R]]]
    #: statements written, and the items they carried
    statements: int = attrs.field(default=0, init=False)
    items: int = attrs.field(default=0, init=False)
    _queue: list[_Waiting[T, R]] = attrs.field(factory=list, init=False)
    _lock: trio.Lock = attrs.field(factory=trio.Lock, init=False)

    async def submit(self, item: T) -> R | None:
        """Write ``item`` with whoever else is waiting; its result (None if the statement was cut
        short without an error, e.g. by its caller's deadline)."""
        waiting: _Waiting[T, R] = _Waiting(item)
        self._queue.append(waiting)
        try:
            async with self._lock:  # FIFO: one statement at a time
                if not waiting.done.is_set():
                    batch, self._queue = self._queue, []
                    await self._flush(batch)
        except trio.Cancelled:
            if not waiting.done.is_set() and waiting in self._queue:
                self._queue.remove(waiting)  # cancelled before anyone took it: not written
            raise
        if waiting.error is not None:
            raise waiting.error
        return waiting.result

    async def _flush(self, batch: list[_Waiting[T, R]]) -> None:
        try:
            results = await self.write([w.item for w in batch])
            for w, result in zip(batch, results, strict=True):
                w.result = result
        except Exception as exc:
            for w in batch:
                w.error = exc
        finally:
            self.statements += 1
            self.items += len(batch)
            for w in batch:
                w.done.set()
