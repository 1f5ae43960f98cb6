"""Spec/wire.md E5 transcripts at the DRPC layer: our server against a Go client's exact bytes, and our
client's exact bytes against a Go server's replies.  Each is fed whole and one byte at a time."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from agentd.client import RpcClient, RpcError
from agentd.drpc.errors import UNIMPLEMENTED
from agentd.drpc.registry import Registry, method_table
from agentd.drpc.server import serve_stream
from agentd.proto import agent_pb2
from tests.drpc.svc import XY_STREAM, XY_UNARY

H = bytes.fromhex
NAME = b"/coder.agent.v2.Agent/GetManifest"
REQ = H("03 01 01 21") + NAME + H("05 01 02 00 0d 01 03 00")  # Go client's unary request, one write
MSG_HI = H("05 01 01 04 0a 02 68 69")
CLOSE_SEND_2 = H("0d 01 02 00")


class Recorder(trio.abc.HalfCloseableStream):
    """Wraps a stream and records each send_all call (= one transport write)."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner
        self.writes: list[bytes] = []
        self.eof_sent = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        self.eof_sent = True
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        self.eof_sent = True
        await self.inner.aclose()


def agent_registry(**handlers: Any) -> Registry:
    table = method_table()
    hs = {f"/coder.agent.v2.Agent/{k}": v for k, v in handlers.items()}
    return Registry.build(handlers=hs, unimplemented=set(table) - set(hs))


async def manifest_hi(_req: Any) -> Any:
    return agent_pb2.Manifest(agent_id=b"hi")


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    out = bytearray()
    while data := await stream.receive_some():
        out += data
    return bytes(out)


async def send(stream: trio.abc.SendStream, data: bytes, bytewise: bool) -> None:
    if bytewise:
        for i in range(len(data)):
            await stream.send_all(data[i : i + 1])
    else:
        await stream.send_all(data)


async def run_server(
    registry: Registry, client_bytes: list[bytes], bytewise: bool, *, eof: bool = True
) -> tuple[bytes, Recorder]:
    """Play a Go client: send ``client_bytes``, read the reply, FIN, collect until the server's FIN."""
    c, s = trio.testing.lockstep_stream_pair()
    rec = Recorder(s)
    sent = trio.Event()

    async def sender() -> None:
        for chunk in client_bytes:
            await send(c, chunk, bytewise)
        sent.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_stream, rec, registry)
        nursery.start_soon(sender)
        got = bytearray()
        # Read the reply first (the client keeps its write side open until then) ...
        with trio.move_on_after(1):
            while True:
                data = await c.receive_some()
                if not data:
                    break
                got += data
        await sent.wait()
        if eof:
            await c.send_eof()
            got += await read_all(c)
    return bytes(got), rec


BYTEWISE = pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])


@BYTEWISE
async def test_t1_t7_unary_reply_is_one_write_then_fin(bytewise: bool, autojump_clock: Any) -> None:
    got, rec = await run_server(agent_registry(GetManifest=manifest_hi), [REQ], bytewise)
    # Message(1,1) and CloseSend(1,2) batched in one write (T7 shape), then FIN after our FIN.
    assert got == MSG_HI + CLOSE_SEND_2
    assert rec.writes == [MSG_HI + CLOSE_SEND_2]
    assert rec.eof_sent


@BYTEWISE
async def test_t1_client_close_after_response_is_tolerated(bytewise: bool, autojump_clock: Any) -> None:
    c, s = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_stream, s, agent_registry(GetManifest=manifest_hi))
        await send(c, REQ, bytewise)
        got = b""
        while len(got) < 12:
            got += await c.receive_some()
        assert got == MSG_HI + CLOSE_SEND_2
        await send(c, H("0b 01 04 00"), bytewise)  # Go client's deferred Close(1,4)
        await c.send_eof()
        assert await read_all(c) == b""


@BYTEWISE
async def test_t2_unimplemented(bytewise: bool, autojump_clock: Any) -> None:
    got, rec = await run_server(agent_registry(), [REQ], bytewise)
    d9 = H("07 01 01 15 00 00 00 00 00 00 00 0c 55 6e 69 6d 70 6c 65 6d 65 6e 74 65 64")
    assert got == d9
    assert rec.writes == [d9]


