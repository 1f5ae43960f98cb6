"""Hypothesis: whatever bytes a client sends, the handshake answers with its documented results only."""

from __future__ import annotations

import uuid

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentd.daemon import AgentRpcRoute
from agentd.handshake import RPC_PATH, Upgraded
from agentd.http import HttpApp, Router

TOKEN = uuid.UUID("6f1b8f5e-3c55-4e0e-9f0e-4a4c7f2f9d11")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: every status the front door and the handshake may answer with
ANSWERS = {101, 400, 401, 404, 405, 408, 431, 505}


class Sessions:
    """The daemon's sessions as the agent route sees them: a token lookup, and `serve` (records)."""

    def __init__(self) -> None:
        self.upgraded: list[Upgraded[str]] = []

    async def lookup(self, token: uuid.UUID) -> str | None:
        await trio.lowlevel.checkpoint()
        return "agent" if token == TOKEN else None

    async def serve(self, upgraded: Upgraded[str]) -> None:
        self.upgraded.append(upgraded)


def run_pipeline(chunks: list[bytes], *, max_head_bytes: int = 2048) -> None:
    """The daemon's front door (agentd.http + the agent route) on `chunks` then EOF: it never raises,
    and whatever it answers is one complete status line of the documented set."""

    async def scenario() -> None:
        sessions = Sessions()
        router = Router()
        router.add(RPC_PATH, AgentRpcRoute(sessions).handle, methods=("GET",))  # type: ignore[arg-type]
        app = HttpApp(router, max_head_bytes=max_head_bytes)
        client, server = trio.testing.memory_stream_pair()
        for chunk in chunks:
            await client.send_all(chunk)
        await client.send_eof()
        await app.handle_connection(server)
        answer = bytearray()
        while data := await client.receive_some():
            answer += data
        if not answer:
            return  # nothing sent, or a client gone / too slow in the handshake
        status = int(answer.split(b" ", 2)[1])
        assert answer.startswith(f"HTTP/1.1 {status} ".encode())
        assert status in ANSWERS
        assert (status == 101) == bool(sessions.upgraded)
        for upgraded in sessions.upgraded:
            assert upgraded.agent == "agent"

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


@FUZZ
@given(st.lists(st.binary(min_size=1, max_size=300), max_size=8))
def test_random_bytes_only_yield_http_errors(chunks: list[bytes]) -> None:
    run_pipeline(chunks)


token_values = st.one_of(
    st.just(str(TOKEN)),
    st.just(TOKEN.hex),
    st.text(alphabet='0123456789abcdef-{}urn:UID%+ \t"', max_size=50),
)
query_pair = st.tuples(
    st.sampled_from(["version", "role", "coder_session_token", "access_token", "x", "version;"]),
    st.one_of(token_values, st.text(alphabet="0123456789.+-%abcx2;&=", max_size=12)),
)
header = st.tuples(
    st.sampled_from(
        [
            "Coder-Session-Token",
            "Authorization",
            "Cookie",
            "Connection",
            "Upgrade",
            "Sec-WebSocket-Key",
            "Sec-WebSocket-Version",
            "X-Other",
        ]
    ),
    st.one_of(
        token_values,
        st.sampled_from(["Upgrade", "yamux", "websocket", "13", "dGhlIHNhbXBsZSBub25jZQ==", "Bearer "]),
        st.builds(lambda t: "Bearer " + t, token_values),
        st.builds(lambda t: "coder_session_token=" + t, token_values),
        st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=40),
    ),
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["GET", "GET", "POST", "get"]))
    path = draw(st.sampled_from([RPC_PATH, RPC_PATH, "/healthz", "/api/v2/workspaceagents/%6De/rpc", "*"]))
    query = "&".join(f"{k}={v}" for k, v in draw(st.lists(query_pair, max_size=5)))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2"]))
    lines = [f"{method} {path}{'?' + query if query else ''} {version}", "Host: agentd"]
    lines += draw(
        st.sampled_from(
            [
                [],
                [f"Coder-Session-Token: {TOKEN}", "Connection: Upgrade", "Upgrade: yamux"],
                [
                    f"Coder-Session-Token: {TOKEN}",
                    "Connection: keep-alive, Upgrade",
                    "Upgrade: websocket",
                    "Sec-WebSocket-Version: 13",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                ],
            ]
        )
    )
    lines += [f"{k}: {v}" for k, v in draw(st.lists(header, max_size=8))]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + draw(st.binary(max_size=20))


@FUZZ
@given(requests(), st.integers(min_value=1, max_value=64))
def test_structured_requests_only_yield_http_errors(data: bytes, chunk: int) -> None:
    run_pipeline([data[i : i + chunk] for i in range(0, len(data), chunk)])
