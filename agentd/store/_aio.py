"""Bind psycopg to trio-asyncio's loop, and give it a socket wait that suits that loop.

trio-asyncio replaces ``asyncio.get_running_loop`` when it is imported; ``psycopg.waiting`` copies
that function into its own namespace when *it* is imported. If psycopg was imported first, its copy
would never see the trio-asyncio loop ("no running event loop"), so rebind it here.

psycopg's ``wait_async`` arms a ``call_later`` timer for every socket wait (a 0.1 s interval that
lets plain asyncio notice signals). On trio-asyncio each timer is one more handle through the loop's
queue and timer heap, on every query; trio already delivers signals, so `wait_async` here waits on
the socket alone (a wait with a timeout, psycopg's connect/cancel paths, keeps psycopg's own).
"""

from __future__ import annotations

import asyncio
import select
from typing import Any

import psycopg.waiting
import trio_asyncio  # type: ignore[import-untyped]  # noqa: F401  (import patches asyncio)
from psycopg import errors

__all__ = ["wait_async"]

if getattr(psycopg.waiting, "get_running_loop", None) is not asyncio.get_running_loop:
    setattr(psycopg.waiting, "get_running_loop", asyncio.get_running_loop)  # noqa: B010

_psycopg_wait_async = psycopg.waiting.wait_async
_WAIT_R = psycopg.waiting.WAIT_R
_WAIT_W = psycopg.waiting.WAIT_W
_READY_R = psycopg.waiting.READY_R
_READY_W = psycopg.waiting.READY_W


async def wait_async(
    gen: Any,
    fileno: int,
    interval: float = 0.0,
    timeout: float | None = None,  # noqa: ASYNC109 - psycopg's signature
) -> Any:
    """Drive a psycopg generator to completion: a zero-timeout poll when it wants to write (the
    socket nearly always is writable), else one reader/writer registration per wait, no timer.
    Cancellation raises CancelledError out of the wait, as psycopg's own waiter does."""
    if timeout is not None:
        return await _psycopg_wait_async(gen, fileno, interval, timeout)
    loop = asyncio.get_running_loop()
    try:
        state = next(gen)
        while True:
            if state & _WAIT_W:
                _, writable, _ = select.select((), (fileno,), (), 0)
                if writable:
                    state = gen.send(_READY_W)
                    continue
            fut: asyncio.Future[Any] = loop.create_future()

            def wake(ready: Any, fut: asyncio.Future[Any] = fut) -> None:
                if not fut.done():
                    fut.set_result(ready)

            reading = state & _WAIT_R
            writing = state & _WAIT_W
            if reading:
                loop.add_reader(fileno, wake, _READY_R)
            if writing:
                loop.add_writer(fileno, wake, _READY_W)
            try:
                ready = await fut
            finally:
                if reading:
                    loop.remove_reader(fileno)
                if writing:
                    loop.remove_writer(fileno)
            state = gen.send(ready)
    except StopIteration as stop:
        return stop.value
    except OSError as exc:
        raise errors.OperationalError("connection socket closed") from exc


psycopg.waiting.wait_async = wait_async
