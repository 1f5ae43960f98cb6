"""The HTTP/1.1 front door of every listener: read one bounded request head with h11, route it.

Each accepted connection carries exactly one request. Plain GETs (`/healthz`, ...) get a JSON
response and the connection closes; the agent endpoint (agentd.handshake) later takes the stream
over after the head (`Request.trailing_data` holds any bytes the client sent past it, e.g. the first
yamux frames). Header bytes and time are bounded so a slow or hostile client cannot hold resources:
16 KiB of head, 10 seconds to send it. This is the only HTTP request reader in agentd.

Every refusal is an `HttpError` answered by `send_error`, in Coder's shape (`codersdk.Response`:
``{"message", "detail", "validations"}``, encoded the way Go's `json.Encoder` writes it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from http import HTTPStatus
from typing import Any

import attrs
import h11
import trio

from agentd import __version__

log = logging.getLogger("agentd.http")

MAX_HEAD_BYTES = 16 * 1024
HEAD_TIMEOUT = 10.0
SEND_TIMEOUT = 10.0
#: After an error response, how long we keep reading (and discarding) so the client sees the
#: response instead of a TCP reset caused by its own unread bytes.
LINGER_SECONDS = 0.5
LINGER_MAX_BYTES = 1 << 20
SERVER_HEADER = f"agentd/{__version__}"
#: coderd's content type for its JSON responses (httpapi.Write)
ERROR_CONTENT_TYPE = "application/json; charset=utf-8"
_RECEIVE_CHUNK = 1 << 16

#: Header or query pairs as bytes; header names lower-cased (h11 does), in arrival order.
Pairs = list[tuple[bytes, bytes]]


def go_json(value: object) -> bytes:
    """JSON the way Go's `json.Encoder` writes coderd's responses: compact, HTML-escaped, newline."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escape)
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return text.encode("utf-8") + b"\n"


class HttpError(Exception):
    """A refusal, carrying its status and Coder's `codersdk.Response` fields."""

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

    def response(self, headers: Iterable[tuple[str, str]] = (), *, include_body: bool = True) -> bytes:
        """The complete HTTP/1.1 response: status line, headers (with Content-Length), body."""
        body = self.body()
        try:
            phrase = HTTPStatus(self.status).phrase
        except ValueError:
            phrase = "Error"
        lines = [
            f"HTTP/1.1 {self.status} {phrase}",
            f"server: {SERVER_HEADER}",
            f"content-type: {ERROR_CONTENT_TYPE}",
            f"content-length: {len(body)}",
            "cache-control: no-store",
            "connection: close",
            *(f"{k}: {v}" for k, v in headers),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body if include_body else b"")


async def send_error(
    stream: trio.abc.Stream,
    error: HttpError,
    *,
    headers: Iterable[tuple[str, str]] = (),
    include_body: bool = True,
) -> None:
    """Answer with `error`, half-close if possible, and drain briefly (so the answer is not lost to
    a reset caused by the client's unread bytes). The caller closes the stream."""
    try:
        with trio.move_on_after(SEND_TIMEOUT):
            await stream.send_all(error.response(headers, include_body=include_body))
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
        with trio.move_on_after(LINGER_SECONDS):
            drained = 0
            while drained < LINGER_MAX_BYTES:
                data = await stream.receive_some(_RECEIVE_CHUNK)
                if not data:
                    break
                drained += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client left without waiting for the answer


# ---- request targets and queries -------------------------------------------------------------------


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """(path, query) of an origin-form or absolute-form request target. The path stays raw (not
    percent-decoded), as chi routes on RawPath: /me/%72pc is another route."""
    lowered = target[:8].lower()
    if lowered.startswith((b"http://", b"https://")):
        rest = target[target.index(b"//") + 2 :]
        slash = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
        target = rest[slash:] or b"/"
    path, _, query = target.partition(b"?")
    return path, query


_HEX = frozenset(b"0123456789abcdefABCDEF")


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


def parse_query(raw: bytes) -> Pairs:
    """Go's url.ParseQuery, keeping what it keeps (pairs with ';' or bad escapes are dropped)."""
    out: Pairs = []
    for part in raw.split(b"&"):
        if not part or b";" in part:
            continue
        key, _, value = part.partition(b"=")
        k, v = _query_unescape(key), _query_unescape(value)
        if k is not None and v is not None:
            out.append((k, v))
    return out


