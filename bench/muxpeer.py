"""Python side of the multiplexer benchmark: the twin of interop/goyamux's -bench and server modes.

    python bench/muxpeer.py --impl raw|mux --listen unix:PATH|tcp:HOST:PORT
    python bench/muxpeer.py --impl raw|mux --dial ADDR --bench WORKLOAD [--size N] [--streams K] ...

`mux` runs agentd.mux (a listener is the yamux server, a dialer the yamux client); `raw` runs the
same workloads over plain trio sockets, one connection standing in for each stream, as the ceiling.
Both speak goyamux's per-stream protocol (a command line "E\\n" echo or "S\\n" sink, then payload) and
print the same JSON result line, so bench/mux.py can pair any client with any server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

READ = 256 * 1024
Opener = Callable[[], Awaitable[trio.abc.HalfCloseableStream]]


def pattern(n: int) -> bytes:
    return bytes((i * 7 + (i >> 8)) & 0xFF for i in range(min(n, 65536))) * (n // 65536 + 1)


# ---------------------------------------------------------------------------------------------
# Server side


async def handle(stream: trio.abc.HalfCloseableStream) -> None:
    """One stream (or raw connection): read the command line, then echo or sink."""
    try:
        buffered = b""
        while b"\n" not in buffered:
            chunk = await stream.receive_some(READ)
            if not chunk:
                return
            buffered += chunk
        line, _, rest = buffered.partition(b"\n")
        command = line.strip()
        if command in (b"E", b"echo"):
            if rest:
                await stream.send_all(rest)
            while data := await stream.receive_some(READ):
                await stream.send_all(data)
        elif command in (b"S", b"sink"):
            count = len(rest)
            while data := await stream.receive_some(READ):
                count += len(data)
            await stream.send_all(b"%d\n" % count)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await _close(stream)


async def _close(stream: trio.abc.HalfCloseableStream) -> None:
    try:
        await stream.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def serve_connection(impl: str, conn: trio.SocketStream, window: int) -> None:
    if impl == "raw":
        await handle(conn)
        return
    from agentd.mux import MuxConfig, MuxSession

    session = MuxSession(conn, is_client=False, config=MuxConfig(max_stream_window=window))
    async with trio.open_nursery() as nursery:
        await nursery.start(session.run)
        try:
            while True:
                stream = await session.accept_stream()
                nursery.start_soon(handle, stream)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await session.aclose()


async def listen(address: str) -> trio.SocketListener:
    family, _, rest = address.partition(":")
    if family == "unix":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(rest)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(rest)
    else:
        host, _, port = rest.rpartition(":")
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind((host, int(port)))
    sock.listen(512)
    return trio.SocketListener(sock)


async def serve(impl: str, address: str, window: int) -> None:
    listener = await listen(address)
    name = listener.socket.getsockname()
    shown = f"unix:{name}" if isinstance(name, str) else f"tcp:{name[0]}:{name[1]}"
    print(f"LISTENING {shown}", flush=True)
    async with trio.open_nursery() as nursery:
        while True:
            conn = await listener.accept()
            nursery.start_soon(serve_connection, impl, conn, window)


# ---------------------------------------------------------------------------------------------
# Client side


async def connect(address: str) -> trio.SocketStream:
    family, _, rest = address.partition(":")
    if family == "unix":
        return await trio.open_unix_socket(rest)
    host, _, port = rest.rpartition(":")
    return await trio.open_tcp_stream(host, int(port))


async def read_exactly(stream: trio.abc.ReceiveStream, n: int) -> None:
    while n > 0:
        data = await stream.receive_some(n)
        if not data:
            raise trio.BrokenResourceError(f"EOF with {n} bytes still expected")
        n -= len(data)


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    out = bytearray()
    while data := await stream.receive_some(READ):
        out += data
    return bytes(out)


async def workload(open_stream: Opener, args: argparse.Namespace) -> tuple[int, str]:
    chunk = pattern(args.chunk)[: args.chunk]
    name = args.bench
    if name == "sink":
        stream = await open_stream()
        await stream.send_all(b"S\n")
        left = args.size
        while left > 0:
            part = chunk if left >= len(chunk) else chunk[:left]
            await stream.send_all(part)
            left -= len(part)
        await stream.send_eof()
        answer = await read_to_eof(stream)
        await stream.aclose()
        if answer.strip() != str(args.size).encode():
            raise RuntimeError(f"sink counted {answer!r}")
        return args.size, "MB/s"
    if name == "echo":
        per = args.size // args.streams

        async def one() -> None:
            stream = await open_stream()
            await stream.send_all(b"E\n")

            async def writer() -> None:
                left = per
                while left > 0:
                    part = chunk if left >= len(chunk) else chunk[:left]
                    await stream.send_all(part)
                    left -= len(part)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                await read_exactly(stream, per)
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            for _ in range(args.streams):
                nursery.start_soon(one)
        return per * args.streams, "MB/s"
    if name == "rt":
        stream = await open_stream()
        await stream.send_all(b"E\n")
        msg = chunk[:64]
        count = 0
        end = time.perf_counter() + args.duration
        while time.perf_counter() < end:
            await stream.send_all(msg)
            await read_exactly(stream, 64)
            count += 1
        await stream.aclose()
        return count, "op/s"
    if name == "newstream":
        request = b"E\n" + chunk[:64]
        count = 0
        end = time.perf_counter() + args.duration
        while time.perf_counter() < end:
            stream = await open_stream()
            await stream.send_all(request)
            await read_exactly(stream, 64)
            await stream.aclose()
            count += 1
        return count, "op/s"
    if name == "openclose":
        count = 0
        end = time.perf_counter() + args.duration

        async def opener() -> None:
            nonlocal count
            while time.perf_counter() < end:
                stream = await open_stream()
                await stream.aclose()
                count += 1

        async with trio.open_nursery() as nursery:
            for _ in range(args.workers):
                nursery.start_soon(opener)
        stream = await open_stream()
        await stream.send_all(b"E\nx")
        await read_exactly(stream, 1)
        await stream.aclose()
        return count, "op/s"
    raise SystemExit(f"unknown workload {name!r}")


async def client(args: argparse.Namespace) -> dict[str, Any]:
    cpu_start = time.process_time()
    if args.impl == "raw":
        start = time.perf_counter()
        n, unit = await workload(lambda: connect(args.dial), args)
        seconds = time.perf_counter() - start
    else:
        from agentd.mux import MuxConfig, MuxSession

        conn = await connect(args.dial)
        session = MuxSession(conn, is_client=True, config=MuxConfig(max_stream_window=args.window))
        async with trio.open_nursery() as nursery:
            await nursery.start(session.run)
            start = time.perf_counter()
            n, unit = await workload(session.open_stream, args)
            seconds = time.perf_counter() - start
            await session.aclose()
            nursery.cancel_scope.cancel()
    value = n / seconds / 1e6 if unit == "MB/s" else n / seconds
    cpu = time.process_time() - cpu_start  # CPU of the workload only, not of interpreter start-up
    result = {"workload": args.bench, "n": n, "seconds": seconds, "unit": unit, "value": value, "cpu": cpu}
    return {**result, "error": ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--impl", choices=["raw", "mux"], required=True)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen")
    where.add_argument("--dial")
    parser.add_argument("--bench", default="sink")
    parser.add_argument("--size", type=int, default=64 << 20)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--chunk", type=int, default=256 << 10)
    parser.add_argument(
        "--window", type=int, default=256 << 10, help="agentd.mux max_stream_window (default 256 KiB)"
    )
    args = parser.parse_args()
    if args.listen:
        try:
            trio.run(serve, args.impl, args.listen, args.window)
        except KeyboardInterrupt:
            pass
    else:
        print(json.dumps(trio.run(client, args)), flush=True)


if __name__ == "__main__":
    main()
