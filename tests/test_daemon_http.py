"""The HTTP front door: bounded head reading, routing, JSON errors, hand-over of trailing bytes."""

from __future__ import annotations

import json

import h11
import pytest
import trio
import trio.testing

from agentd.http import HttpApp, Request, Router


async def _exchange(app: HttpApp, raw: bytes, *, close_after_send: bool = False) -> bytes:
    """Send `raw` to the app over an in-memory stream pair and return everything it answers."""
    client, server = trio.testing.memory_stream_pair()
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app.handle_connection, server)
        if raw:
            await client.send_all(raw)
        if close_after_send:
            await client.send_eof()
        while chunk := await client.receive_some(65536):
            received += chunk
        await client.aclose()  # a client that has its answer leaves (or the server lingers briefly)
    return bytes(received)


def _parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    conn.receive_data(b"")
    response = conn.next_event()
    assert isinstance(response, h11.Response)
    body = b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        else:
            break
    headers = {k.decode(): v.decode() for k, v in response.headers}
    return response.status_code, headers, body


async def _ok(request: Request) -> None:
    await request.send_json(200, {"path": request.path, "q": request.query_value("q")})


def _app() -> HttpApp:
    router = Router()
    router.add("/ok", _ok)
    return HttpApp(router)


async def test_routes_get_and_parses_query() -> None:
    raw = await _exchange(_app(), b"GET /ok?q=1&q=2 HTTP/1.1\r\nHost: a\r\n\r\n")
    status, headers, body = _parse(raw)
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert json.loads(body) == {"path": "/ok", "q": "1"}


async def test_unknown_path_is_404_json() -> None:
    status, _, body = _parse(await _exchange(_app(), b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\n"))
    assert status == 404
    assert json.loads(body)["message"] == "Route not found."


async def test_wrong_method_is_405_with_allow() -> None:
    status, headers, body = _parse(await _exchange(_app(), b"DELETE /ok HTTP/1.1\r\nHost: a\r\n\r\n"))
    assert status == 405
    assert headers["allow"] == "GET, HEAD"
    assert "message" in json.loads(body)


async def test_head_gets_headers_without_body() -> None:
    raw = await _exchange(_app(), b"HEAD /ok HTTP/1.1\r\nHost: a\r\n\r\n")
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert rest == b""


async def test_malformed_request_is_400() -> None:
    status, _, body = _parse(await _exchange(_app(), b"this is not http\r\n\r\n"))
    assert status == 400
    assert json.loads(body)["message"] == "Malformed HTTP request."


async def test_http_versions_other_than_1x_are_505() -> None:
    for version in (b"9.9", b"2.0", b"0.9"):
        raw = await _exchange(_app(), b"GET /ok HTTP/" + version + b"\r\nHost: a\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 505 "), raw
        assert json.loads(raw.partition(b"\r\n\r\n")[2])["message"] == "HTTP version not supported."
    status, _, _ = _parse(await _exchange(_app(), b"GET /ok HTTP/1.0\r\n\r\n"))
    assert status == 200


async def test_oversized_head_is_431() -> None:
    raw = b"GET /ok HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
    status, _, _ = _parse(await _exchange(_app(), raw))
    assert status == 431


async def test_head_within_limit_is_accepted() -> None:
    raw = b"GET /ok HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 15_000 + b"\r\n\r\n"
    status, _, _ = _parse(await _exchange(_app(), raw))
    assert status == 200


async def test_slow_head_times_out_with_408(autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    status, _, _ = _parse(await _exchange(_app(), b"GET /ok HTTP/1.1\r\nHost: a\r\n"))
    assert status == 408
    assert trio.current_time() - start == 10.0


async def test_client_closing_without_request_gets_nothing() -> None:
    assert await _exchange(_app(), b"", close_after_send=True) == b""


async def test_client_closing_mid_head_is_400() -> None:
    status, _, _ = _parse(await _exchange(_app(), b"GET /ok HTTP/1.1\r\nHo", close_after_send=True))
    assert status == 400


async def test_failing_handler_answers_500_and_keeps_the_app_alive() -> None:
    async def boom(request: Request) -> None:
        raise ValueError("bug")

    router = Router()
    router.add("/boom", boom)
    router.add("/ok", _ok)
    app = HttpApp(router)
    status, _, body = _parse(await _exchange(app, b"GET /boom HTTP/1.1\r\nHost: a\r\n\r\n"))
    assert status == 500
    assert json.loads(body)["message"] == "Internal error."
    status, _, _ = _parse(await _exchange(app, b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n"))
    assert status == 200


async def test_upgrade_handler_sees_headers_and_bytes_after_the_head() -> None:
    seen: dict[str, object] = {}

    async def upgrade(request: Request) -> None:
        seen["upgrade"] = request.header("UPGRADE")
        seen["connection"] = request.header_values("connection")
        seen["trailing"] = request.trailing_data
        await request.stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\nraw")

    router = Router()
    router.add("/rpc", upgrade, methods=("GET",))
    raw = await _exchange(
        HttpApp(router),
        b"GET /rpc HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: yamux\r\n\r\n"
        b"\x00\x01yamux",
    )
    assert raw.endswith(b"raw")
    assert seen == {"upgrade": "yamux", "connection": ["keep-alive", "Upgrade"], "trailing": b"\x00\x01yamux"}


async def test_a_client_gone_before_the_error_answer_is_not_a_handler_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = trio.socket.socketpair()
    client, server = trio.SocketStream(a), trio.SocketStream(b)
    await client.send_all(b"this is not http\r\n\r\n")
    await client.aclose()
    await _app().handle_connection(server)  # answers 400 into a closed socket: no exception
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
