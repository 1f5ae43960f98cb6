"""WebSocketByteStream: trio stream semantics, message reassembly, limits, close handshake."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, Pong, TextMessage
from wsproto.frame_protocol import CloseReason

from agentd.mux import MuxSession
from agentd.websocket import (
    MAX_MESSAGE_SIZE,
    UpgradeError,
    WebSocketByteStream,
    check_websocket_request,
    connect_websocket,
    websocket_accept_response,
)

YAMUX_SYN = bytes.fromhex("000100010000000100000000")


def pair(
    transports: tuple[trio.abc.Stream, trio.abc.Stream],
) -> tuple[WebSocketByteStream, WebSocketByteStream]:
    client_t, server_t = transports
    return WebSocketByteStream.client(client_t), WebSocketByteStream.server(server_t)


async def memory_pair() -> tuple[WebSocketByteStream, WebSocketByteStream]:
    return pair(trio.testing.memory_stream_pair())


async def lockstep_pair() -> tuple[WebSocketByteStream, WebSocketByteStream]:
    return pair(trio.testing.lockstep_stream_pair())


async def test_generic_two_way_stream_contract() -> None:
    await trio.testing.check_two_way_stream(memory_pair, lockstep_pair)


class RawPeer:
    """A bare wsproto client over the other end of a memory pair, to craft frames by hand."""

    def __init__(self, transport: trio.abc.Stream) -> None:
        self.transport = transport
        self.ws = Connection(ConnectionType.CLIENT)

    async def send(self, *events: object) -> None:
        data = b"".join(self.ws.send(e) for e in events)  # type: ignore[arg-type]
        await self.transport.send_all(data)

    async def events(self) -> list[object]:
        """Everything the server sent until it closed the transport."""
        out: list[object] = []
        while True:
            data = await self.transport.receive_some()
            if not data:
                return out
            self.ws.receive_data(bytes(data))
            out.extend(self.ws.events())


def server_with_raw_peer(max_message_size: int = MAX_MESSAGE_SIZE) -> tuple[WebSocketByteStream, RawPeer]:
    client_t, server_t = trio.testing.memory_stream_pair()
    return WebSocketByteStream.server(server_t, max_message_size=max_message_size), RawPeer(client_t)


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = await stream.receive_some(n - len(got))
        assert chunk, "unexpected EOF"
        got += chunk
    return bytes(got)


async def test_header_and_body_as_separate_messages_reassemble() -> None:
    """Part H item 2: Go writes the 12-byte yamux header and the body as two messages."""
    server, peer = server_with_raw_peer()
    body = b"\x05\x01\x01\x00" * 10
    header = bytes.fromhex("000000010000000100000028")
    await peer.send(Message(data=header), Message(data=body), Message(data=YAMUX_SYN))
    assert await receive_exactly(server, len(header) + len(body) + 12) == header + body + YAMUX_SYN


async def test_fragmented_message_and_byte_by_byte_delivery() -> None:
    server, peer = server_with_raw_peer()
    wire = peer.ws.send(Message(data=b"hello ", message_finished=False)) + peer.ws.send(
        Message(data=b"world", message_finished=True)
    )
    for i in range(len(wire)):
        await peer.transport.send_all(wire[i : i + 1])
    assert await receive_exactly(server, 11) == b"hello world"


async def test_receive_some_respects_max_bytes_across_messages() -> None:
    server, peer = server_with_raw_peer()
    await peer.send(Message(data=b"abcdef"), Message(data=b"gh"))
    assert await server.receive_some(4) == b"abcd"
    assert await server.receive_some(3) == b"efg"  # boundaries mean nothing
    assert await server.receive_some() == b"h"


async def test_each_send_all_is_one_binary_message() -> None:
    server, peer = server_with_raw_peer()
    await server.send_all(YAMUX_SYN)
    await server.send_all(bytearray(b"x" * (256 * 1024 + 12)))
    await server.send_all(b"")  # no message for an empty write
    await server.aclose()
    events = await peer.events()
    assert isinstance(events[0], BytesMessage) and events[0].data == YAMUX_SYN
    assert events[0].message_finished
    assert isinstance(events[1], BytesMessage) and len(events[1].data) == 256 * 1024 + 12
    assert events[1].message_finished
    assert isinstance(events[2], CloseConnection) and events[2].code == CloseReason.NORMAL_CLOSURE
    assert len(events) == 3


async def test_a_send_bigger_than_the_send_limit_is_split_into_messages() -> None:
    client_t, server_t = trio.testing.memory_stream_pair()
    server = WebSocketByteStream(server_t, Connection(ConnectionType.SERVER), max_send_message_size=1000)
    peer = RawPeer(client_t)
    data = bytes(range(250)) * 10
    await server.send_all(data)
    await server.aclose()
    events = await peer.events()
    assert [len(e.data) for e in events if isinstance(e, BytesMessage)] == [1000, 1000, 500]
    assert b"".join(e.data for e in events if isinstance(e, BytesMessage)) == data


async def test_text_message_closes_with_1003() -> None:
    server, peer = server_with_raw_peer()
    await peer.send(Message(data=b"before"), TextMessage(data="hi"))
    assert await server.receive_some() == b"before"
    with pytest.raises(trio.BrokenResourceError, match="text"):
        await server.receive_some()
    assert server.close_code == CloseReason.UNSUPPORTED_DATA
    with pytest.raises(trio.BrokenResourceError):
        await server.send_all(b"x")
    await server.aclose()
    events = await peer.events()
    assert [type(e) for e in events] == [CloseConnection]
    assert events[0].code == CloseReason.UNSUPPORTED_DATA  # type: ignore[attr-defined]


async def test_message_of_exactly_the_limit_is_accepted() -> None:
    server, peer = server_with_raw_peer(max_message_size=1000)
    await peer.send(Message(data=b"a" * 600, message_finished=False), Message(data=b"b" * 400))
    await peer.send(Message(data=b"c" * 1000))
    assert await receive_exactly(server, 2000) == b"a" * 600 + b"b" * 400 + b"c" * 1000


async def test_oversized_message_closes_with_1009() -> None:
    server, peer = server_with_raw_peer(max_message_size=1000)
    await peer.send(Message(data=b"a" * 600, message_finished=False), Message(data=b"b" * 401))
    with pytest.raises(trio.BrokenResourceError, match="larger than 1000"):
        await receive_exactly(server, 1001)
    assert server.close_code == CloseReason.MESSAGE_TOO_BIG
    await server.aclose()
    events = await peer.events()
    assert [type(e) for e in events] == [CloseConnection]
    assert events[0].code == CloseReason.MESSAGE_TOO_BIG  # type: ignore[attr-defined]


async def test_default_limit_is_4_mib() -> None:
    assert MAX_MESSAGE_SIZE == 4 << 20
    server, peer = server_with_raw_peer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.send, Message(data=b"z" * (MAX_MESSAGE_SIZE + 1)))
        with pytest.raises(trio.BrokenResourceError):
            while True:
                await server.receive_some()
    assert server.close_code == CloseReason.MESSAGE_TOO_BIG


async def test_ping_is_answered_with_pong() -> None:
    server, peer = server_with_raw_peer()
    await peer.send(Ping(payload=b"are you there"), Message(data=b"data"))
    assert await server.receive_some() == b"data"
    await server.aclose()
    events = await peer.events()
    assert isinstance(events[0], Pong) and events[0].payload == b"are you there"
    assert isinstance(events[1], CloseConnection)


async def test_peer_close_reads_as_eof_and_is_answered() -> None:
    server, peer = server_with_raw_peer()
    await peer.send(Message(data=b"last"), CloseConnection(code=CloseReason.GOING_AWAY, reason="bye"))
    assert await server.receive_some() == b"last"
    assert await server.receive_some() == b""
    assert await server.receive_some() == b""
    assert server.close_code == CloseReason.GOING_AWAY
    with pytest.raises(trio.BrokenResourceError):
        await server.send_all(b"too late")
    await server.aclose()
    events = await peer.events()
    assert len(events) == 1 and isinstance(events[0], CloseConnection)
    assert events[0].code == CloseReason.GOING_AWAY  # echoed


async def test_transport_eof_without_close_frame_is_broken() -> None:
    server, peer = server_with_raw_peer()
    await peer.send(Message(data=b"x"))
    await peer.transport.aclose()
    assert await server.receive_some() == b"x"
    with pytest.raises(trio.BrokenResourceError, match="without a WebSocket Close"):
        await server.receive_some()


async def test_unmasked_client_frame_is_a_protocol_error() -> None:
    server, peer = server_with_raw_peer()
    await peer.transport.send_all(b"\x82\x03abc")  # binary, unmasked: clients must mask
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()
    assert server.close_code == CloseReason.PROTOCOL_ERROR


async def test_concurrent_receivers_conflict() -> None:
    server, _peer = server_with_raw_peer()
    with pytest.raises(ExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.receive_some)
            nursery.start_soon(server.receive_some)
    assert info.group_contains(trio.BusyResourceError)


async def test_client_and_server_talk_over_a_real_socketpair() -> None:
    a, b = trio.socket.socketpair()
    client = WebSocketByteStream.client(trio.SocketStream(a))
    server = WebSocketByteStream.server(trio.SocketStream(b))
    payload = bytes(range(256)) * 4096  # 1 MiB

    async def pump() -> None:
        for i in range(0, len(payload), 65536 + 12):
            await client.send_all(payload[i : i + 65536 + 12])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump)
        assert await receive_exactly(server, len(payload)) == payload
    await server.send_all(b"pong")
    assert await client.receive_some() == b"pong"
    await client.aclose()
    assert await server.receive_some() == b""
    await server.aclose()


async def test_frames_never_mix_when_the_socket_takes_a_frame_in_part() -> None:
    """On a socket the server writes each frame at once when it can; a frame the socket takes only
    in part is finished before anything else goes out, also a pong its receiver answers meanwhile."""
    a, b = trio.socket.socketpair()
    b.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 4096)
    server = WebSocketByteStream.server(trio.SocketStream(b))
    peer = Connection(ConnectionType.CLIENT)
    raw = trio.SocketStream(a)
    messages = [bytes([i]) * 50_000 for i in range(1, 5)]
    got: list[bytes] = []
    pongs = 0
    partial = b""

    async def send_messages() -> None:
        for message in messages:
            await server.send_all(message)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_messages)
        nursery.start_soon(server.receive_some)  # answers the pings below
        await trio.testing.wait_all_tasks_blocked()  # the first frame is in the socket in part
        for i in range(3):
            await raw.send_all(peer.send(Ping(payload=bytes([i]))))
        with trio.fail_after(10):
            while len(got) < len(messages) or pongs < 3:
                peer.receive_data(await raw.receive_some(1000))
                for event in peer.events():
                    if isinstance(event, BytesMessage):
                        partial += event.data
                        if event.message_finished:
                            got.append(partial)
                            partial = b""
                    elif isinstance(event, Pong):
                        pongs += 1
                    else:
                        raise AssertionError(f"unexpected {event!r}")
        nursery.cancel_scope.cancel()
    assert got == messages and pongs == 3
    await server.aclose()
    await raw.aclose()


# ---- opening handshake ---------------------------------------------------------------------------


def test_accept_token_matches_rfc_6455_example() -> None:
    response = websocket_accept_response(b"dGhlIHNhbXBsZSBub25jZQ==")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert response.endswith(b"\r\n\r\n")


@pytest.mark.parametrize(
    ("http_version", "headers", "reason"),
    [
        (b"1.0", [], "HTTP version"),
        (b"1.1", [(b"upgrade", b"websocket")], "Connection header"),
        (b"1.1", [(b"connection", b"Upgrade"), (b"upgrade", b"h2c")], "Upgrade header"),
        (
            b"1.1",
            [(b"connection", b"upgrade"), (b"upgrade", b"websocket"), (b"sec-websocket-version", b"8")],
            "only 13",
        ),
        (
            b"1.1",
            [(b"connection", b"upgrade"), (b"upgrade", b"websocket"), (b"sec-websocket-version", b"13")],
            "missing Sec-WebSocket-Key",
        ),
        (
            b"1.1",
            [
                (b"connection", b"upgrade"),
                (b"upgrade", b"websocket"),
                (b"sec-websocket-version", b"13"),
                (b"sec-websocket-key", b"c2hvcnQ="),
            ],
            "invalid Sec-WebSocket-Key",
        ),
    ],
)
def test_bad_opening_requests_are_refused(
    http_version: bytes, headers: list[tuple[bytes, bytes]], reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        check_websocket_request(http_version, headers)


async def test_connect_websocket_rejects_a_wrong_accept_token() -> None:
    client_t, server_t = trio.testing.memory_stream_pair()

    async def bad_server() -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await server_t.receive_some()
        await server_t.send_all(websocket_accept_response(b"dGhlIHNhbXBsZSBub25jZQ=="))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bad_server)
        with pytest.raises(UpgradeError, match="Sec-WebSocket-Accept"):
            await connect_websocket(client_t, "agentd", "/x")


async def test_connect_websocket_reports_status_and_json_message() -> None:
    client_t, server_t = trio.testing.memory_stream_pair()
    body = b'{"message":"nope","detail":"because"}\n'

    async def refusing_server() -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await server_t.receive_some()
        await server_t.send_all(
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        await server_t.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(refusing_server)
        with pytest.raises(UpgradeError) as info:
            await connect_websocket(client_t, "agentd", "/x")
    assert (info.value.status, info.value.message, info.value.detail) == (403, "nope", "because")
    assert info.value.json() == {"message": "nope", "detail": "because"}


async def test_server_bytes_in_the_same_write_as_the_101_are_kept() -> None:
    client_t, server_t = trio.testing.memory_stream_pair()

    async def eager_server() -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await server_t.receive_some()
        key = next(
            line.split(b":", 1)[1].strip()
            for line in data.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        ws = Connection(ConnectionType.SERVER)
        await server_t.send_all(websocket_accept_response(key) + ws.send(Message(data=b"early")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(eager_server)
        stream = await connect_websocket(client_t, "agentd", "/x")
    assert await stream.receive_some() == b"early"


async def test_huge_declared_frame_is_closed_once_the_limit_is_passed() -> None:
    """A frame header claiming 1 GiB is not buffered whole: counting stops it at the limit."""
    server, peer = server_with_raw_peer(max_message_size=1000)
    header = bytes([0x82, 0x80 | 127]) + (1 << 30).to_bytes(8, "big") + b"\x00\x00\x00\x00"
    await peer.transport.send_all(header + b"\x00" * 1500)
    with pytest.raises(trio.BrokenResourceError, match="larger than 1000"):
        while True:
            await server.receive_some()
    assert server.close_code == CloseReason.MESSAGE_TOO_BIG


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=64), max_size=10))
def test_random_inbound_bytes_never_raise_anything_unexpected(chunks: list[bytes]) -> None:
    async def scenario() -> None:
        server, peer = server_with_raw_peer(max_message_size=256)
        for chunk in chunks:
            await peer.transport.send_all(chunk)
        await peer.transport.aclose()
        try:
            while await server.receive_some():
                pass
        except trio.BrokenResourceError:
            pass
        await server.aclose()

    trio.run(scenario)


client_events = st.lists(
    st.one_of(
        st.builds(lambda d, f: Message(data=d, message_finished=f), st.binary(max_size=300), st.booleans()),
        st.builds(lambda t: TextMessage(data=t), st.text(max_size=10)),
        st.builds(lambda p: Ping(payload=p), st.binary(max_size=125)),
        st.builds(lambda p: Pong(payload=p), st.binary(max_size=125)),
        st.builds(lambda c: CloseConnection(code=c), st.sampled_from([1000, 1001, 1011, 4000])),
        # garbage at a frame boundary: a reserved opcode, then anything
        st.builds(lambda b: b"\x8f" + b, st.binary(max_size=20)),
    ),
    max_size=12,
)


@settings(max_examples=100, deadline=None)
@given(client_events, st.integers(min_value=1, max_value=97))
def test_random_frame_sequences_give_a_prefix_of_the_binary_payloads(
    events: list[object], chunk: int
) -> None:
    ws = Connection(ConnectionType.CLIENT)
    wire = bytearray()
    binary = bytearray()
    for event in events:
        if isinstance(event, bytes):
            wire += event
            continue
        try:
            wire += ws.send(event)  # type: ignore[arg-type]
        except Exception:
            break  # wsproto refuses to send after Close; the rest is not on the wire
        if isinstance(event, Message) and isinstance(event.data, bytes):
            binary += event.data

    async def scenario() -> None:
        server, peer = server_with_raw_peer(max_message_size=256)
        for i in range(0, len(wire), chunk):
            await peer.transport.send_all(wire[i : i + chunk])
        await peer.transport.aclose()
        got = bytearray()
        try:
            while data := await server.receive_some():
                got += data
        except trio.BrokenResourceError:
            pass
        assert bytes(binary).startswith(bytes(got))
        await server.aclose()

    trio.run(scenario)


async def test_close_with_a_code_and_reason() -> None:
    server, peer = server_with_raw_peer()
    await server.close(CloseReason.GOING_AWAY, "build is outdated")
    await server.aclose()  # idempotent
    events = await peer.events()
    assert len(events) == 1 and isinstance(events[0], CloseConnection)
    assert (events[0].code, events[0].reason) == (CloseReason.GOING_AWAY, "build is outdated")
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"x")


@pytest.mark.parametrize(
    ("incoming", "expected"),
    [
        (bytes.fromhex("01000000000000010000000c"), CloseReason.PROTOCOL_ERROR),  # yamux version 1
        (None, CloseReason.NORMAL_CLOSURE),  # the session ends normally
    ],
)
async def test_mux_session_over_websocket_closes_with_1002_on_a_yamux_protocol_error(
    incoming: bytes | None, expected: CloseReason
) -> None:
    server, peer = server_with_raw_peer()
    session = MuxSession(server, is_client=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(session.run)
        if incoming is None:
            await session.aclose()
        else:
            await peer.send(Message(data=incoming))
        events = await peer.events()
    closes = [e for e in events if isinstance(e, CloseConnection)]
    assert [c.code for c in closes] == [expected]
