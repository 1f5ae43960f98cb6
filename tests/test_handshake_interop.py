"""Go's net/http client against the daemon's front door (agentd.http + the agent route): our 101 and
our JSON refusals parse the way Go reads them.

Skipped when Go is missing, unless AGENTD_REQUIRE_INTEROP=1 (then missing Go is a failure).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import trio

from agentd.daemon import AgentRpcRoute
from agentd.handshake import RPC_PATH, Upgraded
from agentd.http import HttpApp, Router
from tests import gopeer

pytestmark = pytest.mark.interop

TOKEN = uuid.UUID("6f1b8f5e-3c55-4e0e-9f0e-4a4c7f2f9d11")
YAMUX_SYN = bytes.fromhex("000100010000000100000000")
YAMUX_ACK = bytes.fromhex("000100020000000100000000")


@pytest.fixture(scope="module")
def go_client() -> Path:
    """Go's net/http client (interop/gohttpupgrade), built like the yamux peer: skips without Go,
    fails under AGENTD_REQUIRE_INTEROP=1."""
    return gopeer.require(gopeer.build_go_program, "gohttpupgrade")


class Recording(trio.abc.HalfCloseableStream):
    """A socket stream that keeps a copy of what the server sends."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.sent = bytearray()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += data
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Sessions:
    def __init__(self) -> None:
        self.upgraded: list[Upgraded[str]] = []

    async def lookup(self, candidate: uuid.UUID) -> str | None:
        await trio.lowlevel.checkpoint()
        return "agent" if candidate == TOKEN else None

    async def serve(self, upgraded: Upgraded[str]) -> None:
        self.upgraded.append(upgraded)
        got = b""
        while len(got) < 12:
            got += await upgraded.transport.receive_some()
        assert got == YAMUX_SYN
        await upgraded.transport.send_all(YAMUX_ACK)


async def run_against_server(binary: Path, token: str, query: str) -> tuple[str, list[Upgraded[str]], bytes]:
    """Go's client against one connection of the front door: its output, the upgrades, our answer."""
    sessions = Sessions()
    router = Router()
    router.add(RPC_PATH, AgentRpcRoute(sessions).handle, methods=("GET",))  # type: ignore[arg-type]
    app = HttpApp(router)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    streams: list[Recording] = []

    async def serve_one() -> None:
        stream = Recording(await listeners[0].accept())
        streams.append(stream)
        await app.handle_connection(stream)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_one)
            result = await trio.run_process(
                [str(binary), f"http://127.0.0.1:{port}{RPC_PATH}?{query}", token],
                capture_stdout=True,
                check=False,
            )
    await listeners[0].aclose()
    return result.stdout.decode().strip(), sessions.upgraded, bytes(streams[0].sent)


async def test_go_client_upgrades_to_raw_yamux(go_client: Path) -> None:
    out, outcomes, _ = await run_against_server(go_client, str(TOKEN), "version=2.10&role=agent")
    assert out == "SWITCHED yamux " + YAMUX_ACK.hex()
    assert isinstance(outcomes[0], Upgraded)


@pytest.mark.parametrize(
    ("token", "query", "expected"),
    [
        (
            str(uuid.uuid4()),
            "version=2.10",
            "STATUS 401 {n}|Workspace agent not authorized.|The agent cannot",
        ),
        ("", "version=2.10", 'STATUS 401 {n}|Cookie "coder_session_token" must be provided.||0'),
        (str(TOKEN), "version=2.11", "STATUS 400 {n}|Unknown or unsupported API version||1"),
    ],
)
async def test_go_client_reads_refusals(go_client: Path, token: str, query: str, expected: str) -> None:
    out, outcomes, sent = await run_against_server(go_client, token, query)
    assert outcomes == []
    length = len(sent.partition(b"\r\n\r\n")[2])
    assert length > 0
    assert out.startswith(expected.format(n=length))
