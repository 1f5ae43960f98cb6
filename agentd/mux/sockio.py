"""The socket fast path of the trio yamux adapter: direct syscalls on a `trio.SocketStream`'s
descriptor, and the read buffer every session of a thread shares."""

from __future__ import annotations

import os
import threading

import trio
from trio.lowlevel import wait_readable, wait_writable

__all__ = ["IOV_MAX", "RECV_SIZE", "SocketIO", "shared_recv"]

#: transport read size. Each read's Data bodies become new bytes objects handed to the streams;
#: at 64 KiB they stay below glibc's mmap/trim thresholds, so the heap is reused instead of growing
#: and shrinking (brk + page faults) once per read as it did with 512 KiB reads
RECV_SIZE = 64 * 1024


class SharedRecvBuffer(threading.local):
    """The socket fast path's read buffer: one per thread, shared by every session's reader.

    A session only needs the buffer from a read until `Connection.receive_data` returns, which
    copies out everything it keeps (Data bodies as bytes, a split header into its own bytearray);
    the reader does both without an await in between, so no other reader of the thread can run in
    that window. A buffer per session cost 64 KiB of RSS per connected agent, mostly idle.
    """

    def __init__(self) -> None:
        self.view = memoryview(bytearray(RECV_SIZE))


#: this thread's buffer (`shared_recv.view`)
shared_recv = SharedRecvBuffer()

#: most buffers one writev takes (Linux IOV_MAX)
IOV_MAX = 1024


class SocketIO:
    """Direct syscalls on a `trio.SocketStream`'s descriptor (the transport fast path).

    `SocketStream.receive_some` tries a read first (one EAGAIN per frame on a request/response
    pattern), allocates a fresh buffer per call and yields after every success; `send_all` needs one
    joined buffer per write and yields after it too. Here the reader waits for readability after a
    short read and reads into one reused buffer (one per thread, `SharedRecvBuffer`), and the
    writer hands every queued frame to one `writev` (no joining copy) without a scheduler pass
    unless the socket is full. The socket is
    still owned (and closed) by the stream; trio's `notify_closing` wakes our waits if it closes.
    """

    __slots__ = ("_sock", "fd")

    def __init__(self, stream: trio.SocketStream) -> None:
        self._sock = stream.socket
        self.fd = stream.socket.fileno()

    def _check_open(self) -> None:
        if self._sock.fileno() != self.fd:
            raise trio.ClosedResourceError("transport closed")

    async def recv_into(self, buf: memoryview, wait: bool) -> int:
        """Read into `buf`; with `wait`, wait for readability first (the last read was short, so the
        socket is most likely empty). Never returns without data or EOF."""
        fd = self.fd
        while True:
            if wait:
                await wait_readable(fd)
            self._check_open()
            try:
                return os.readv(fd, [buf])
            except BlockingIOError:
                wait = True
            except OSError as exc:
                raise trio.BrokenResourceError(f"transport read failed: {exc}") from exc

    def send_nowait(self, chunks: list[bytes | memoryview]) -> list[bytes | memoryview]:
        """One writev attempt that never waits; returns what it could not write."""
        if len(chunks) > IOV_MAX:
            return chunks
        self._check_open()
        try:
            n = os.writev(self.fd, chunks)
        except BlockingIOError:
            return chunks
        except OSError as exc:
            raise trio.BrokenResourceError(f"transport write failed: {exc}") from exc
        idx = 0
        count = len(chunks)
        while idx < count and n >= len(chunks[idx]):
            n -= len(chunks[idx])
            idx += 1
        if idx == count:
            return []
        rest = chunks[idx:]
        if n:
            rest[0] = memoryview(rest[0])[n:]
        return rest

    async def send_chunks(self, chunks: list[bytes | memoryview]) -> bool:
        """Write every chunk, in order, with as few writev calls as the socket allows; True if it
        had to wait (that was a checkpoint)."""
        fd = self.fd
        waited = False
        idx = 0
        count = len(chunks)
        while idx < count:
            batch = chunks if idx == 0 and count <= IOV_MAX else chunks[idx : idx + IOV_MAX]
            self._check_open()
            try:
                n = os.writev(fd, batch)
            except BlockingIOError:
                waited = True
                await wait_writable(fd)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"transport write failed: {exc}") from exc
            while n:
                size = len(chunks[idx])
                if n >= size:
                    n -= size
                    idx += 1
                else:
                    chunks[idx] = memoryview(chunks[idx])[n:]
                    n = 0
            while idx < count and not len(chunks[idx]):
                idx += 1
        return waited
