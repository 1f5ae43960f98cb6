"""Upgrade and authentication of `GET /api/v2/workspaceagents/me/rpc` (spec/agent-api.md §2.1-2.3, §3).

The request head is read by the daemon's HTTP front door (agentd.http, the only reader), which
routes `GET RPC_PATH` here:

* `handle_rpc_request` - given that `Request`, decide: refused (`Rejected`: Coder's status + JSON
  body written), gone (`Closed`) or `Upgraded` (101 written; the transport stream, the
  authenticated agent, version and role). The checks run in coderd's order - token source and
  format (401), token lookup (401/500), `version` (400), then the upgrade itself (400) - each a
  pure function raising `agentd.http.HttpError`.
* `upgrade_client` - the client side (agent SDK, tests): raw yamux or WebSocket.

The token lookup is injected: `lookup(token) -> agent | None`. It may raise `HttpError` to answer
with a specific status (e.g. 400 "Internal error fetching workspace."); any other exception is
answered like coderd's database errors: 500 "Internal error checking workspace agent authorization.".
"""

from __future__ import annotations

import enum
import logging
import operator
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar
from urllib.parse import urlencode

import attrs
import trio

from agentd.http import HttpError, Request, first_value
from agentd.websocket import (
    MAX_MESSAGE_SIZE,
    UpgradeError,
    WebSocketByteStream,
    check_websocket_request,
    connect_websocket,
    request_upgrade,
    websocket_accept_response,
)

__all__ = [
    "CURRENT_VERSION",
    "HANDSHAKE_TIMEOUT",
    "RPC_PATH",
    "ApiVersion",
    "Closed",
    "Lookup",
    "Outcome",
    "PrefixedStream",
    "Rejected",
    "RpcRequest",
    "Upgrade",
    "UpgradeError",
    "Upgraded",
    "check_token",
    "check_upgrade",
    "extract_token",
    "handle_rpc_request",
    "parse_go_uuid",
    "parse_rpc_request",
    "upgrade_client",
    "validate_version",
]

log = logging.getLogger(__name__)

RPC_PATH = "/api/v2/workspaceagents/me/rpc"
SESSION_TOKEN_COOKIE = b"coder_session_token"
SESSION_TOKEN_HEADER = b"coder-session-token"
#: Bound on the token lookup and the upgrade, after the head was read (agentd.http.HEAD_TIMEOUT);
#: also the client's bound on the whole upgrade.
HANDSHAKE_TIMEOUT = 10.0
YAMUX_SWITCH_RESPONSE = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: yamux\r\n\r\n"

A = TypeVar("A")


# ---- refusals ------------------------------------------------------------------------------------


def _no_token() -> HttpError:
    return HttpError(401, 'Cookie "coder_session_token" must be provided.')


def _bad_token(raw: bytes) -> HttpError:
    return HttpError(
        401, "Workspace agent token invalid.", f"An agent token must be a valid UUIDv4. (len {len(raw)})"
    )


def _unknown_agent() -> HttpError:
    return HttpError(
        401,
        "Workspace agent not authorized.",
        "The agent cannot authenticate until the workspace provision job has been completed. "
        "If the job is no longer running, this agent is invalid.",
    )


def _lookup_failed(exc: BaseException) -> HttpError:
    return HttpError(500, "Internal error checking workspace agent authorization.", str(exc))


def _bad_version(detail: str) -> HttpError:
    return HttpError(400, "Unknown or unsupported API version", validations=[("version", detail)])


def _ws_accept_failed(detail: str) -> HttpError:
    return HttpError(400, "Failed to accept websocket.", detail)


# ---- the pure checks -----------------------------------------------------------------------------


@attrs.frozen(order=True)
class ApiVersion:
    major: int
    minor: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


CURRENT_VERSION = ApiVersion(2, 10)
_GO_ATOI = re.compile(rb"[+-]?[0-9]+")
_INT64_MAX = (1 << 63) - 1


def _go_atoi(raw: bytes) -> int | None:
    """Go's strconv.Atoi: optional sign, ASCII digits, int64 range."""
    if not _GO_ATOI.fullmatch(raw):
        return None
    value = int(raw)
    return value if -_INT64_MAX - 1 <= value <= _INT64_MAX else None


def validate_version(raw: bytes | str | None) -> ApiVersion:
    """Parse and check a requested `major.minor` (coder apiversion.Validate); missing/empty = 2.0.

    Raises HttpError 400 "Unknown or unsupported API version" with coderd's validation detail.
    """
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    if not raw:
        raw = b"2.0"
    shown = raw.decode("utf-8", "replace")
    parts = raw.split(b".")
    if len(parts) != 2:
        raise _bad_version(f"invalid version string: {shown}")
    major = _go_atoi(parts[0])
    if major is None:
        raise _bad_version(f"invalid major version: {shown}")
    minor = _go_atoi(parts[1])
    if minor is None:
        raise _bad_version(f"invalid minor version: {shown}")
    cur = CURRENT_VERSION
    if major > cur.major:
        raise _bad_version(f"server is at version {cur}, behind requested major version {shown}")
    if major == cur.major:
        if minor > cur.minor:
            raise _bad_version(f"server is at version {cur}, behind requested minor version {shown}")
        return ApiVersion(major, minor)
    raise _bad_version(f"version {shown} is no longer supported")


