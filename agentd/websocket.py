"""WebSocket (RFC 6455) as a plain trio byte stream, the way Coder's agent uses it.

Coder wraps its WebSocket in a `net.Conn`: every write is one binary message, reads concatenate
message payloads, and message boundaries carry no meaning (Go yamux writes a frame's 12-byte header
and its body as two messages). `WebSocketByteStream` does the same over any trio stream with wsproto
doing the framing.

Half-close: WebSocket has none. After a Close frame arrives, RFC 6455 §5.5.1 says the receiver must
answer with its own Close "as soon as practical" and send no more data, so "EOF in one direction
while the other keeps flowing" cannot be offered honestly. `WebSocketByteStream` is therefore a
`trio.abc.Stream`, not a `HalfCloseableStream`: receiving the peer's Close reads as EOF (b"") and is
answered at once; `aclose()` sends Close(1000) and closes the transport. yamux never half-closes its
transport (a session ends by closing it), so the mux needs nothing more.

This module also holds the client half of an HTTP/1.1 upgrade (`request_upgrade`), shared by
`connect_websocket` here and the raw-yamux `agentd.handshake.upgrade_client`, and the server half of
the WebSocket opening handshake (`check_websocket_request`, `websocket_accept_response`).
"""

from __future__ import annotations

import base64
import binascii
import json
import operator
import os
from collections.abc import Iterable, Sequence

import attrs
import h11
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, Pong, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import generate_accept_token

from agentd.http import MAX_HEAD_BYTES
from agentd.mux.sockio import SocketIO, shared_recv

__all__ = [
    "MAX_MESSAGE_SIZE",
    "UpgradeError",
    "UpgradeResponse",
    "WebSocketByteStream",
    "check_websocket_request",
    "connect_websocket",
    "request_upgrade",
    "websocket_accept_response",
]

#: Largest inbound message accepted (Coder sets a 4 MiB read limit on both ends); bigger closes 1009.
MAX_MESSAGE_SIZE = 4 << 20
#: Largest outbound message: a bigger send_all (a mux flushing many frames at once) is split, so a
#: peer with the 4 MiB read limit never sees one it must refuse. Go agents write one yamux frame
#: (<= 256 KiB + 12) per message, far below it.
MAX_SEND_MESSAGE_SIZE = 1 << 20
#: How much is read from the transport at a time.
RECEIVE_CHUNK = 1 << 16
#: How long aclose() waits to get its Close frame out before it just drops the transport.
CLOSE_SEND_TIMEOUT = 5.0

_OPEN = ConnectionState.OPEN
_REMOTE_CLOSING = ConnectionState.REMOTE_CLOSING

HeaderPairs = Sequence[tuple[str | bytes, str | bytes]]


