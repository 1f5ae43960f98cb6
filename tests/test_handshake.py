"""Agent RPC upgrade: coderd's refusals byte for byte, token precedence, versions, both upgrades.

Every exchange goes through the daemon's own path: agentd.http's HttpApp reads the head, the router
sends `GET RPC_PATH` to agentd.daemon's AgentRpcRoute, which runs agentd.handshake.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Sequence

import attrs
import pytest
import trio
import trio.testing
import wsproto
import wsproto.events

from agentd.daemon import AgentRpcRoute
from agentd.handshake import (
    HANDSHAKE_TIMEOUT,
    RPC_PATH,
    ApiVersion,
    PrefixedStream,
    Upgrade,
    Upgraded,
    UpgradeError,
    parse_go_uuid,
    upgrade_client,
    validate_version,
)
from agentd.http import LINGER_SECONDS, HttpApp, HttpError, Request, Router
from agentd.websocket import WebSocketByteStream

YAMUX_SYN = bytes.fromhex("000100010000000100000000")


@attrs.frozen
class Agent:
    name: str


TOKEN = uuid.UUID("6f1b8f5e-3c55-4e0e-9f0e-4a4c7f2f9d11")
AGENT = Agent("main")


class FakeLookup:
    """Token -> agent, recording calls; `error` makes every lookup raise it."""

    def __init__(self, agents: dict[uuid.UUID, Agent] | None = None, error: Exception | None = None) -> None:
        self.agents = {TOKEN: AGENT} if agents is None else agents
        self.error = error
        self.calls: list[uuid.UUID] = []

    async def __call__(self, token: uuid.UUID) -> Agent | None:
        self.calls.append(token)
        await trio.lowlevel.checkpoint()
        if self.error is not None:
            raise self.error
        return self.agents.get(token)


def raw_request(
    query: str = "version=2.10&role=agent",
    headers: Sequence[tuple[str, str]] = (("Coder-Session-Token", str(TOKEN)),),
    *,
    method: str = "GET",
    path: str = RPC_PATH,
    upgrade: str | None = "yamux",
) -> bytes:
    lines = [f"{method} {path}{'?' + query if query else ''} HTTP/1.1", "Host: agentd"]
    if upgrade is not None:
        lines += ["Connection: Upgrade", f"Upgrade: {upgrade}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def parse_answer(data: bytes) -> Answer:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return Answer(status, headers, body)


Hold = Callable[[Upgraded[Agent]], Awaitable[None]]


class FakeSessions:
    """The daemon's sessions as the agent route sees them: the token lookup, and `serve`, which here
    records the upgrade and runs `hold` on it (the transport closes when `serve` returns)."""

    def __init__(self, lookup: FakeLookup, hold: Hold | None = None) -> None:
        self.lookup = lookup
        self.hold = hold
        self.upgraded: list[Upgraded[Agent]] = []

    async def serve(self, upgraded: Upgraded[Agent]) -> None:
        self.upgraded.append(upgraded)
        if self.hold is not None:
            await self.hold(upgraded)


def front_door(
    lookup: FakeLookup | None = None,
    hold: Hold | None = None,
    *,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    max_head_bytes: int | None = None,
) -> tuple[HttpApp, FakeSessions]:
    """The daemon's HTTP app with its agent route (agentd.daemon.build_router's), over FakeSessions."""
    sessions = FakeSessions(FakeLookup() if lookup is None else lookup, hold)
    router = Router()
    router.add(RPC_PATH, AgentRpcRoute(sessions, handshake_timeout).handle, methods=("GET",))  # type: ignore[arg-type]
    app = HttpApp(router) if max_head_bytes is None else HttpApp(router, max_head_bytes=max_head_bytes)
    return app, sessions


async def exchange(
    data: bytes, lookup: FakeLookup | None = None, *, max_head_bytes: int | None = None
) -> tuple[Upgraded[Agent] | None, Answer | None]:
    """Send `data` to the front door; return the upgrade (if any) and, for refusals, the parsed answer."""
    client, server = trio.testing.memory_stream_pair()
    app, sessions = front_door(lookup, max_head_bytes=max_head_bytes)
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app.handle_connection, server)
        await client.send_all(data)
        while chunk := await client.receive_some():
            received += chunk
        await client.aclose()
    if sessions.upgraded:
        return sessions.upgraded[0], None
    return None, parse_answer(bytes(received)) if received else None


async def serve_one(
    server: trio.abc.Stream, lookup: FakeLookup | None = None, hold: Hold | None = None
) -> None:
    """Serve one connection through the front door (for tests that drive the client side)."""
    app, _ = front_door(lookup, hold)
    await app.handle_connection(server)


# ---- every refusal of spec §2.1 -------------------------------------------------------------------

NOT_AUTHORIZED = (
    b'{"message":"Workspace agent not authorized.","detail":"The agent cannot authenticate until the '
    b'workspace provision job has been completed. If the job is no longer running, this agent is invalid."}\n'
)


@pytest.mark.parametrize(
    ("data", "lookup", "status", "body"),
    [
        pytest.param(
            raw_request(headers=()),
            FakeLookup(),
            401,
            b'{"message":"Cookie \\"coder_session_token\\" must be provided."}\n',
            id="no-token",
        ),
        pytest.param(
            raw_request(headers=[("Coder-Session-Token", "abc")]),
            FakeLookup(),
            401,
            b'{"message":"Workspace agent token invalid.",'
            b'"detail":"An agent token must be a valid UUIDv4. (len 3)"}\n',
            id="token-not-uuid",
        ),
        pytest.param(raw_request(), FakeLookup(agents={}), 401, NOT_AUTHORIZED, id="unknown-token"),
        pytest.param(
            raw_request(),
            FakeLookup(error=RuntimeError("connection refused")),
            500,
            b'{"message":"Internal error checking workspace agent authorization.",'
            b'"detail":"connection refused"}\n',
            id="lookup-db-error",
        ),
        pytest.param(
            raw_request("version=2.11"),
            FakeLookup(),
            400,
            b'{"message":"Unknown or unsupported API version","validations":[{"field":"version",'
            b'"detail":"server is at version 2.10, behind requested minor version 2.11"}]}\n',
            id="bad-version",
        ),
        pytest.param(
            raw_request(),
            FakeLookup(error=HttpError(400, "Internal error fetching workspace.", "no rows")),
            400,
            b'{"message":"Internal error fetching workspace.","detail":"no rows"}\n',
            id="workspace-fetch-fails",
        ),
        pytest.param(
            raw_request(upgrade=None),
            FakeLookup(),
            400,
            b'{"message":"Failed to accept websocket.","detail":"WebSocket protocol violation: '
            b'Connection header \\"\\" does not contain Upgrade"}\n',
            id="no-upgrade",
        ),
        pytest.param(
            raw_request(upgrade="websocket", headers=[("Coder-Session-Token", str(TOKEN))]),
            FakeLookup(),
            400,
            b'{"message":"Failed to accept websocket.","detail":"unsupported WebSocket protocol version '
            b'(only 13 is supported): \\"\\""}\n',
            id="websocket-accept-fails",
        ),
    ],
)
async def test_refusals_answer_coderd_status_and_body(
    data: bytes, lookup: FakeLookup, status: int, body: bytes
) -> None:
    upgraded, answer = await exchange(data, lookup)
    assert upgraded is None
    assert answer is not None
    assert answer.status == status
    assert answer.body == body
    assert answer.headers["content-length"] == str(len(body))
    assert answer.headers["connection"] == "close"
    assert answer.headers["content-type"] == "application/json; charset=utf-8"


async def test_refusal_closes_the_connection(autojump_clock: trio.testing.MockClock) -> None:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(raw_request(headers=()) + YAMUX_SYN)  # unread yamux bytes must not matter
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, server)
        data = bytearray()
        while chunk := await client.receive_some():
            data += chunk
    assert parse_answer(bytes(data)).status == 401
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"x")


async def test_token_is_checked_before_version_like_coderd_middleware() -> None:
    lookup = FakeLookup(agents={})
    _, answer = await exchange(raw_request("version=9.9"), lookup)
    assert answer is not None and answer.status == 401
    lookup = FakeLookup()
    _, answer = await exchange(raw_request("version=9.9", headers=[("Coder-Session-Token", "x")]), lookup)
    assert answer is not None and answer.status == 401
    assert lookup.calls == []  # malformed tokens never reach the database


async def test_go_json_escaping_of_details() -> None:
    _, answer = await exchange(raw_request("version=%3Cb%3E%262"))
    assert answer is not None and answer.status == 400
    assert b"\\u003cb\\u003e\\u00262" in answer.body
    assert json.loads(answer.body)["validations"][0]["detail"] == "invalid version string: <b>&2"


# ---- token sources and precedence ------------------------------------------------------------------

TOKENS = {name: uuid.uuid4() for name in ("cookie", "query", "header", "bearer", "access")}
AGENTS = {token: Agent(name) for name, token in TOKENS.items()}


def sources(*names: str) -> tuple[str, list[tuple[str, str]]]:
    query = ["version=2.10"]
    headers: list[tuple[str, str]] = []
    if "cookie" in names:
        headers.append(("Cookie", f"theme=dark; coder_session_token={TOKENS['cookie']}"))
    if "query" in names:
        query.append(f"coder_session_token={TOKENS['query']}")
    if "header" in names:
        headers.append(("Coder-Session-Token", str(TOKENS["header"])))
    if "bearer" in names:
        headers.append(("Authorization", f"Bearer {TOKENS['bearer']}"))
    if "access" in names:
        query.append(f"access_token={TOKENS['access']}")
    return "&".join(query), headers


ORDER = ["cookie", "query", "header", "bearer", "access"]


@pytest.mark.parametrize("first", range(len(ORDER)))
async def test_token_precedence(first: int) -> None:
    query, headers = sources(*ORDER[first:])
    outcome, _ = await exchange(raw_request(query, headers), FakeLookup(AGENTS))
    assert isinstance(outcome, Upgraded)
    assert outcome.agent == Agent(ORDER[first])
    assert outcome.token == TOKENS[ORDER[first]]


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        ([("Authorization", f"bEaReR {TOKENS['bearer']}")], "", "bearer"),
        ([("Authorization", f"Basic {TOKENS['bearer']}")], f"access_token={TOKENS['access']}", "access"),
        # an empty higher-precedence value falls through to the next source
        ([("Cookie", "coder_session_token="), ("Coder-Session-Token", str(TOKENS["header"]))], "", "header"),
        ([("Cookie", f'coder_session_token="{TOKENS["cookie"]}"')], "", "cookie"),
        ([("Cookie", "a=1"), ("Cookie", f"coder_session_token={TOKENS['cookie']}")], "", "cookie"),
    ],
)
async def test_token_source_details(headers: list[tuple[str, str]], query: str, expected: str) -> None:
    outcome, _ = await exchange(
        raw_request("&".join(filter(None, ["version=2.0", query])), headers), FakeLookup(AGENTS)
    )
    assert isinstance(outcome, Upgraded)
    assert outcome.agent == Agent(expected)


async def test_basic_auth_alone_is_no_token() -> None:
    _, answer = await exchange(raw_request(headers=[("Authorization", f"Basic {TOKEN}")]))
    assert answer is not None and answer.status == 401
    assert json.loads(answer.body)["message"] == 'Cookie "coder_session_token" must be provided.'


@pytest.mark.parametrize(
    "text",
    [
        str(TOKEN),
        str(TOKEN).upper(),
        TOKEN.hex,
        "{" + str(TOKEN) + "}",
        "urn:uuid:" + str(TOKEN),
        "URN:UUID:" + str(TOKEN),
    ],
)
def test_uuid_forms_go_accepts(text: str) -> None:
    assert parse_go_uuid(text.encode()) == TOKEN


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        str(TOKEN)[:-1],
        str(TOKEN).replace("-", "_"),
        "x" * 32,
        "urn:uuix:" + str(TOKEN),
        str(TOKEN) + " ",
    ],
)
def test_uuid_forms_go_refuses(text: str) -> None:
    assert parse_go_uuid(text.encode()) is None


# ---- versions and role -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2.0", ApiVersion(2, 0)),
        ("2.10", ApiVersion(2, 10)),
        ("2.7", ApiVersion(2, 7)),
        ("", ApiVersion(2, 0)),
    ],
)
def test_accepted_versions(raw: str, expected: ApiVersion) -> None:
    assert validate_version(raw) == expected


def test_missing_version_is_2_0() -> None:
    assert validate_version(None) == ApiVersion(2, 0)


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        ("2.11", "server is at version 2.10, behind requested minor version 2.11"),
        ("3.0", "server is at version 2.10, behind requested major version 3.0"),
        ("1.9", "version 1.9 is no longer supported"),
        ("abc", "invalid version string: abc"),
        ("2", "invalid version string: 2"),
        ("2.1.0", "invalid version string: 2.1.0"),
        ("x.1", "invalid major version: x.1"),
        ("2.x", "invalid minor version: 2.x"),
        ("2.", "invalid minor version: 2."),
    ],
)
def test_refused_versions(raw: str, detail: str) -> None:
    with pytest.raises(HttpError) as info:
        validate_version(raw)
    assert info.value.status == 400
    assert info.value.message == "Unknown or unsupported API version"
    assert info.value.validations == (("version", detail),)


@pytest.mark.parametrize(
    ("query", "status", "version", "version_string"),
    [
        ("version=2.0", 101, ApiVersion(2, 0), "2.0"),
        ("version=2.10", 101, ApiVersion(2, 10), "2.10"),
        ("", 101, ApiVersion(2, 0), "2.0"),
        ("version=", 101, ApiVersion(2, 0), "2.0"),
        ("version=2.11", 400, None, None),
        ("version=3.0", 400, None, None),
        ("version=1.9", 400, None, None),
        ("version=abc", 400, None, None),
    ],
)
async def test_version_matrix_end_to_end(
    query: str, status: int, version: ApiVersion | None, version_string: str | None
) -> None:
    outcome, answer = await exchange(raw_request(query))
    if status == 101:
        assert isinstance(outcome, Upgraded)
        assert (outcome.version, outcome.version_string) == (version, version_string)
    else:
        assert answer is not None and answer.status == 400
        assert json.loads(answer.body)["validations"][0]["field"] == "version"


@pytest.mark.parametrize(
    ("query", "role", "monitoring"),
    [
        ("role=agent", "agent", True),
        ("role=", "", True),
        ("", "", True),
        ("role=log-sidecar", "log-sidecar", False),
    ],
)
async def test_role_decides_monitoring(query: str, role: str, monitoring: bool) -> None:
    outcome, _ = await exchange(raw_request("&".join(filter(None, ["version=2.10", query]))))
    assert isinstance(outcome, Upgraded)
    assert (outcome.role, outcome.monitoring) == (role, monitoring)


# ---- routing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/healthz"),
        ("POST", RPC_PATH),
        ("GET", RPC_PATH + "/"),
        ("HEAD", RPC_PATH),
        ("GET", "/metrics"),
        ("GET", "/api/v2/workspaceagents/%6De/rpc"),
    ],
)
async def test_other_requests_never_reach_the_handshake(method: str, path: str) -> None:
    lookup = FakeLookup()
    upgraded, answer = await exchange(raw_request(method=method, path=path) + b"extra", lookup)
    assert upgraded is None
    assert answer is not None and answer.status == (405 if path == RPC_PATH else 404)
    assert lookup.calls == []


async def test_absolute_form_target_is_routed() -> None:
    data = raw_request(path="http://agentd" + RPC_PATH)
    upgraded, _ = await exchange(data)
    assert isinstance(upgraded, Upgraded)


# ---- raw yamux upgrade -----------------------------------------------------------------------------


async def test_yamux_upgrade_keeps_bytes_sent_with_the_head() -> None:
    """Part H item 1: the first yamux frame arrives in the same read as the end of the headers."""
    client, server = trio.testing.memory_stream_pair()
    first_request = bytes.fromhex("0000000000000001" + "00000005") + b"hello"
    await client.send_all(raw_request() + YAMUX_SYN + first_request)

    async def hold(outcome: Upgraded[Agent]) -> None:
        assert outcome.protocol is Upgrade.YAMUX
        assert isinstance(outcome.transport, PrefixedStream)
        assert outcome.agent == AGENT
        assert (outcome.version, outcome.role, outcome.monitoring) == (ApiVersion(2, 10), "agent", True)
        got = bytearray()
        got += await outcome.transport.receive_some(5)
        assert got == YAMUX_SYN[:5]
        while len(got) < 12 + len(first_request):
            got += await outcome.transport.receive_some()
        assert got == YAMUX_SYN + first_request
        answer = await client.receive_some()
        assert answer == b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: yamux\r\n\r\n"
        await client.send_all(b"later")
        assert await outcome.transport.receive_some() == b"later"
        await outcome.transport.send_all(b"from server")
        assert await client.receive_some() == b"from server"

    app, sessions = front_door(hold=hold)
    await app.handle_connection(server)
    assert len(sessions.upgraded) == 1


async def test_yamux_upgrade_without_trailing_bytes_returns_the_stream_itself() -> None:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(raw_request())
    app, sessions = front_door()
    await app.handle_connection(server)
    assert sessions.upgraded[0].transport is server


async def test_upgrade_client_yamux_round_trip() -> None:
    client, server = trio.testing.memory_stream_pair()

    async def hold(outcome: Upgraded[Agent]) -> None:
        # The server's first bytes go out in the same write as the 101's tail would on a socket.
        await outcome.transport.send_all(b"server-first")
        assert await outcome.transport.receive_some() == YAMUX_SYN

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, server, None, hold)
        transport = await upgrade_client(client, token=TOKEN)
        await transport.send_all(YAMUX_SYN)
        assert await transport.receive_some() == b"server-first"


async def test_upgrade_client_keeps_bytes_after_the_101() -> None:
    client, server = trio.testing.memory_stream_pair()

    async def eager_route(request: Request) -> None:
        assert request.method == "GET"
        request.responded = True
        await request.stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: yamux\r\n\r\n" + YAMUX_SYN
        )

    router = Router()
    router.add(RPC_PATH, eager_route, methods=("GET",))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(HttpApp(router).handle_connection, server)
        transport = await upgrade_client(client, token=TOKEN)
    assert isinstance(transport, PrefixedStream)
    assert await transport.receive_some() == YAMUX_SYN


@pytest.mark.parametrize("websocket", [False, True])
async def test_upgrade_client_raises_status_and_message(
    websocket: bool, autojump_clock: trio.testing.MockClock
) -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, server, FakeLookup(agents={}))
        with pytest.raises(UpgradeError) as info:
            await upgrade_client(client, token=TOKEN, websocket=websocket)
        await client.aclose()
    assert info.value.status == 401
    assert info.value.message == "Workspace agent not authorized."
    assert "provision job" in info.value.detail
    assert "HTTP 401: Workspace agent not authorized." in str(info.value)


async def test_upgrade_client_version_refusal(autojump_clock: trio.testing.MockClock) -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, server)
        with pytest.raises(UpgradeError) as info:
            await upgrade_client(client, token=TOKEN, version="3.0")
        await client.aclose()
    assert info.value.status == 400
    assert info.value.detail == "version: server is at version 2.10, behind requested major version 3.0"


# ---- WebSocket upgrade -----------------------------------------------------------------------------


async def websocket_round_trip(client: trio.abc.Stream, server: trio.abc.Stream) -> None:
    clients: list[trio.abc.Stream] = []
    connected = trio.Event()

    async def hold(upgraded: Upgraded[Agent]) -> None:
        await connected.wait()
        await _websocket_round_trip(upgraded, clients[0])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, server, None, hold)
        clients.append(await upgrade_client(client, token=TOKEN, websocket=True, version=None, role=None))
        connected.set()


async def _websocket_round_trip(upgraded: Upgraded[Agent], transport: trio.abc.Stream) -> None:
    assert upgraded.protocol is Upgrade.WEBSOCKET
    assert (upgraded.version, upgraded.version_string, upgraded.monitoring) == (ApiVersion(2, 0), "2.0", True)
    assert isinstance(upgraded.transport, WebSocketByteStream)
    assert isinstance(transport, WebSocketByteStream)

    # Go's framing: header and body of a yamux data frame as two messages.
    body = b"\x05\x01\x01\x00"
    await transport.send_all(bytes.fromhex("000000000000000100000004"))
    await transport.send_all(body)
    got = bytearray()
    while len(got) < 16:
        got += await upgraded.transport.receive_some()
    assert got == bytes.fromhex("000000000000000100000004") + body
    big = bytes(range(256)) * 1024
    async with trio.open_nursery() as nursery:
        nursery.start_soon(upgraded.transport.send_all, big)
        back = bytearray()
        while len(back) < len(big):
            back += await transport.receive_some()
    assert back == big
    await transport.aclose()
    assert await upgraded.transport.receive_some() == b""
    await upgraded.transport.aclose()


async def test_websocket_upgrade_over_memory_streams() -> None:
    await websocket_round_trip(*trio.testing.memory_stream_pair())


async def test_websocket_upgrade_over_a_real_socketpair() -> None:
    a, b = trio.socket.socketpair()
    await websocket_round_trip(trio.SocketStream(a), trio.SocketStream(b))


async def test_websocket_frames_sent_with_the_head_are_kept() -> None:
    """An independent client (wsproto's own handshake) that pipelines a message behind its request."""
    client, server = trio.testing.memory_stream_pair()
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    request = ws.send(
        wsproto.events.Request(
            host="agentd",
            target=RPC_PATH + "?version=2.10&role=agent",
            extra_headers=[(b"coder-session-token", str(TOKEN).encode())],
        )
    )
    masked = wsproto.connection.Connection(wsproto.ConnectionType.CLIENT).send(
        wsproto.events.Message(data=YAMUX_SYN)
    )
    await client.send_all(request + masked)

    async def hold(outcome: Upgraded[Agent]) -> None:
        assert await outcome.transport.receive_some() == YAMUX_SYN
        ws.receive_data(bytes(await client.receive_some()))
        events = list(ws.events())
        assert isinstance(events[0], wsproto.events.AcceptConnection)

    app, sessions = front_door(hold=hold)
    await app.handle_connection(server)
    assert len(sessions.upgraded) == 1


# ---- bounds (the front door's: agentd.http) ----------------------------------------------------------


async def test_oversized_head_gets_431_json() -> None:
    data = raw_request(headers=[("X-Filler", "a" * 20000), ("Coder-Session-Token", str(TOKEN))])
    upgraded, answer = await exchange(data)
    assert upgraded is None
    assert answer is not None and answer.status == 431
    assert json.loads(answer.body)["message"] == "Request header fields too large."


async def test_oversized_head_arriving_in_one_piece_gets_431() -> None:
    data = raw_request(headers=[("X-Filler", "a" * 17000)])
    upgraded, answer = await exchange(data, max_head_bytes=16384)
    assert upgraded is None
    assert answer is not None and answer.status == 431


async def test_malformed_head_gets_400_json() -> None:
    upgraded, answer = await exchange(b"GET /api HTTP/1.1\r\nno colon here\r\n\r\n")
    assert upgraded is None
    assert answer is not None and answer.status == 400
    assert json.loads(answer.body)["message"] == "Malformed HTTP request."


async def test_slow_client_gets_408_after_10_seconds(autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    upgraded, answer = await exchange(raw_request()[:30])
    assert upgraded is None
    assert answer is not None and answer.status == 408
    assert trio.current_time() - start == pytest.approx(10.0)


async def test_silent_client_gets_408_after_10_seconds(autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    upgraded, answer = await exchange(b"")
    assert upgraded is None
    assert answer is not None and answer.status == 408
    assert trio.current_time() - start == pytest.approx(10.0)


async def test_trickling_client_is_bounded_by_the_head_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    data = raw_request()
    app, sessions = front_door()
    received = bytearray()

    async def trickle() -> None:
        for i in range(len(data)):
            await client.send_all(data[i : i + 1])
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        start = trio.current_time()
        await app.handle_connection(server)
        assert trio.current_time() - start <= 10.0 + LINGER_SECONDS + 1e-6
        nursery.cancel_scope.cancel()
    while chunk := await client.receive_some():
        received += chunk
    assert parse_answer(bytes(received)).status == 408
    assert sessions.upgraded == []


async def test_slow_lookup_is_bounded_by_the_handshake_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The head arrived at once; the lookup and upgrade then get HANDSHAKE_TIMEOUT of their own."""

    class SlowLookup(FakeLookup):
        async def __call__(self, token: uuid.UUID) -> Agent | None:
            await trio.sleep(60)
            return AGENT

    start = trio.current_time()
    upgraded, answer = await exchange(raw_request(), SlowLookup())
    assert (upgraded, answer) == (None, None)  # closed without an answer
    assert trio.current_time() - start == pytest.approx(HANDSHAKE_TIMEOUT)


async def test_client_leaving_before_a_request_is_closed() -> None:
    client, server = trio.testing.memory_stream_pair()
    await client.aclose()
    app, sessions = front_door()
    await app.handle_connection(server)
    assert sessions.upgraded == []
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"x")
