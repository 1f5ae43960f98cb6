"""agentd.shutdown's parts on their own: the cleanup deadline that bounds shielded final writes, the
stop's deadlines, the backstop, and /healthz while draining (the whole stop: tests/test_shutdown.py)."""

from __future__ import annotations

import json
import logging

import pytest
import trio
import trio.testing

from agentd.daemon import Draining, build_router
from agentd.http import HttpApp
from agentd.shutdown import FINAL_WRITES_MIN, MARGIN, Backstop, CleanupDeadline, ShutdownPlan
from agentd.store import Database


async def test_a_shielded_write_ends_at_its_own_timeout_without_a_deadline(autojump_clock: object) -> None:
    cleanup = CleanupDeadline()
    start = trio.current_time()
    with cleanup.shield(3.0) as scope:
        await trio.sleep_forever()
    assert scope.cancelled_caught and trio.current_time() - start == pytest.approx(3.0)


async def test_the_deadline_shortens_open_and_later_writes_but_never_extends_them(
    autojump_clock: object,
) -> None:
    cleanup = CleanupDeadline()
    start = trio.current_time()
    ended: list[float] = []

    async def write() -> None:
        with cleanup.shield(15.0):
            await trio.sleep_forever()
        ended.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        await trio.sleep(1.0)
        cleanup.move_to(start + 2.0)  # an open write: ends at 2 s, not 15 s
        cleanup.move_to(start + 10.0)  # never later
    assert ended == [pytest.approx(2.0)]
    with cleanup.shield(15.0) as late:  # opened after the deadline: ends at once
        await trio.sleep_forever()
    assert late.cancelled_caught and trio.current_time() - start == pytest.approx(2.0)


async def test_expire_cuts_every_open_write_at_once(autojump_clock: object) -> None:
    """What a second signal does to the final writes, shielded as they are from cancellation."""
    cleanup = CleanupDeadline()

    async def writers() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(_shielded_forever, cleanup)
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()  # shielded: they go on ...

    async with trio.open_nursery() as outer:
        outer.start_soon(writers)
        await trio.sleep(1.0)
        start = trio.current_time()
        cleanup.expire()  # ... until the deadline expires
    assert trio.current_time() == start


async def _shielded_forever(cleanup: CleanupDeadline) -> None:
    with cleanup.shield(60.0):
        await trio.sleep_forever()


def test_the_plan_keeps_the_documented_bound() -> None:
    plan = ShutdownPlan(start=100.0, timeout=10.0)
    assert plan.drain_deadline == 110.0
    # quick drain: the final writes get the rest of shutdown_timeout
    assert plan.cleanup_deadline(drained_at=101.0) == 110.0
    # drain used it all: they still get FINAL_WRITES_MIN, within the margin
    assert plan.cleanup_deadline(drained_at=110.0) == 110.0 + FINAL_WRITES_MIN
    last = plan.cleanup_deadline(drained_at=110.0)
    assert plan.pool_deadline(last) <= plan.hard_deadline == 110.0 + MARGIN


async def test_the_backstop_reports_when_the_bound_passes_and_not_once_disarmed(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    reported: list[float] = []
    backstop = Backstop(exit=False, reports=[lambda: reported.append(trio.current_time())])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backstop.run)
        backstop.arm(trio.current_time() + 5.0)
        backstop.arm(trio.current_time() + 1.0)  # a second signal brings it forward
        await trio.sleep(2.0)
        assert reported == [pytest.approx(1.0)]
        assert "did not finish within its bound" in caplog.text
    disarmed = Backstop(exit=False, reports=[lambda: reported.append(-1.0)])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(disarmed.run)
        disarmed.arm(trio.current_time() + 1.0)
        disarmed.disarm()
        await trio.sleep(5.0)
        nursery.cancel_scope.cancel()
    assert -1.0 not in reported


async def test_healthz_says_draining_at_once_while_stopping(db: Database) -> None:
    draining = Draining()
    app = HttpApp(build_router(db, draining=draining))
    answers = []
    for _ in range(2):
        client, server = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(app.handle_connection, server)
            await client.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            raw = b""
            while chunk := await client.receive_some(65536):
                raw += chunk
        head, _, body = raw.partition(b"\r\n\r\n")
        answers.append((int(head.split(b" ")[1]), json.loads(body)["status"]))
        draining.active = True
    assert answers == [(200, "ok"), (503, "draining")]
