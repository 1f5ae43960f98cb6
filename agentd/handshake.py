"""Upgrade and authentication of `GET /api/v2/workspaceagents/me/rpc` (spec/agent-api.md §2.1-2.3, §3).

Layers, outermost first:

* `read_request_head` - one bounded request head off a trio stream (h11; 16 KiB, 10 s). Its sans-I/O
  core is `RequestHeadParser`.
* `handle_rpc_request` - given a parsed `RequestHead`, decide: not our route (`NotMine`, nothing
  written), refused (`Rejected`: Coder's status + JSON body written, connection closed), or
  `Upgraded` (101 written; the transport stream, the authenticated agent, version and role).
  The checks run in coderd's order - token source and format (401), token lookup (401/500),
  `version` (400), then the upgrade itself (400) - each a pure function raising `HttpError`.
* `accept_agent` - both of the above for a connection that carries nothing else.
* `upgrade_client` - the client side (agent SDK, tests): raw yamux or WebSocket.

The token lookup is injected: `lookup(token) -> agent | None`. It may raise `HttpError` to answer
with a specific status (e.g. 400 "Internal error fetching workspace."); any other exception is
answered like coderd's database errors: 500 "Internal error checking workspace agent authorization.".
"""

from __future__ import annotations

import enum
import json
import logging
import operator
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from typing import Generic, TypeVar
from urllib.parse import urlencode

import attrs
import h11
import trio

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
    "RPC_PATH",
    "ApiVersion",
    "Closed",
    "HttpError",
    "Lookup",
    "NotMine",
    "Outcome",
    "PrefixedStream",
    "Rejected",
    "RequestHead",
    "RequestHeadParser",
    "RpcRequest",
    "Upgrade",
    "UpgradeError",
    "Upgraded",
    "accept_agent",
    "check_token",
    "check_upgrade",
    "extract_token",
    "handle_rpc_request",
    "parse_go_uuid",
    "parse_rpc_request",
    "read_request_head",
    "upgrade_client",
    "validate_version",
]

log = logging.getLogger(__name__)

RPC_PATH = "/api/v2/workspaceagents/me/rpc"
_RPC_PATH_BYTES = RPC_PATH.encode("ascii")
SESSION_TOKEN_COOKIE = b"coder_session_token"
SESSION_TOKEN_HEADER = b"coder-session-token"
MAX_HEAD_BYTES = 16384
HANDSHAKE_TIMEOUT = 10.0
#: After an error response, how long we keep reading (and discarding) so the client sees the
#: response instead of a TCP reset caused by its own unread bytes.
LINGER_SECONDS = 0.5
_RECEIVE_CHUNK = 1 << 16
YAMUX_SWITCH_RESPONSE = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: yamux\r\n\r\n"

A = TypeVar("A")


# ---- errors and responses ------------------------------------------------------------------------


