"""One agent cannot grow the server's memory without bound (issue 11 item 1), while another agent's
calls keep succeeding: a cap on live streams per session (10,000 paced SYNs), one budget of buffered
request bytes per session (25 streams each holding a nearly complete 4 MiB packet), and a deadline for
a stream's first complete packet (streams that never send).

What is bounded, per session: live peer-opened streams <= MuxConfig.max_inbound_streams (256); bytes
held for incomplete DRPC packets <= ServerLimits.request_buffer_budget (16 MiB) — the mux receive
buffers are drained into those packets by each stream's reader as data arrives, so they add at most
one window (256 KiB) per live stream on top, transiently.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from agentd.drpc.server import ServerLimits
from agentd.drpc.wire import MAX_PACKET_SIZE, Kind, append_packet, append_varint
from agentd.mux import MuxConfig
from agentd.proto import agent_pb2
from agentd.store import Database
from agentd.store.testing import seed_workspace
from agentd.testing import TestAgent, serve_agent

BANNERS = "/coder.agent.v2.Agent/GetAnnouncementBanners"
SERVICES = ("banners",)


async def _two_agents(db: Database, nursery: trio.Nursery) -> tuple[TestAgent, TestAgent]:
    ws = await seed_workspace(db, agents=("good", "bad"))
    start: Callable[..., Awaitable[TestAgent]] = nursery.start
    good = await start(functools.partial(serve_agent, db, ws.agent("good").auth_token, services=SERVICES))
    bad = await start(functools.partial(serve_agent, db, ws.agent("bad").auth_token, services=SERVICES))
    return good, bad


async def _good_call(agent: TestAgent) -> None:
    response = await agent.client.agent.GetAnnouncementBanners(agent_pb2.GetAnnouncementBannersRequest())
    assert list(response.announcement_banners) == []


def _invoke(rpc: str) -> bytes:
    buf = bytearray()
    append_packet(buf, Kind.INVOKE, 1, 1, rpc.encode())
    return bytes(buf)


def _nearly_complete_message() -> bytes:
    """A Message frame announcing MAX_PACKET_SIZE bytes, one byte short."""
    buf = bytearray([(Kind.MESSAGE << 1) | 1])
    append_varint(buf, 1)
    append_varint(buf, 2)
    append_varint(buf, MAX_PACKET_SIZE)
    return bytes(buf) + b"\0" * (MAX_PACKET_SIZE - 1)


async def test_paced_syns_stay_under_the_stream_cap(
    db: Database, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    good, bad = await _two_agents(db, nursery)
    server = bad.connection.session
    assert server is not None
    cap = MuxConfig().max_inbound_streams
    assert cap == 256
    most = 0
    for _ in range(100):  # 10,000 SYNs, 100 at a time
        for _ in range(100):
            await bad.session.open_stream()  # SYN only: the stream never sends
        await trio.sleep(0.01)
        most = max(most, server.num_streams)
        await _good_call(good)
    assert cap / 2 < most <= cap
    # The first-packet deadline reaps the ones that were accepted, and the session goes on.
    await trio.sleep(ServerLimits().first_packet_timeout or 0)
    await trio.sleep(1)
    assert server.num_streams == 0 and not server.closed
    assert bad.connection.request_budget is not None and bad.connection.request_budget.peak == 0
    await _good_call(bad)
    await _good_call(good)


async def test_streams_holding_nearly_complete_packets_share_one_budget(
    db: Database, nursery: trio.Nursery
) -> None:
    good, bad = await _two_agents(db, nursery)
    budget = bad.connection.request_budget
    assert budget is not None and budget.limit == ServerLimits().request_buffer_budget == 16 << 20
    payload = _invoke(BANNERS) + _nearly_complete_message()
    streams: list[trio.abc.HalfCloseableStream] = []

    async def hold_one() -> None:
        stream = await bad.session.open_stream()
        streams.append(stream)
        try:
            await stream.send_all(payload)
        except trio.BrokenResourceError:
            pass  # reset while sending
        await _good_call(good)

    async with trio.open_nursery() as attackers:
        for _ in range(25):
            attackers.start_soon(hold_one)
    # Each holds MAX_PACKET_SIZE + 6 bytes (header + body - 1): three fit in 16 MiB, the rest are reset
    # (the last bytes of a stream may still be on their way to the server when its send returns).
    with trio.fail_after(30):
        while budget.used != 3 * (MAX_PACKET_SIZE + 6):  # noqa: ASYNC110 - polls the server's account
            await trio.sleep(0.01)
    assert budget.peak <= budget.limit
    held = []
    for stream in streams:
        with trio.move_on_after(0.2):
            try:
                await stream.receive_some()
            except trio.BrokenResourceError:
                continue  # reset by the server
        held.append(stream)
    assert len(held) == 3
    # The session survives: a well-formed call on it works, as do the other agent's.
    await _good_call(bad)
    await _good_call(good)
    for stream in held:
        await stream.aclose()
    with trio.fail_after(5):
        while budget.used:  # noqa: ASYNC110 - polls the server-side account; bounded
            await trio.sleep(0.01)


async def test_streams_that_never_send_a_complete_packet_are_reset_after_the_deadline(
    db: Database, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    good, bad = await _two_agents(db, nursery)
    server = bad.connection.session
    assert server is not None
    timeout = ServerLimits().first_packet_timeout
    assert timeout == 10.0
    silent = [await bad.session.open_stream() for _ in range(20)]
    partial = [await bad.session.open_stream() for _ in range(20)]
    for stream in partial:
        await stream.send_all(_invoke(BANNERS)[:-3])  # an Invoke frame, not complete
    await trio.sleep(timeout - 1)
    assert server.num_streams == 40
    await _good_call(good)
    await trio.sleep(2)
    assert server.num_streams == 0 and not server.closed
    for stream in silent + partial:
        with pytest.raises(trio.BrokenResourceError):
            await stream.receive_some()
    await _good_call(bad)
