"""The HTTP/1.1 front door of every listener: read one bounded request head with h11, route it.

Each accepted connection carries exactly one request. Plain GETs (`/healthz`, ...) get a JSON
response and the connection closes; the agent endpoint later takes the stream over after the head
(`Request.trailing_data` holds any bytes the client sent past it, e.g. the first yamux frames).
Header bytes and time are bounded so a slow or hostile client cannot hold resources: 16 KiB of head,
10 seconds to send it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio

from agentd import __version__

log = logging.getLogger("agentd.http")

MAX_HEAD_BYTES = 16 * 1024
HEAD_TIMEOUT = 10.0
SEND_TIMEOUT = 10.0
SERVER_HEADER = f"agentd/{__version__}"

Headers = list[tuple[str, str]]


class HttpError(Exception):
    """A request we refuse before routing; answered with `status` and a JSON body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def json_body(message: str, detail: str | None = None, **extra: Any) -> dict[str, Any]:
    """Coder's error body shape: `{"message": ..., "detail": ...}`."""
    body: dict[str, Any] = {"message": message}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return body


@attrs.define(eq=False)
class Request:
    """A parsed request head plus the connection it arrived on, for handlers to answer or take over."""

    stream: trio.abc.Stream
    conn: h11.Connection
    method: str
    target: str
    path: str
    query: dict[str, list[str]]
    headers: Headers  # names lower-cased, in arrival order
    http_version: str
    responded: bool = False

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_values(self, name: str) -> list[str]:
        """All values of `name`, comma-separated lists split, e.g. for `Connection: keep-alive, Upgrade`."""
        name = name.lower()
        out: list[str] = []
        for key, value in self.headers:
            if key == name:
                out.extend(v.strip() for v in value.split(",") if v.strip())
        return out

    def query_value(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

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
        body = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        await self.send_response(status, body, headers=headers)


Handler = Callable[[Request], Awaitable[None]]


async def read_request_head(
    stream: trio.abc.Stream, *, max_head_bytes: int = MAX_HEAD_BYTES
) -> Request | None:
    """Read one request head; None if the client closed before sending a byte.

    Raises HttpError(400) for malformed input, (431) when the head exceeds `max_head_bytes`, (505)
    for an HTTP version other than 1.x. The
    caller bounds the time (HEAD_TIMEOUT).
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_bytes)
    received = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            status = e.error_status_hint if e.error_status_hint in (400, 431) else 400
            raise HttpError(
                status, "Request header fields too large." if status == 431 else "Malformed HTTP request."
            ) from None
        if event is h11.NEED_DATA:
            if received >= max_head_bytes:
                raise HttpError(431, "Request header fields too large.")
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
            target = event.target.decode("latin-1")
            parts = urlsplit(target)
            return Request(
                stream=stream,
                conn=conn,
                method=event.method.decode("ascii"),
                target=target,
                path=parts.path,
                query=parse_qs(parts.query, keep_blank_values=True),
                headers=[(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers],
                http_version=event.http_version.decode("ascii"),
            )
        raise HttpError(400, "Malformed HTTP request.")  # pragma: no cover - h11 yields Request first


async def send_error(stream: trio.abc.Stream, status: int, body: dict[str, Any]) -> None:
    """Answer a request that never parsed (so there is no h11 state to reuse), then give up on it."""
    payload = json.dumps(body, separators=(",", ":")).encode() + b"\n"
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"server: {SERVER_HEADER}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(payload)}\r\n"
        "connection: close\r\n\r\n"
    )
    with trio.move_on_after(SEND_TIMEOUT):
        try:
            await stream.send_all(head.encode("ascii") + payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client left without waiting for the answer


@attrs.define
class Router:
    """Routes by exact path, then method: the dispatch point handlers (and the agent upgrade) plug into."""

    routes: dict[str, dict[str, Handler]] = attrs.field(factory=dict)

    def add(self, path: str, handler: Handler, *, methods: Iterable[str] = ("GET", "HEAD")) -> None:
        by_method = self.routes.setdefault(path, {})
        for method in methods:
            by_method[method] = handler

    async def dispatch(self, request: Request) -> None:
        by_method = self.routes.get(request.path)
        if by_method is None:
            await request.send_json(404, json_body("Route not found.", f"No route for {request.path}."))
            return
        handler = by_method.get(request.method)
        if handler is None:
            allow = ", ".join(sorted(by_method))
            await request.send_json(
                405,
                json_body("Method not allowed.", f"{request.path} accepts {allow}."),
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
                        stream, 408, json_body("Request timeout.", "The request head took too long.")
                    )
                    return
                if request is None:
                    return
            except HttpError as e:
                await send_error(stream, e.status, json_body(e.message))
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
                    await request.send_json(500, json_body("Internal error.", "The request handler failed."))