def go_json(value: object) -> bytes:
    """JSON the way Go's `json.Encoder` writes coderd's responses: compact, HTML-escaped, newline."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escape)
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return text.encode("utf-8") + b"\n"


class HttpError(Exception):
    """A refusal before the upgrade, carrying its status and Coder's `codersdk.Response` fields."""

    def __init__(
        self,
        status: int,
        message: str,
        detail: str = "",
        validations: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(f"{status} {message}" + (f": {detail}" if detail else ""))
        self.status = status
        self.message = message
        self.detail = detail
        self.validations = tuple(validations)

    def body(self) -> bytes:
        """The JSON body; `detail` and `validations` omitted when empty (Go's `omitempty`)."""
        out: dict[str, object] = {"message": self.message}
        if self.detail:
            out["detail"] = self.detail
        if self.validations:
            out["validations"] = [{"field": f, "detail": d} for f, d in self.validations]
        return go_json(out)

    def response(self) -> bytes:
        """The complete HTTP/1.1 response: status line, headers (with Content-Length), body."""
        body = self.body()
        try:
            phrase = HTTPStatus(self.status).phrase
        except ValueError:
            phrase = "Error"
        head = (
            f"HTTP/1.1 {self.status} {phrase}\r\n"
            "Content-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        return head.encode("ascii") + body


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


# ---- reading a request head ----------------------------------------------------------------------


@attrs.frozen
class RequestHead:
    """A request head as read off the wire. Header names are lower-case bytes, in arrival order."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    http_version: bytes = b"1.1"
    #: Bytes received past the blank line; after an upgrade they belong to the new protocol.
    trailing: bytes = b""

    @classmethod
    def from_text(
        cls,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        http_version: str = "1.1",
        trailing: bytes = b"",
    ) -> RequestHead:
        """From a head another parser decoded as latin-1 text (e.g. agentd.http's Request)."""
        return cls(
            method=method.encode("latin-1"),
            target=target.encode("latin-1"),
            headers=[(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            http_version=http_version.encode("latin-1"),
            trailing=trailing,
        )


class RequestHeadParser:
    """Sans-I/O: feed bytes, get one `RequestHead`; malformed or oversized input raises HttpError."""

    def __init__(self, max_bytes: int = MAX_HEAD_BYTES) -> None:
        self._max = max_bytes
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_bytes)
        self._fed = 0

    def feed(self, data: bytes) -> RequestHead | None:
        """Add received bytes (b"" = EOF). Returns the head once complete, else None.

        Raises HttpError (400 malformed, 431 too large) or trio.BrokenResourceError when the
        peer closed before sending anything (nothing to answer).
        """
        self._fed += len(data)
        try:
            self._conn.receive_data(data)
            event = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 431:
                raise HttpError(431, "Request header fields too large.", str(exc)) from None
            raise HttpError(400, "Malformed HTTP request.", str(exc)) from None
        if event is h11.NEED_DATA:
            return None
        if isinstance(event, h11.ConnectionClosed):
            raise trio.BrokenResourceError("the client closed the connection before sending a request")
        if not isinstance(event, h11.Request):  # pragma: no cover - h11 yields only these first
            raise HttpError(400, "Malformed HTTP request.", f"unexpected {type(event).__name__}")
        trailing = bytes(self._conn.trailing_data[0])
        if self._fed - len(trailing) > self._max:
            raise HttpError(
                431, "Request header fields too large.", f"the request head exceeds {self._max} bytes"
            )
        return RequestHead(
            method=bytes(event.method),
            target=bytes(event.target),
            headers=[(bytes(k), bytes(v)) for k, v in event.headers],
            http_version=bytes(event.http_version),
            trailing=trailing,
        )


async def read_request_head(
    stream: trio.abc.ReceiveStream,
    *,
    max_bytes: int = MAX_HEAD_BYTES,
    timeout: float = HANDSHAKE_TIMEOUT,  # noqa: ASYNC109 - a protocol bound, not a caller convenience
) -> RequestHead:
    """Read one request head: HttpError (400/431, answerable), trio.TooSlowError after `timeout`,
    trio.BrokenResourceError if the client left first."""
    parser = RequestHeadParser(max_bytes)
    with trio.fail_after(timeout):
        while True:
            data = await stream.receive_some(_RECEIVE_CHUNK)
            head = parser.feed(bytes(data))
            if head is not None:
                return head


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


def _unhex(pair: bytes) -> int | None:
    return int(pair, 16) if len(pair) == 2 and set(pair) <= _HEX else None


def _query_unescape(raw: bytes) -> bytes | None:
    """Go's url.QueryUnescape: %XX and '+' = space; a bad escape invalidates the whole value."""
    out = bytearray()
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == 0x25:  # %
            value = _unhex(raw[i + 1 : i + 3])
            if value is None:
                return None
            out.append(value)
            i += 3
        else:
            out.append(0x20 if c == 0x2B else c)
            i += 1
    return bytes(out)


def parse_query(raw: bytes) -> list[tuple[bytes, bytes]]:
    """Go's url.ParseQuery, keeping what it keeps (pairs with ';' or bad escapes are dropped)."""
    out: list[tuple[bytes, bytes]] = []
    for part in raw.split(b"&"):
        if not part or b";" in part:
            continue
        key, _, value = part.partition(b"=")
        k, v = _query_unescape(key), _query_unescape(value)
        if k is not None and v is not None:
            out.append((k, v))
    return out


def _get(pairs: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes:
    """First value of `name` or b"" (Go's Values.Get / Header.Get with lower-cased names)."""
    for key, value in pairs:
        if key == name:
            return value
    return b""


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


def _split_target(target: bytes) -> tuple[bytes, bytes]:
    """(path, query) of an origin-form or absolute-form request target."""
    lowered = target[:8].lower()
    if lowered.startswith((b"http://", b"https://")):
        rest = target[target.index(b"//") + 2 :]
        slash = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
        target = rest[slash:] or b"/"
    path, _, query = target.partition(b"?")
    return path, query


def extract_token(head: RequestHead, query: Sequence[tuple[bytes, bytes]]) -> bytes:
    """The raw token, by coderd's precedence (b"" if none): cookie `coder_session_token`, query
    `coder_session_token`, header `Coder-Session-Token`, `Authorization: Bearer` (any case), query
    `access_token`. An empty value at one source falls through to the next."""
    for value in (
        _cookie(head.headers, SESSION_TOKEN_COOKIE),
        _get(query, SESSION_TOKEN_COOKIE),
        _get(head.headers, SESSION_TOKEN_HEADER),
    ):
        if value:
            return value
    auth = _get(head.headers, b"authorization")
    if len(auth) > 7 and auth[:7].lower() == b"bearer ":
        return auth[7:]
    return _get(query, b"access_token")


class Upgrade(enum.Enum):
    YAMUX = "yamux"
    WEBSOCKET = "websocket"


@attrs.frozen
class RpcRequest:
    """What `handle_rpc_request` needs from a head that targets the agent RPC route."""

    head: RequestHead
    query: list[tuple[bytes, bytes]]
    token: bytes
    version: bytes
    role: str
    upgrade: Upgrade | None


def parse_rpc_request(head: RequestHead) -> RpcRequest | None:
    """None unless this is `GET /api/v2/workspaceagents/me/rpc` (then the dispatcher handles it)."""
    if head.method != b"GET":
        return None
    path, raw_query = _split_target(head.target)
    if path != _RPC_PATH_BYTES:  # compared raw, as chi routes on RawPath: /me/%72pc is another route
        return None
    query = parse_query(raw_query)
    upgrade: Upgrade | None = None
    connection = [t.strip().lower() for k, v in head.headers if k == b"connection" for t in v.split(b",")]
    if b"upgrade" in connection:
        offered = [t.strip().lower() for k, v in head.headers if k == b"upgrade" for t in v.split(b",")]
        for proto in offered:
            if proto == b"yamux":
                upgrade = Upgrade.YAMUX
                break
            if proto == b"websocket":
                upgrade = Upgrade.WEBSOCKET
                break
    return RpcRequest(
        head=head,
        query=query,
        token=extract_token(head, query),
        version=_get(query, b"version"),
        role=_get(query, b"role").decode("utf-8", "replace"),
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
        key = check_websocket_request(request.head.http_version, request.head.headers)
    except ValueError as exc:
        raise _ws_accept_failed(str(exc)) from None
    return Upgrade.WEBSOCKET, websocket_accept_response(key)


# ---- outcomes ------------------------------------------------------------------------------------


@attrs.frozen
class NotMine:
    """Not the agent RPC route: nothing was written; the dispatcher serves `head` itself."""

    head: RequestHead


@attrs.frozen
class Rejected:
    """Refused: `error.response()` was sent and the stream closed."""

    error: HttpError


@attrs.frozen
class Closed:
    """Closed without an answer (client too slow, or gone)."""

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


Outcome = NotMine | Rejected | Closed | Upgraded[A]
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


async def _send_error_and_close(stream: trio.abc.Stream, error: HttpError) -> None:
    """Answer, half-close if possible, drain briefly (so our response is not lost to a reset), close."""
    try:
        await stream.send_all(error.response())
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        with trio.move_on_after(LINGER_SECONDS):
            drained = 0
            while drained < (1 << 20):
                data = await stream.receive_some(_RECEIVE_CHUNK)
                if not data:
                    break
                drained += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def handle_rpc_request(
    stream: trio.abc.Stream,
    head: RequestHead,
    *,
    lookup: Lookup[A],
    timeout: float = HANDSHAKE_TIMEOUT,  # noqa: ASYNC109 - a protocol bound
) -> Outcome[A]:
    """Authenticate and upgrade an agent RPC request whose head was already read from `stream`.

    Never raises for anything the client sent; see the Outcome classes. Everything (lookup and
    writes included) is bounded by `timeout`; a client that stalls is closed without an answer.
    """
    request = parse_rpc_request(head)
    if request is None:
        return NotMine(head)
    outcome: Outcome[A] = Closed(f"handshake took longer than {timeout} s")
    with trio.move_on_after(timeout):
        try:
            token = check_token(request)
            try:
                agent = await lookup(token)
            except HttpError:
                raise
            except Exception as exc:
                log.warning("agent token lookup failed", exc_info=True)
                raise _lookup_failed(exc) from exc
            if agent is None:
                raise _unknown_agent()
            version = validate_version(request.version)
            upgrade, response = check_upgrade(request)
        except HttpError as error:
            # Not logged here: the caller knows the peer (agentd.daemon logs it at debug).
            await _send_error_and_close(stream, error)
            return Rejected(error)
        try:
            await stream.send_all(response)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await trio.aclose_forcefully(stream)
            return Closed(f"client went away: {exc}")
        return Upgraded(
            transport=_transport(stream, upgrade, head.trailing),
            agent=agent,
            token=token,
            version=version,
            version_string=(request.version or b"2.0").decode("utf-8", "replace"),
            role=request.role,
            monitoring=request.role in ("", "agent"),
            protocol=upgrade,
        )
    await trio.aclose_forcefully(stream)
    return outcome


async def accept_agent(
    stream: trio.abc.Stream,
    *,
    lookup: Lookup[A],
    max_bytes: int = MAX_HEAD_BYTES,
    timeout: float = HANDSHAKE_TIMEOUT,  # noqa: ASYNC109 - a protocol bound
) -> Outcome[A]:
    """Read the head and handle it, all within one `timeout`. Never raises for client input."""
    deadline = trio.current_time() + timeout
    try:
        head = await read_request_head(stream, max_bytes=max_bytes, timeout=timeout)
    except HttpError as error:
        with trio.move_on_at(deadline):
            await _send_error_and_close(stream, error)
        await trio.aclose_forcefully(stream)
        return Rejected(error)
    except trio.TooSlowError:
        await trio.aclose_forcefully(stream)
        return Closed(f"no complete request head within {timeout} s")
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        await trio.aclose_forcefully(stream)
        return Closed(f"client went away: {exc}")
    remaining = max(0.0, deadline - trio.current_time())
    return await handle_rpc_request(stream, head, lookup=lookup, timeout=remaining)


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
    if _get(response.headers, b"upgrade").strip().lower() != b"yamux":
        raise UpgradeError(101, "the server switched to a protocol other than yamux")
    return PrefixedStream(stream, response.trailing) if response.trailing else stream
