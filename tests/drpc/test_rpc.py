"""RpcClient ↔ serve_session over agentd.mux, over a memory stream pair and over a Unix socket."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from agentd.client import RpcClient, RpcError
from agentd.drpc.registry import Registry, method_table
from agentd.drpc.wire import MAX_PACKET_SIZE
from agentd.mux import MuxConfig, MuxSession
from agentd.proto import agent_pb2, tailnet_pb2
from tests.drpc.svc import ECHO, EchoService, Req, mux_client


@asynccontextmanager
async def unix_pair() -> AsyncIterator[tuple[trio.abc.Stream, trio.abc.Stream]]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s")
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(path)
        sock.listen(1)
        listener = trio.SocketListener(sock)
        client = await trio.open_unix_socket(path)
        server = await listener.accept()
        await listener.aclose()
        try:
            yield client, server
        finally:
            await client.aclose()
            await server.aclose()


@pytest.fixture(params=["memory", "unix"])
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    if request.param == "memory":
        yield trio.testing.memory_stream_pair()
    else:
        async with unix_pair() as p:
            yield p


@asynccontextmanager
async def echo(pair: Any) -> AsyncIterator[tuple[RpcClient, EchoService, MuxSession, MuxSession]]:
    svc = EchoService()
    async with mux_client(svc.registry(), transport_pair=pair) as (client, cs, ss):
        yield client, svc, cs, ss


async def test_unary(pair: Any) -> None:
    async with echo(pair) as (client, *_):
        resp = await client.echo.Unary(Req(n=41, text="hello", blob=b"\x00\x01"))
        assert (resp.n, resp.text, resp.blob) == (42, "hello", b"\x00\x01")
        assert (await client.echo.Unary()).n == 1  # empty request → Message with 0 bytes
        assert (await client.unary("/test.drpc.v1.Echo/Unary", Req(n=1))).n == 2


async def test_server_stream(pair: Any) -> None:
    async with echo(pair) as (client, *_):
        async with client.echo.ServerStream(Req(n=5)) as call:
            got = [r.n async for r in call]
        assert got == [1, 2, 3, 4, 5]
        # Without a context manager the call cleans up when the stream ends.
        assert [r.n async for r in client.echo.ServerStream(Req(n=2))] == [1, 2]
        assert [r.n async for r in client.echo.ServerStream(Req(n=0))] == []


async def test_server_stream_error_after_messages(pair: Any) -> None:
    async with echo(pair) as (client, *_):
        got = []
        with pytest.raises(RpcError) as info:
            async with client.echo.ServerStream(Req(n=2, text="fail")) as call:
                async for r in call:
                    got.append(r.n)
        assert got == [1, 2]
        assert info.value == RpcError("stream failed", 7)


async def test_client_stream(pair: Any) -> None:
    async with echo(pair) as (client, *_):
        async with client.echo.ClientStream() as call:
            for i in range(10):
                await call.send(Req(n=i))
            resp = await call.close_and_receive()
        assert (resp.n, resp.text) == (45, "10")
        call = client.echo.ClientStream()
        assert (await call.close_and_receive()).text == "0"


async def test_bidi(pair: Any) -> None:
    async with echo(pair) as (client, svc, *_):
        async with client.echo.Bidi() as call:
            for i in range(5):
                await call.send(Req(n=i, text="x"))
                assert (await call.receive()).n == i + 1
            await call.close_send()
            with pytest.raises(trio.EndOfChannel):
                await call.receive()
        # The server ending first: the client sees end of stream and may still close its side.
        async with client.echo.Bidi() as call:
            await call.send(Req(text="close"))
            assert [r async for r in call] == []
        await svc.finished_bidi.wait()
        assert svc.cancelled == 0


async def test_bidi_concurrent_send_and_receive(pair: Any) -> None:
    async with echo(pair) as (client, *_):
        async with client.echo.Bidi() as call:
            got: list[int] = []

            async def reader() -> None:
                async for r in call:
                    got.append(r.n)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                for i in range(100):
                    await call.send(Req(n=i))
                await call.close_send()
        assert got == list(range(1, 101))


async def test_errors_with_codes(pair: Any) -> None:
    async with echo(pair) as (client, *_):
        with pytest.raises(RpcError) as info:
            await client.echo.Unary(Req(text="fail"))
        assert (info.value.message, info.value.code) == ("nope", 42)
        with pytest.raises(RpcError) as info:
            await client.echo.Unary(Req(text="crash"))
        assert info.value.code == 0
        assert "/test.drpc.v1.Echo/Unary" in info.value.message and "boom" in info.value.message
        with pytest.raises(RpcError) as info:
            await client.echo.Unary(Req(text="wrong-type"))
        assert "Req" in info.value.message
        # The session is unaffected.
        assert (await client.echo.Unary(Req(n=1))).n == 2


async def test_unimplemented_and_unknown(pair: Any) -> None:
    async with echo(pair) as (client, *_):
        with pytest.raises(RpcError) as info:
            await client.echo.Unimpl(Req())
        assert info.value == RpcError("Unimplemented", 12)
        # A client that knows an RPC the server does not serve at all.
        other = RpcClient(client._session)  # agent/tailnet stubs; the server only serves Echo
        with pytest.raises(RpcError) as info:
            await other.agent.GetManifest()
        assert info.value == RpcError('protocol error: unknown rpc: "/coder.agent.v2.Agent/GetManifest"', 0)
        with pytest.raises(RpcError) as info:
            async with other.tailnet.Coordinate() as call:
                await call.send(tailnet_pb2.CoordinateRequest())
                await call.receive()
        assert info.value.code == 0 and "unknown rpc" in info.value.message


async def test_client_cancel_cancels_handler(pair: Any) -> None:
    async with echo(pair) as (client, svc, cs, ss):
        with trio.move_on_after(5) as scope:
            async with trio.open_nursery() as nursery:

                async def call() -> None:
                    await client.echo.Unary(Req(text="sleep"))

                nursery.start_soon(call)
                await svc.started.wait()
                nursery.cancel_scope.cancel()
        assert not scope.cancelled_caught
        with trio.fail_after(5):
            await svc.cancelled_event.wait()
        # Both ends released the stream (the server FINed back after the client's FIN).
        with trio.fail_after(5):
            while cs.num_streams or ss.num_streams:  # noqa: ASYNC110 - polling the mux's count
                await trio.sleep(0.01)
        assert (await client.echo.Unary(Req(n=1))).n == 2


async def test_client_cancel_streaming_call(pair: Any) -> None:
    async with echo(pair) as (client, svc, *_):
        with trio.move_on_after(1):
            async with client.echo.Bidi() as call:
                await call.send(Req(n=1))
                await call.receive()
                await trio.sleep_forever()
        with trio.fail_after(5):
            await svc.finished_bidi.wait()
        assert svc.cancelled == 1


async def test_server_side_cancel(pair: Any) -> None:
    """The server tearing the session down mid-call fails the pending call, not the client task."""
    svc = EchoService()
    a, b = pair
    cs = MuxSession(a, is_client=True)
    ss = MuxSession(b, is_client=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(cs.run)
        await nursery.start(ss.run)
        async with trio.open_nursery() as server:
            await server.start(_serve, ss, svc.registry())
            client = RpcClient(cs, services=[ECHO])
            async with trio.open_nursery() as calls:

                async def call() -> None:
                    with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):
                        await client.echo.Unary(Req(text="sleep"))

                calls.start_soon(call)
                await svc.started.wait()
                server.cancel_scope.cancel()  # handler cancelled ...
                await ss.aclose()  # ... and the connection dropped
        assert svc.cancelled == 1
        nursery.cancel_scope.cancel()


async def _serve(
    session: MuxSession, registry: Registry, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    from agentd.drpc.server import serve_session

    await serve_session(session, registry, task_status=task_status)


async def test_many_concurrent_calls(pair: Any) -> None:
    svc = EchoService()
    uncapped = MuxConfig(max_inbound_streams=None)
    async with mux_client(svc.registry(), transport_pair=pair, server_config=uncapped) as (client, *_):
        results: dict[int, int] = {}

        async def one(i: int) -> None:
            results[i] = (await client.echo.Unary(Req(n=i))).n

        async with trio.open_nursery() as nursery:
            for i in range(1000):
                nursery.start_soon(one, i)
        assert results == {i: i + 1 for i in range(1000)}


async def test_calls_past_the_stream_cap_are_reset_and_the_session_goes_on(pair: Any) -> None:
    async with echo(pair) as (client, _svc, _cs, ss):
        cap = ss.config.max_inbound_streams
        assert cap == 256
        results: dict[int, int] = {}
        refused = 0

        async def one(i: int) -> None:
            nonlocal refused
            try:
                results[i] = (await client.echo.Unary(Req(n=i))).n
            except trio.BrokenResourceError:
                refused += 1

        async with trio.open_nursery() as nursery:
            for i in range(1000):
                nursery.start_soon(one, i)
        assert len(results) >= cap and refused == 1000 - len(results) and refused > 0
        assert all(v == k + 1 for k, v in results.items())
        assert (await client.echo.Unary(Req(n=1))).n == 2


def _blob_for(encoded_size: int) -> bytes:
    # Req{blob} encodes as 0x12, a 4-byte varint length, then the bytes.
    return b"\xab" * (encoded_size - 5)


async def test_4mib_message_round_trips(pair: Any) -> None:
    async with echo(pair) as (client, *_):
        req = Req(blob=_blob_for(MAX_PACKET_SIZE - 6), text="echo")  # "echo" takes 6 bytes
        assert req.ByteSize() == MAX_PACKET_SIZE
        resp = await client.echo.Unary(req)
        assert resp.ByteSize() == MAX_PACKET_SIZE  # exactly 4 MiB both ways
        assert resp.blob == req.blob


async def test_over_limit_refused_on_that_stream_only(pair: Any) -> None:
    async with echo(pair) as (client, _svc, _cs, _ss):
        req = Req(blob=_blob_for(MAX_PACKET_SIZE + 1))
        assert req.ByteSize() == MAX_PACKET_SIZE + 1
        async with trio.open_nursery() as nursery:
            # A concurrent call on another stream of the same session is not disturbed.
            async with client.echo.Bidi() as call:
                await call.send(Req(n=1))
                assert (await call.receive()).n == 2
                with pytest.raises(trio.BrokenResourceError):
                    await client.echo.Unary(req)
                await call.send(Req(n=2))
                assert (await call.receive()).n == 3
            nursery.cancel_scope.cancel()
        assert (await client.echo.Unary(Req(n=1))).n == 2
        # A handler whose response would exceed the limit fails with an Error packet instead.
        with pytest.raises(RpcError, match="exceeds the message size limit"):
            await client.echo.Unary(Req(text="grow", blob=_blob_for(MAX_PACKET_SIZE - 100)))


async def test_garbage_on_one_stream_does_not_affect_another(pair: Any) -> None:
    async with echo(pair) as (client, _svc, cs, _ss):
        async with client.echo.Bidi() as call:
            await call.send(Req(n=1))
            assert (await call.receive()).n == 2
            raw = await cs.open_stream()
            await raw.send_all(b"\x13\x01\x01\x00garbage")
            with trio.fail_after(5):
                assert await _drain(raw) == b""  # the server ended that stream, sending nothing
            for junk in (b"\x05\x00\x00\x00", b"\xff" * 40, b"\x03\x01\x01\x05/nope\x03\x01\x01\x00"):
                raw = await cs.open_stream()
                await raw.send_all(junk)
                with trio.fail_after(5):
                    await _drain(raw)
            await call.send(Req(n=2))
            assert (await call.receive()).n == 3
        assert (await client.echo.Unary(Req(n=1))).n == 2


async def _drain(stream: trio.abc.ReceiveStream) -> bytes:
    out = b""
    try:
        while data := await stream.receive_some():
            out += data
    except trio.BrokenResourceError:
        pass
    return out


async def test_real_agent_api_large_manifest() -> None:
    """GetManifest with a large Manifest and Coordinate (bidi) on the real coder.agent.v2 / tailnet.v2."""
    manifest = agent_pb2.Manifest(agent_id=b"\x01" * 16, agent_name="main", directory="/home/coder")
    for i in range(2000):
        manifest.environment_variables[f"VAR_{i}"] = "x" * 100
    handlers: dict[str, Any] = {}

    async def get_manifest(req: agent_pb2.GetManifestRequest) -> agent_pb2.Manifest:
        return manifest

    async def coordinate(stream: Any) -> None:
        async for req in stream:
            await stream.send(tailnet_pb2.CoordinateResponse(error=f"got {req.ByteSize()} bytes"))

    handlers["/coder.agent.v2.Agent/GetManifest"] = get_manifest
    handlers["/coder.tailnet.v2.Tailnet/Coordinate"] = coordinate
    registry = Registry.build(handlers=handlers, unimplemented=set(method_table()) - set(handlers))
    async with mux_client(registry, services=None) as (_, cs, _ss):
        client = RpcClient(cs)
        got = await client.agent.GetManifest(agent_pb2.GetManifestRequest())
        assert got == manifest and got.ByteSize() > 200_000
        async with client.tailnet.Coordinate() as call:
            await call.send(tailnet_pb2.CoordinateRequest())
            assert (await call.receive()).error.startswith("got")
        with pytest.raises(RpcError) as info:
            await client.agent.UpdateStats(agent_pb2.UpdateStatsRequest())
        assert info.value.code == 12


async def test_client_reset_mid_stream_only_ends_that_call(pair: Any) -> None:
    """A client resetting its mux stream while the handler is still sending: the handler stops,
    nothing escapes into the session (no crash), other calls keep working."""
    async with echo(pair) as (client, *_):
        call = client.echo.ServerStream(Req(n=100_000))
        got = [(await call.receive()).n for _ in range(3)]
        assert got == [1, 2, 3]
        assert call._link is not None
        await call._link.transport.reset()  # type: ignore[attr-defined]
        for i in range(20):
            assert (await client.echo.Unary(Req(n=i))).n == i + 1
        await call.aclose()


def test_request_budget_refuses_growth_past_its_limit_and_always_allows_release() -> None:
    from agentd.drpc.server import RequestBudget

    budget = RequestBudget(10)
    assert budget.recharge(0, 6) and budget.used == 6
    assert not budget.recharge(0, 5) and budget.used == 6  # another stream: would pass the limit
    assert budget.recharge(0, 4) and budget.used == 10
    assert budget.recharge(6, 2) and budget.used == 6  # shrinking is always fine
    assert budget.recharge(2, 0) and budget.recharge(4, 0) and budget.used == 0
    assert budget.peak == 10


async def test_an_rpc_error_from_a_handlers_nursery_is_the_answer_not_an_internal_error(
    pair: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with echo(pair) as (client, *_):
        with pytest.raises(RpcError) as info:
            await client.echo.Unary(Req(text="fail-in-nursery"))
        assert info.value == RpcError("bad request inside", 3)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_each_rpc_is_one_debug_line_with_its_outcome(caplog: pytest.LogCaptureFixture) -> None:
    """`--log-level debug`: one line per RPC with the session's context, the method, the duration
    and how it ended; nothing below error when debug is off."""
    tag = "agent_id=6f1c1f3e-8a8e-4b8e-9a51-0d1c2b3a4f5e"

    async def session_of_calls() -> None:
        svc = EchoService()
        async with mux_client(svc.registry(), log_context=tag) as (client, *_):
            assert (await client.echo.Unary(Req(n=1))).n == 2
            for text in ("fail", "crash"):
                with pytest.raises(RpcError):
                    await client.echo.Unary(Req(text=text))
            with pytest.raises(RpcError):
                await client.echo.Unimpl(Req())
            with pytest.raises(RpcError):
                await RpcClient(client._session).agent.GetManifest()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.echo.Unary, Req(text="sleep"))
                await svc.started.wait()
                nursery.cancel_scope.cancel()  # the client gives up: cancelled
            with trio.fail_after(5):
                await svc.cancelled_event.wait()

    caplog.set_level(logging.INFO, logger="agentd.drpc.server")
    await session_of_calls()
    assert [r.getMessage() for r in caplog.records if r.levelno < logging.ERROR] == []
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="agentd.drpc.server")
    await session_of_calls()
    unary = "/test.drpc.v1.Echo/Unary"
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    pattern = re.compile(rf"rpc {tag} method=(\S+) duration_ms=\d+\.\d{{3}} outcome=(.*)")
    assert [(m[1], m[2]) for line in lines if (m := pattern.fullmatch(line))] == [
        (unary, "ok"),
        (unary, "error code=42 error=nope"),
        (unary, f'error code=0 error="{unary}: ValueError: boom"'),
        ("/test.drpc.v1.Echo/Unimpl", "error code=12 error=Unimplemented"),
        (
            "/coder.agent.v2.Agent/GetManifest",
            'error code=0 error="protocol error: unknown rpc: \\"/coder.agent.v2.Agent/GetManifest\\""',
        ),
        (unary, "cancelled"),
    ], lines
    # The handler's crash: an error with its traceback, naming the session too.
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        f"rpc {tag} method={unary} failed"
    ]