@BYTEWISE
async def test_t2_handler_rpc_error_code(bytewise: bool, autojump_clock: Any) -> None:
    async def unimpl(_req: Any) -> Any:
        raise RpcError("Unimplemented", UNIMPLEMENTED)

    got, _ = await run_server(agent_registry(GetManifest=unimpl), [REQ], bytewise)
    assert got == H("07 01 01 15 00 00 00 00 00 00 00 0c") + b"Unimplemented"


@BYTEWISE
async def test_d10_unknown_rpc(bytewise: bool, autojump_clock: Any) -> None:
    reg = Registry.build(handlers={"/x.Y/Z": manifest_hi}, services=[XY_UNARY])
    got, _ = await run_server(reg, [REQ], bytewise)
    text = b'protocol error: unknown rpc: "/coder.agent.v2.Agent/GetManifest"'
    assert got == H("07 01 01 48 00 00 00 00 00 00 00 00") + text


@BYTEWISE
async def test_t3_server_streaming(bytewise: bool, autojump_clock: Any) -> None:
    resp_type = method_table((XY_STREAM,))["/x.Y/Z"].response_type

    async def z(req: Any, stream: Any) -> None:
        assert req.n == 1
        await stream.send(resp_type(n=1))
        await stream.send(resp_type(n=2))

    reg = Registry.build(handlers={"/x.Y/Z": z}, services=[XY_STREAM])
    c, s = trio.testing.lockstep_stream_pair()
    rec = Recorder(s)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_stream, rec, reg)
        await send(c, H("03 01 01 06 2f 78 2e 59 2f 5a 05 01 02 02 08 01"), bytewise)
        await send(c, H("0d 01 03 00"), bytewise)
        got = b""
        while len(got) < 16:
            got += await c.receive_some()
        await c.send_eof()
        got += await read_all(c)
    assert rec.writes == [H("05 01 01 02 08 01"), H("05 01 02 02 08 02"), H("0d 01 03 00")]
    assert got == b"".join(rec.writes)


@BYTEWISE
async def test_t5_early_fin_cancels_the_call(bytewise: bool, autojump_clock: Any) -> None:
    cancelled = trio.Event()

    async def slow(_req: Any) -> Any:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    c, s = trio.testing.memory_stream_pair()
    rec = Recorder(s)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_stream, rec, agent_registry(GetManifest=slow))
        await send(c, REQ, bytewise)
        await trio.sleep(1)
        await c.send_eof()
        assert await read_all(c) == b""  # only the FIN
    assert cancelled.is_set()
    assert rec.writes == []


@BYTEWISE
async def test_t6_two_rpcs_on_one_stream(bytewise: bool, autojump_clock: Any) -> None:
    hi_type = method_table((XY_UNARY,))["/x.Y/Z"].response_type

    async def z(_req: Any) -> Any:
        return hi_type(a="hi")

    reg = Registry.build(handlers={"/x.Y/Z": z}, services=[XY_UNARY])
    c, s = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_stream, s, reg)
        await send(c, H("03 01 01 06") + b"/x.Y/Z" + H("05 01 02 00 0d 01 03 00"), bytewise)
        got = b""
        while len(got) < 12:
            got += await c.receive_some()
        assert got == MSG_HI + CLOSE_SEND_2
        await send(c, H("0b 01 04 00"), bytewise)
        await send(c, H("03 02 01 06") + b"/x.Y/Z" + H("05 02 02 00 0d 02 03 00"), bytewise)
        got = b""
        while len(got) < 12:
            got += await c.receive_some()
        assert got == H("05 02 01 04 0a 02 68 69 0d 02 02 00")
        await c.send_eof()
        assert await read_all(c) == b""


async def test_garbage_closes_the_transport(autojump_clock: Any) -> None:
    got, rec = await run_server(agent_registry(GetManifest=manifest_hi), [H("13 01 01 00")], False, eof=False)
    assert got == b"" and rec.writes == []


# ------------------------------------------------------------------------------ client side


class OneStreamSession:
    """A 'session' whose open_stream hands out prepared transports (one per call)."""

    def __init__(self) -> None:
        self.peers: list[trio.abc.HalfCloseableStream] = []
        self.ours: list[Recorder] = []

    async def open_stream(self) -> trio.abc.HalfCloseableStream:
        a, b = trio.testing.memory_stream_pair()
        self.peers.append(b)
        rec = Recorder(a)
        self.ours.append(rec)
        return rec