def first_value(pairs: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes:
    """First value of `name` or b"" (Go's Values.Get / Header.Get with lower-cased names)."""
    for key, value in pairs:
        if key == name:
            return value
    return b""


# ---- the request ------------------------------------------------------------------------------------


@attrs.define(eq=False)
class Request:
    """A parsed request head plus the connection it arrived on, for handlers to answer or take over.

    The head stays in h11's bytes (`target`, `headers`, `query`); `path` is its latin-1 text for routing.
    """

    stream: trio.abc.Stream
    conn: h11.Connection
    method: str
    target: bytes
    path: str
    query: Pairs
    headers: Pairs
    http_version: bytes
    responded: bool = False

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        key = name.lower().encode("latin-1")
        for k, value in self.headers:
            if k == key:
                return value.decode("latin-1")
        return None

    def header_values(self, name: str) -> list[str]:
        """All values of `name`, comma-separated lists split, e.g. for `Connection: keep-alive, Upgrade`."""
        key = name.lower().encode("latin-1")
        out: list[str] = []
        for k, value in self.headers:
            if k == key:
                out.extend(v.strip() for v in value.decode("latin-1").split(",") if v.strip())
        return out

    def query_value(self, name: str) -> str | None:
        """The first value of query parameter `name` (UTF-8, undecodable bytes replaced), or None."""
        key = name.encode("utf-8")
        for k, value in self.query:
            if k == key:
                return value.decode("utf-8", "replace")
        return None

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the request head (and body) that h11 did not consume."""
        return bytes(self.conn.trailing_data[0])

    async def send_response(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/json",
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Send a complete response and mark the connection for closing."""
        if self.responded:
            raise RuntimeError("response already sent")
        self.responded = True
        all_headers = [
            ("server", SERVER_HEADER),
            ("content-type", content_type),
            ("content-length", str(len(body))),
            ("cache-control", "no-store"),
            ("connection", "close"),
            *headers,
        ]
        data = self.conn.send(
            h11.Response(status_code=status, headers=all_headers, reason=HTTPStatus(status).phrase.encode())
        )
        if self.method != "HEAD":
            data += self.conn.send(h11.Data(data=body))
        data += self.conn.send(h11.EndOfMessage())
        with trio.move_on_after(SEND_TIMEOUT):
            await self.stream.send_all(data)

    async def send_json(self, status: int, obj: Any, *, headers: Iterable[tuple[str, str]] = ()) -> None:
        await self.send_response(status, go_json(obj), headers=headers)

    async def send_error(self, error: HttpError, *, headers: Iterable[tuple[str, str]] = ()) -> None:
        """Refuse the request with `error` (see `send_error`)."""
        if self.responded:
            raise RuntimeError("response already sent")
        self.responded = True
        await send_error(self.stream, error, headers=headers, include_body=self.method != "HEAD")


RouteHandler = Callable[[Request], Awaitable[None]]


async def read_request_head(
    stream: trio.abc.Stream, *, max_head_bytes: int = MAX_HEAD_BYTES
) -> Request | None:
    """Read one request head; None if the client closed before sending a byte.

    Raises HttpError(400) for malformed input, (431) when the head exceeds `max_head_bytes`, (505)
    for an HTTP version other than 1.x. The caller bounds the time (HEAD_TIMEOUT).
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_bytes)
    received = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            if e.error_status_hint == 431:
                raise HttpError(431, "Request header fields too large.", str(e)) from None
            raise HttpError(400, "Malformed HTTP request.", str(e)) from None
        if event is h11.NEED_DATA:
            if received >= max_head_bytes:
                raise HttpError(
                    431,
                    "Request header fields too large.",
                    f"the request head exceeds {max_head_bytes} bytes",
                )
            data = await stream.receive_some(max_head_bytes - received)
            if not data and received == 0:
                return None
            received += len(data)
            conn.receive_data(bytes(data))
            continue
        if isinstance(event, h11.ConnectionClosed):
            return None
        if isinstance(event, h11.Request):
            if not event.http_version.startswith(b"1."):
                # h11 parses any HTTP/d.d; only 1.x is spoken here
                raise HttpError(505, "HTTP version not supported.")
            target = bytes(event.target)
            path, query = split_target(target)
            return Request(
                stream=stream,
                conn=conn,
                method=event.method.decode("ascii"),
                target=target,
                path=path.decode("latin-1"),
                query=parse_query(query),
                headers=[(bytes(k), bytes(v)) for k, v in event.headers],
                http_version=bytes(event.http_version),
            )
        raise HttpError(400, "Malformed HTTP request.")  # pragma: no cover - h11 yields Request first


@attrs.define
class Router:
    """Routes by exact path, then method: the dispatch point handlers (and the agent upgrade) plug into."""

    routes: dict[str, dict[str, RouteHandler]] = attrs.field(factory=dict)

    def add(self, path: str, handler: RouteHandler, *, methods: Iterable[str] = ("GET", "HEAD")) -> None:
        by_method = self.routes.setdefault(path, {})
        for method in methods:
            by_method[method] = handler

    async def dispatch(self, request: Request) -> None:
        by_method = self.routes.get(request.path)
        if by_method is None:
            await request.send_error(HttpError(404, "Route not found.", f"No route for {request.path}."))
            return
        handler = by_method.get(request.method)
        if handler is None:
            allow = ", ".join(sorted(by_method))
            await request.send_error(
                HttpError(405, "Method not allowed.", f"{request.path} accepts {allow}."),
                headers=[("allow", allow)],
            )
            return
        await handler(request)


@attrs.define
class HttpApp:
    """Per-connection entry point shared by every listener."""

    router: Router
    max_head_bytes: int = MAX_HEAD_BYTES
    head_timeout: float = HEAD_TIMEOUT

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Read the head within the limits, dispatch it, and always close the stream afterwards."""
        async with stream:
            try:
                request = None
                with trio.move_on_after(self.head_timeout) as scope:
                    request = await read_request_head(stream, max_head_bytes=self.max_head_bytes)
                if scope.cancelled_caught:
                    await send_error(
                        stream, HttpError(408, "Request timeout.", "The request head took too long.")
                    )
                    return
                if request is None:
                    return
            except HttpError as e:
                await send_error(stream, e)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            try:
                await self.router.dispatch(request)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            except Exception:
                log.exception("handler for %s %s failed", request.method, request.path)
                if not request.responded:
                    await request.send_error(HttpError(500, "Internal error.", "The request handler failed."))