class WebSocketByteStream(trio.abc.Stream):
    """An ordered byte pipe over binary WebSocket messages (one `send_all` = one message, or
    several of MAX_SEND_MESSAGE_SIZE when it is bigger).

    One task may receive and one may send at a time (`BusyResourceError` otherwise); control frames
    (pongs, Close replies) share a writer lock with `send_all` so frames never interleave. Errors use
    trio's vocabulary: the peer closing with a Close frame is EOF; a text message (closed with 1003),
    an oversized message (1009), a protocol error, or a transport dropped without a Close frame is
    `BrokenResourceError`; use after `aclose()` is `ClosedResourceError`.
    """

    def __init__(
        self,
        transport: trio.abc.Stream,
        connection: Connection,
        *,
        max_message_size: int = MAX_MESSAGE_SIZE,
        receive_chunk: int = RECEIVE_CHUNK,
        max_send_message_size: int = MAX_SEND_MESSAGE_SIZE,
    ) -> None:
        self.transport = transport
        #: on a plain socket: reads that wait for readability after a short read, and frames written
        #: without a scheduler pass when the socket takes them at once (agentd.mux.sockio)
        self._sockio = SocketIO(transport) if type(transport) is trio.SocketStream else None
        self._short_read = False
        self._max_send = max_send_message_size
        self._ws = connection
        self._max_message_size = max_message_size
        self._receive_chunk = receive_chunk
        self._buffer = bytearray()
        self._message_size = 0
        self._write_lock = trio.Lock()
        self._sending = False
        self._receiving = False
        self._closed = False
        self._eof = False
        self._failure: str | None = None
        self._send_failure: str | None = None
        #: Close code the peer sent (or the one we closed with on a protocol failure), once known.
        self.close_code: int | None = None
        self.close_reason: str | None = None

    @classmethod
    def server(
        cls,
        transport: trio.abc.Stream,
        trailing_data: bytes = b"",
        *,
        max_message_size: int = MAX_MESSAGE_SIZE,
        receive_chunk: int = RECEIVE_CHUNK,
    ) -> WebSocketByteStream:
        """The server end after the 101 was sent; `trailing_data` = bytes read past the request head."""
        return cls(
            transport,
            Connection(ConnectionType.SERVER, trailing_data=trailing_data),
            max_message_size=max_message_size,
            receive_chunk=receive_chunk,
        )

    @classmethod
    def client(
        cls,
        transport: trio.abc.Stream,
        trailing_data: bytes = b"",
        *,
        max_message_size: int = MAX_MESSAGE_SIZE,
        receive_chunk: int = RECEIVE_CHUNK,
    ) -> WebSocketByteStream:
        """The client end after a 101 was received; `trailing_data` = bytes read past the response head."""
        return cls(
            transport,
            Connection(ConnectionType.CLIENT, trailing_data=trailing_data),
            max_message_size=max_message_size,
            receive_chunk=receive_chunk,
        )

    # ---- receiving -------------------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this WebSocket")
        self._receiving = True
        try:
            # Checkpoints: the transport read is one; paths that do not read take their own.
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("the WebSocket was closed")
                if self._buffer:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    n = len(self._buffer) if max_bytes is None else max_bytes
                    chunk = bytes(self._buffer[:n])
                    del self._buffer[:n]
                    return chunk
                if self._eof:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return b""
                if self._failure is not None:
                    raise trio.BrokenResourceError(self._failure)
                replies = self._process_events()
                if replies:
                    await self._write_control(replies)
                if self._buffer or self._eof or self._failure is not None:
                    continue
                await self._receive_from_transport()
        finally:
            self._receiving = False

    async def _receive_from_transport(self) -> None:
        try:
            data: bytes | bytearray | memoryview
            if self._sockio is not None:
                # the thread's shared read buffer (agentd.mux.sockio): wsproto copies what it is
                # given at once, and nothing awaits between this read and that copy
                view = shared_recv.view[: self._receive_chunk]
                got = await self._sockio.recv_into(view, self._short_read)
                self._short_read = got < len(view)
                data = view[:got]
            else:
                data = await self.transport.receive_some(self._receive_chunk)
        except trio.ClosedResourceError:
            if self._closed:
                raise trio.ClosedResourceError("the WebSocket was closed") from None
            self._failure = "the transport was closed"
            raise trio.BrokenResourceError(self._failure) from None
        except trio.BrokenResourceError as exc:
            self._failure = f"the transport broke: {exc}"
            raise
        if not data:
            self._failure = "the connection ended without a WebSocket Close frame"
            self.close_code = CloseReason.ABNORMAL_CLOSURE
            raise trio.BrokenResourceError(self._failure)
        self._ws.receive_data(data)  # type: ignore[arg-type]  # copied into wsproto's bytearray

    def _process_events(self) -> list[bytes]:
        """Move parsed frames into the byte buffer / state; return control frames to write back."""
        out: list[bytes] = []
        for event in self._ws.events():
            if isinstance(event, BytesMessage):
                self._message_size += len(event.data)
                if self._message_size > self._max_message_size:
                    self._fail(
                        out,
                        CloseReason.MESSAGE_TOO_BIG,
                        f"message larger than {self._max_message_size} bytes",
                    )
                    break
                self._buffer += event.data
                if event.message_finished:
                    self._message_size = 0
            elif isinstance(event, TextMessage):
                self._fail(out, CloseReason.UNSUPPORTED_DATA, "unsupported data: text message")
                break
            elif isinstance(event, Ping):
                if self._ws.state is _OPEN:
                    out.append(self._ws.send(event.response()))
            elif isinstance(event, Pong):
                pass
            elif isinstance(event, CloseConnection):
                if self._ws.state in (_REMOTE_CLOSING, ConnectionState.CLOSED):
                    # The peer's Close frame: EOF. Answer it now (RFC 6455 §5.5.1).
                    self._eof = True
                    self.close_code, self.close_reason = event.code, event.reason
                    if self._ws.state is _REMOTE_CLOSING:
                        out.append(self._ws.send(event.response()))
                else:
                    # wsproto reports a frame it could not parse as a CloseConnection it wants sent.
                    self._fail(out, event.code, event.reason or "WebSocket protocol error")
                break
        return out

    def _fail(self, out: list[bytes], code: int, reason: str) -> None:
        self._failure = reason
        self.close_code, self.close_reason = code, reason
        if self._ws.state in (_OPEN, _REMOTE_CLOSING):
            out.append(self._ws.send(CloseConnection(code=code, reason=reason[:100])))

    async def _write_control(self, frames: list[bytes]) -> None:
        """Best effort: a peer that is gone does not need its pong or Close reply."""
        if self._send_failure is not None or self._closed:
            return
        try:
            async with self._write_lock:
                await self.transport.send_all(b"".join(frames))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._send_failure = f"the transport broke: {exc}"

    # ---- sending ---------------------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this WebSocket")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_can_send()
            if not data:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return
            if len(data) <= self._max_send:
                frame = self._ws.send(Message(data=bytes(data)))
            else:
                view = memoryview(data)
                frame = b"".join(
                    self._ws.send(Message(data=bytes(view[i : i + self._max_send])))
                    for i in range(0, len(view), self._max_send)
                )
            await self._write(frame)
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this WebSocket")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint()
            self._check_can_send()
            try:
                await self.transport.wait_send_all_might_not_block()
            except trio.ClosedResourceError:
                if self._closed:
                    raise trio.ClosedResourceError("the WebSocket was closed") from None
                raise trio.BrokenResourceError("the transport was closed") from None
        finally:
            self._sending = False

    def _check_can_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the WebSocket was closed")
        if self._send_failure is not None:
            raise trio.BrokenResourceError(self._send_failure)
        if self._ws.state is not _OPEN:
            raise trio.BrokenResourceError("the WebSocket is closing")

    async def _write(self, frame: bytes) -> None:
        sockio = self._sockio
        if sockio is not None:
            try:
                self._write_lock.acquire_nowait()
            except trio.WouldBlock:
                pass
            else:
                # Usually the socket takes the whole frame at once: no task switch, no lock wait.
                # A tail it did not take goes out before the lock is released (frames never mix).
                try:
                    rest = self._send_nowait(sockio, frame)
                    if rest is None:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                        return
                    await self._send_locked(rest)
                finally:
                    self._write_lock.release()
                return
        async with self._write_lock:
            await self._send_locked(frame)

    def _send_nowait(self, sockio: SocketIO, frame: bytes) -> bytes | None:
        """One non-blocking write of ``frame``; the unsent tail, or None when it all went."""
        try:
            rest = sockio.send_nowait([frame])
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            raise self._transport_send_error(exc) from None
        return bytes(rest[0]) if rest else None

    def _transport_send_error(
        self, exc: trio.ClosedResourceError | trio.BrokenResourceError
    ) -> BaseException:
        """What a failed transport write means for this WebSocket (and for every later send)."""
        if isinstance(exc, trio.ClosedResourceError):
            if self._closed:
                return trio.ClosedResourceError("the WebSocket was closed")
            self._send_failure = "the transport was closed"
            return trio.BrokenResourceError(self._send_failure)
        self._send_failure = f"the transport broke: {exc}"
        return exc

    async def _send_locked(self, frame: bytes) -> None:
        """Write ``frame`` (or a frame's tail) with the write lock held."""
        done = False
        try:
            await self.transport.send_all(frame)
            done = True
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            raise self._transport_send_error(exc) from None
        finally:
            if not done and self._send_failure is None:
                # Interrupted (cancelled) mid-frame: the peer may hold half a frame, so framing
                # is lost; refuse further sends rather than corrupt the stream.
                self._send_failure = "a send was interrupted mid-frame"

    # ---- closing ---------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Send Close(1000) if we still can (bounded, skipped if a send is stuck), then drop the transport."""
        await self.close()

    async def close_protocol_error(self, reason: str) -> None:
        """`close` with 1002: what runs over this stream broke its protocol (MuxSession calls it)."""
        await self.close(CloseReason.PROTOCOL_ERROR, reason)

    async def close(self, code: int = CloseReason.NORMAL_CLOSURE, reason: str = "") -> None:
        """`aclose` with a chosen Close code and reason, e.g. coderd's (1001, "build is outdated")."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            # A write in progress (e.g. the monitor's ping, sent on the same tick that ends the
            # session) finishes first: the Close frame waits for it, bounded, instead of being
            # skipped — a stuck send still cannot hold the close.
            with trio.move_on_after(CLOSE_SEND_TIMEOUT):
                async with self._write_lock:
                    if self._ws.state in (_OPEN, _REMOTE_CLOSING) and self._send_failure is None:
                        frame = self._ws.send(CloseConnection(code=code, reason=reason[:100]))
                        await self.transport.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await self.transport.aclose()


# ---- server side of the opening handshake ------------------------------------------------------


def _tokens(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """Comma-separated, case-folded tokens of every `name` header (names are lower-case)."""
    out: list[bytes] = []
    for key, value in headers:
        if key == name:
            out.extend(t.strip().lower() for t in value.split(b",") if t.strip())
    return out


def _first(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def check_websocket_request(http_version: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """Validate an RFC 6455 opening request (header names lower-case); return its Sec-WebSocket-Key.

    Raises ValueError with a human-readable reason otherwise.
    """
    if http_version != b"1.1":
        raise ValueError(f"WebSocket protocol violation: HTTP version {http_version.decode('latin-1')}")
    if b"upgrade" not in _tokens(headers, b"connection"):
        value = (_first(headers, b"connection") or b"").decode("latin-1")
        raise ValueError(
            f'WebSocket protocol violation: Connection header "{value}" does not contain Upgrade'
        )
    if b"websocket" not in _tokens(headers, b"upgrade"):
        value = (_first(headers, b"upgrade") or b"").decode("latin-1")
        raise ValueError(f'WebSocket protocol violation: Upgrade header "{value}" does not contain websocket')
    version = _first(headers, b"sec-websocket-version")
    if version is None or version.strip() != b"13":
        shown = (version or b"").decode("latin-1")
        raise ValueError(f'unsupported WebSocket protocol version (only 13 is supported): "{shown}"')
    key = _first(headers, b"sec-websocket-key")
    if key is None:
        raise ValueError("WebSocket protocol violation: missing Sec-WebSocket-Key")
    key = key.strip()
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16:
        raise ValueError(f'invalid Sec-WebSocket-Key "{key.decode("latin-1")}"')
    return key


def websocket_accept_response(key: bytes) -> bytes:
    """The 101 answer to a valid opening request (no extensions, no subprotocol)."""
    accept = generate_accept_token(key)
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


# ---- client side of an HTTP/1.1 upgrade --------------------------------------------------------


class UpgradeError(Exception):
    """The server did not switch protocols: `status` and, for Coder's JSON errors, `message`/`detail`."""

    def __init__(self, status: int, message: str, *, detail: str = "", body: bytes = b"") -> None:
        super().__init__(f"HTTP {status}: {message}" + (f" ({detail})" if detail else ""))
        self.status = status
        self.message = message
        self.detail = detail
        self.body = body

    def json(self) -> object:
        """The decoded JSON body, or None if it was not JSON."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None


@attrs.frozen
class UpgradeResponse:
    """A `101 Switching Protocols` head; `trailing` = bytes read past it (they belong to the new protocol)."""

    status: int
    headers: list[tuple[bytes, bytes]]  # names lower-case
    trailing: bytes


def _b(value: str | bytes) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else value


def _refusal(status: int, reason: bytes, body: bytes) -> UpgradeError:
    message, detail = reason.decode("latin-1") or f"status {status}", ""
    try:
        decoded = json.loads(body)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict):
        message = str(decoded.get("message", message))
        detail = str(decoded.get("detail", ""))
        validations = decoded.get("validations")
        if not detail and isinstance(validations, list) and validations:
            detail = "; ".join(
                f"{v.get('field')}: {v.get('detail')}" for v in validations if isinstance(v, dict)
            )
    elif body:
        message = body.decode("utf-8", "replace").strip()[:500] or message
    return UpgradeError(status, message, detail=detail, body=body)


async def request_upgrade(
    stream: trio.abc.Stream,
    target: str,
    headers: HeaderPairs,
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - a protocol bound, not a caller convenience
    max_head_bytes: int = MAX_HEAD_BYTES,
    max_body_bytes: int = 65536,
) -> UpgradeResponse:
    """Send `GET target` (headers must include Host, Connection and Upgrade) and read the answer.

    Returns the 101 head; any other final status raises UpgradeError carrying the status and the
    (bounded) body's JSON message. A silent server raises trio.TooSlowError after `timeout`.
    """
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head_bytes)
    request = conn.send(
        h11.Request(method="GET", target=target, headers=[(_b(k), _b(v)) for k, v in headers])
    )
    end = conn.send(h11.EndOfMessage())
    with trio.fail_after(timeout):
        await stream.send_all((request or b"") + (end or b""))
        response: h11.Response | None = None
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpgradeError(0, f"malformed HTTP response: {exc}") from None
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(RECEIVE_CHUNK)))
                continue
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    return UpgradeResponse(
                        status=101,
                        headers=[(k.lower(), v) for k, v in event.headers],
                        trailing=bytes(conn.trailing_data[0]),
                    )
                continue
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data[: max(0, max_body_bytes - len(body))]
                if len(body) >= max_body_bytes:
                    break
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed) or event is h11.PAUSED:
                break
        if response is None:
            raise UpgradeError(0, "the server closed the connection without answering")
        raise _refusal(response.status_code, response.reason, bytes(body))


async def connect_websocket(
    stream: trio.abc.Stream,
    host: str,
    path: str,
    headers: HeaderPairs = (),
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - a protocol bound, not a caller convenience
    max_message_size: int = MAX_MESSAGE_SIZE,
) -> WebSocketByteStream:
    """Client side: perform the RFC 6455 opening handshake on `stream`; return the byte stream.

    Raises UpgradeError (non-101 status, or a 101 with a wrong Sec-WebSocket-Accept).
    """
    key = base64.b64encode(os.urandom(16))
    request_headers: list[tuple[str | bytes, str | bytes]] = [
        ("Host", host),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", "13"),
        *headers,
    ]
    response = await request_upgrade(stream, path, request_headers, timeout=timeout)
    if b"websocket" not in _tokens(response.headers, b"upgrade"):
        raise UpgradeError(101, "the server switched to a protocol other than websocket")
    if (_first(response.headers, b"sec-websocket-accept") or b"").strip() != generate_accept_token(key):
        raise UpgradeError(101, "the server sent a wrong Sec-WebSocket-Accept")
    return WebSocketByteStream.client(stream, response.trailing, max_message_size=max_message_size)