async def _expect(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    got = b""
    while len(got) < n:
        data = await stream.receive_some()
        assert data, "unexpected EOF"
        got += data
    return got


@BYTEWISE
async def test_client_unary_bytes_like_go(bytewise: bool, autojump_clock: Any) -> None:
    session = OneStreamSession()
    client = RpcClient(session)
    async with trio.open_nursery() as nursery:
        result: list[Any] = []

        async def call() -> None:
            result.append(await client.agent.GetManifest(agent_pb2.GetManifestRequest()))

        nursery.start_soon(call)
        await trio.sleep(0.1)
        peer = session.peers[0]
        assert await _expect(peer, len(REQ)) == REQ
        assert session.ours[0].writes == [REQ]  # Invoke + Message(empty) + CloseSend in one write
        await send(peer, MSG_HI, bytewise)  # T1: the server's CloseSend raced away
        # Go client: Close(1,4), then FIN — and it has not FINed before the response.
        assert await read_all(peer) == H("0b 01 04 00")
    assert result[0].agent_id == b"hi"


async def test_client_t7_message_and_close_send_in_one_write(autojump_clock: Any) -> None:
    # (Byte by byte this is T1: the Message completes before the CloseSend arrives.)
    session = OneStreamSession()
    client = RpcClient(session)
    async with trio.open_nursery() as nursery:
        result: list[Any] = []

        async def call() -> None:
            result.append(await client.agent.GetManifest())

        nursery.start_soon(call)
        await trio.sleep(0.1)
        peer = session.peers[0]
        await _expect(peer, len(REQ))
        await peer.send_all(MSG_HI + CLOSE_SEND_2)
        assert await read_all(peer) == b""  # RPC already over: just the FIN
    assert result[0].agent_id == b"hi"


async def test_client_error_reply_no_close(autojump_clock: Any) -> None:
    session = OneStreamSession()
    client = RpcClient(session)
    async with trio.open_nursery() as nursery:

        async def call() -> None:
            with pytest.raises(RpcError) as info:
                await client.agent.GetManifest()
            assert info.value == RpcError("Unimplemented", 12)

        nursery.start_soon(call)
        await trio.sleep(0.1)
        peer = session.peers[0]
        await _expect(peer, len(REQ))
        await peer.send_all(H("07 01 01 15 00 00 00 00 00 00 00 0c") + b"Unimplemented")
        assert await read_all(peer) == b""


async def test_client_cancel_mid_call_just_fins(autojump_clock: Any) -> None:
    session = OneStreamSession()
    client = RpcClient(session)
    with trio.move_on_after(1):
        await client.agent.GetManifest()
    peer = session.peers[0]
    assert await read_all(peer) == REQ  # no Close/Cancel packet, then EOF (FIN)


@pytest.mark.parametrize(
    "terminal", [H("0b 01 04 00"), H("89 01 04 00"), H("07 01 04 09 00 00 00 00 00 00 00 01 78")]
)
async def test_close_cancel_or_error_from_client_cancels_handler(
    terminal: bytes, autojump_clock: Any
) -> None:
    """Close, a soft Cancel (control bit) or an Error from the client ends the RPC: the handler is
    cancelled, nothing is sent, and the transport stays usable for the next RPC (stream 2)."""
    cancelled = trio.Event()

    async def slow(_req: Any) -> Any:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    c, s = trio.testing.memory_stream_pair()
    rec = Recorder(s)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            serve_stream, rec, agent_registry(GetManifest=slow, GetServiceBanner=manifest_banner)
        )
        await c.send_all(REQ)
        await trio.sleep(1)
        await c.send_all(terminal)
        await cancelled.wait()
        name = b"/coder.agent.v2.Agent/GetServiceBanner"
        await c.send_all(bytes([3, 2, 1, len(name)]) + name + H("05 02 02 00 0d 02 03 00"))
        assert await _expect(c, 8) == H("05 02 01 00 0d 02 02 00")
        await c.send_eof()
        assert await read_all(c) == b""
    assert rec.writes == [H("05 02 01 00 0d 02 02 00")]


async def manifest_banner(_req: Any) -> Any:
    return agent_pb2.ServiceBanner()


async def test_handler_cancelled_when_session_task_is_cancelled(autojump_clock: Any) -> None:
    cancelled = trio.Event()

    async def slow(_req: Any) -> Any:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    c, s = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_stream, s, agent_registry(GetManifest=slow))
        await c.send_all(REQ)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert cancelled.is_set()