_HEX = frozenset(b"0123456789abcdefABCDEF")


def parse_go_uuid(raw: bytes) -> uuid.UUID | None:
    """google/uuid.Parse: 36-char canonical, `urn:uuid:` prefixed, 38 chars (first and last char
    dropped unchecked, as Go does), or 32 hex digits. None if invalid."""
    if len(raw) == 45:
        if raw[:9].lower() != b"urn:uuid:":
            return None
        raw = raw[9:]
    elif len(raw) == 38:
        raw = raw[1:37]
    elif len(raw) == 32:
        return uuid.UUID(hex=raw.decode("ascii")) if set(raw) <= _HEX else None
    if len(raw) != 36:
        return None
    if raw[8:9] != b"-" or raw[13:14] != b"-" or raw[18:19] != b"-" or raw[23:24] != b"-":
        return None
    digits = raw[0:8] + raw[9:13] + raw[14:18] + raw[19:23] + raw[24:36]
    if not set(digits) <= _HEX:
        return None
    return uuid.UUID(hex=digits.decode("ascii"))


_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _cookie(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes:
    """Value of the first valid cookie `name` across Cookie headers (Go's Request.Cookie), or b""."""
    for key, line in headers:
        if key != b"cookie":
            continue
        for part in line.split(b";"):
            part = part.strip(b" ")
            if not part:
                continue
            cname, _, value = part.partition(b"=")
            if not cname or not set(cname) <= _TCHAR:
                continue
            if len(value) > 1 and value[:1] == b'"' and value[-1:] == b'"':
                value = value[1:-1]
            if any(b < 0x20 or b >= 0x7F or b in b'";\\' for b in value):
                continue
            if cname == name:
                return value
    return b""


def extract_token(headers: Sequence[tuple[bytes, bytes]], query: Sequence[tuple[bytes, bytes]]) -> bytes:
    """The raw token, by coderd's precedence (b"" if none): cookie `coder_session_token`, query
    `coder_session_token`, header `Coder-Session-Token`, `Authorization: Bearer` (any case), query
    `access_token`. An empty value at one source falls through to the next."""
    for value in (
        _cookie(headers, SESSION_TOKEN_COOKIE),
        first_value(query, SESSION_TOKEN_COOKIE),
        first_value(headers, SESSION_TOKEN_HEADER),
    ):
        if value:
            return value
    auth = first_value(headers, b"authorization")
    if len(auth) > 7 and auth[:7].lower() == b"bearer ":
        return auth[7:]
    return first_value(query, b"access_token")


class Upgrade(enum.Enum):
    YAMUX = "yamux"
    WEBSOCKET = "websocket"


@attrs.frozen
class RpcRequest:
    """What `handle_rpc_request` takes from the agent RPC route's request."""

    request: Request
    token: bytes
    version: bytes
    role: str
    upgrade: Upgrade | None


def parse_rpc_request(request: Request) -> RpcRequest:
    """The token, version, role and offered upgrade of a request the router sent to RPC_PATH."""
    upgrade: Upgrade | None = None
    connection = [t.strip().lower() for k, v in request.headers if k == b"connection" for t in v.split(b",")]
    if b"upgrade" in connection:
        offered = [t.strip().lower() for k, v in request.headers if k == b"upgrade" for t in v.split(b",")]
        for proto in offered:
            if proto == b"yamux":
                upgrade = Upgrade.YAMUX
                break
            if proto == b"websocket":
                upgrade = Upgrade.WEBSOCKET
                break
    return RpcRequest(
        request=request,
        token=extract_token(request.headers, request.query),
        version=first_value(request.query, b"version"),
        role=first_value(request.query, b"role").decode("utf-8", "replace"),
        upgrade=upgrade,
    )


def check_token(request: RpcRequest) -> uuid.UUID:
    """The token as a UUID, or HttpError 401 (missing / not a UUID)."""
    if not request.token:
        raise _no_token()
    token = parse_go_uuid(request.token)
    if token is None:
        raise _bad_token(request.token)
    return token


def check_upgrade(request: RpcRequest) -> tuple[Upgrade, bytes]:
    """The upgrade to perform and its 101 response bytes, or HttpError 400 "Failed to accept websocket."."""
    if request.upgrade is Upgrade.YAMUX:
        return Upgrade.YAMUX, YAMUX_SWITCH_RESPONSE
    try:
        key = check_websocket_request(request.request.http_version, request.request.headers)
    except ValueError as exc:
        raise _ws_accept_failed(str(exc)) from None
    return Upgrade.WEBSOCKET, websocket_accept_response(key)


# ---- outcomes ------------------------------------------------------------------------------------


@attrs.frozen
class Rejected:
    """Refused: `error` was sent (agentd.http.send_error); the front door closes the stream."""

    error: HttpError


@attrs.frozen
class Closed:
    """No answer (the handshake took too long, or the client left); the front door closes the stream."""

    reason: str


@attrs.frozen
class Upgraded(Generic[A]):
    """A switched connection, ready for `MuxSession(transport, is_client=False)`."""

    transport: trio.abc.Stream
    agent: A
    token: uuid.UUID
    version: ApiVersion
    #: The `version` query value as sent ("2.0" when missing), for the per-RPC context (§2.7).
    version_string: str
    role: str
    #: Connection monitor on (§2.8): role empty or "agent".
    monitoring: bool
    protocol: Upgrade


Outcome = Rejected | Closed | Upgraded[A]
Lookup = Callable[[uuid.UUID], Awaitable[A | None]]


# ---- the transport after a raw upgrade -----------------------------------------------------------


class PrefixedStream(trio.abc.Stream):
    """`inner`, with bytes already read past an HTTP head served first (wire.md Part H item 1)."""

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self.inner = inner
        self._prefix = bytearray(prefix)
        self._receiving = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self._prefix:
            return await self.inner.receive_some(max_bytes)
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint()
            n = len(self._prefix) if max_bytes is None else max_bytes
            chunk = bytes(self._prefix[:n])
            del self._prefix[:n]
            return chunk
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self._prefix.clear()
        await self.inner.aclose()


def _transport(stream: trio.abc.Stream, upgrade: Upgrade, trailing: bytes) -> trio.abc.Stream:
    if upgrade is Upgrade.WEBSOCKET:
        return WebSocketByteStream.server(stream, trailing, max_message_size=MAX_MESSAGE_SIZE)
    return PrefixedStream(stream, trailing) if trailing else stream


# ---- the async glue ------------------------------------------------------------------------------


async def handle_rpc_request(
    request: Request,
    *,
    lookup: Lookup[A],
    timeout: float = HANDSHAKE_TIMEOUT,  # noqa: ASYNC109 - a protocol bound
) -> Outcome[A]:
    """Authenticate and upgrade the agent RPC request `request` (its head read by agentd.http).

    Never raises for anything the client sent; see the Outcome classes. Everything (lookup and
    writes included) is bounded by `timeout`; a client that stalls gets no answer. Either way the
    request counts as answered (`request.responded`).
    """
    rpc = parse_rpc_request(request)
    stream = request.stream
    with trio.move_on_after(timeout):
        try:
            token = check_token(rpc)
            try:
                agent = await lookup(token)
            except HttpError:
                raise
            except Exception as exc:
                log.warning("agent token lookup failed", exc_info=True)
                raise _lookup_failed(exc) from exc
            if agent is None:
                raise _unknown_agent()
            version = validate_version(rpc.version)
            upgrade, response = check_upgrade(rpc)
        except HttpError as error:
            # Not logged here: the caller knows the peer (agentd.daemon logs it at debug).
            await request.send_error(error)
            return Rejected(error)
        request.responded = True
        try:
            await stream.send_all(response)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            return Closed(f"client went away: {exc}")
        return Upgraded(
            transport=_transport(stream, upgrade, request.trailing_data),
            agent=agent,
            token=token,
            version=version,
            version_string=(rpc.version or b"2.0").decode("utf-8", "replace"),
            role=rpc.role,
            monitoring=rpc.role in ("", "agent"),
            protocol=upgrade,
        )
    request.responded = True  # nothing more is said to a client this slow
    return Closed(f"handshake took longer than {timeout} s")


# ---- client side ---------------------------------------------------------------------------------


async def upgrade_client(
    stream: trio.abc.Stream,
    *,
    token: uuid.UUID | str | None,
    version: str | None = "2.10",
    role: str | None = "agent",
    websocket: bool = False,
    host: str = "agentd",
    timeout: float = HANDSHAKE_TIMEOUT,  # noqa: ASYNC109 - a protocol bound
) -> trio.abc.Stream:
    """Dial the agent RPC endpoint over `stream` the way an agent does; return the yamux transport.

    `token` goes in `Coder-Session-Token` (None sends none); `version`/`role` None omit the query
    parameter. Raises UpgradeError with the server's status and JSON message on refusal.
    """
    params = [(k, v) for k, v in (("version", version), ("role", role)) if v is not None]
    target = RPC_PATH + ("?" + urlencode(params) if params else "")
    headers: list[tuple[str | bytes, str | bytes]] = []
    if token is not None:
        headers.append(("Coder-Session-Token", str(token)))
    if websocket:
        return await connect_websocket(stream, host, target, headers, timeout=timeout)
    response = await request_upgrade(
        stream,
        target,
        [("Host", host), ("Connection", "Upgrade"), ("Upgrade", "yamux"), *headers],
        timeout=timeout,
    )
    if first_value(response.headers, b"upgrade").strip().lower() != b"yamux":
        raise UpgradeError(101, "the server switched to a protocol other than yamux")
    return PrefixedStream(stream, response.trailing) if response.trailing else stream
