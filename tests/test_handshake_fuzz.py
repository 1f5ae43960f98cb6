"""Hypothesis: whatever bytes a client sends, the handshake answers with its documented results only."""

from __future__ import annotations

import uuid

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentd.handshake import (
    RPC_PATH,
    Closed,
    HttpError,
    NotMine,
    Rejected,
    RequestHeadParser,
    Upgraded,
    accept_agent,
    check_token,
    check_upgrade,
    parse_rpc_request,
    validate_version,
)

TOKEN = uuid.UUID("6f1b8f5e-3c55-4e0e-9f0e-4a4c7f2f9d11")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_pipeline(chunks: list[bytes]) -> None:
    """Parser then every pure check; only HttpError (or EOF-before-anything) may escape."""
    parser = RequestHeadParser(max_bytes=2048)
    head = None
    try:
        for chunk in [*chunks, b""]:
            head = parser.feed(chunk)
            if head is not None:
                break
    except HttpError as error:
        assert error.status in (400, 431)
        assert error.response().startswith(f"HTTP/1.1 {error.status} ".encode())
        return
    except trio.BrokenResourceError:
        assert not b"".join(chunks)
        return
    assert head is not None
    request = parse_rpc_request(head)
    if request is None:
        return
    try:
        check_token(request)
        validate_version(request.version)
        check_upgrade(request)
    except HttpError as error:
        assert error.status in (400, 401)
        error.response()


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


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(requests(), st.binary(max_size=400)))
def test_accept_agent_never_raises_for_client_input(data: bytes) -> None:
    async def lookup(token: uuid.UUID) -> str | None:
        await trio.lowlevel.checkpoint()
        return "agent" if token == TOKEN else None

    async def scenario() -> None:
        client, server = trio.testing.memory_stream_pair()
        await client.send_all(data)
        await client.send_eof()
        outcome = await accept_agent(server, lookup=lookup)
        assert isinstance(outcome, NotMine | Rejected | Closed | Upgraded)
        if isinstance(outcome, Upgraded):
            assert outcome.agent == "agent"
            await outcome.transport.aclose()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
