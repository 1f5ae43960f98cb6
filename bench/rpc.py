"""DRPC unary call cost over agentd.mux on a Unix socket, beside the bare mux round trip.

The server runs in a separate process (``--serve DIR``, started by the benchmark itself).  It
listens on two sockets: ``rpc`` (agentd.drpc serve_session with the real coder.agent.v2 registry,
GetServiceBanner answering an empty ServiceBanner) and ``echo`` (every mux stream echoes what it
reads until EOF, then closes).  The client measures, in the same run:

* ``mux new stream``   open a stream, send 64 bytes, read 64 back, close  (baseline for RPCs)
* ``rpc new stream``   one unary call on a fresh mux stream (Coder's pattern)
* ``mux same stream``  64-byte round trip on one long-lived stream       (baseline for the next)
* ``rpc same stream``  sequential unary calls on one mux stream (DRPC stream ids 1, 2, ...)

each sequentially and with 32 in flight (32 tasks; "same stream" = one stream per task), reporting
calls/s and p50/p99 latency; the ratio compares each RPC row with its mux baseline per call.
Median of ``--runs`` (≥ 3) runs.  ``--quick`` for a short smoke run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentd.client import RpcClient, RpcConn
from agentd.drpc.registry import Registry, method_table
from agentd.drpc.server import serve_session
from agentd.mux import MuxSession

BANNER = "/coder.agent.v2.Agent/GetServiceBanner"
PAYLOAD = b"x" * 64


# ------------------------------------------------------------------------------------- server


def _registry() -> Registry:
    from agentd.proto import agent_pb2

    async def banner(_req: agent_pb2.GetServiceBannerRequest) -> agent_pb2.ServiceBanner:
        return agent_pb2.ServiceBanner()

    return Registry.build(handlers={BANNER: banner}, unimplemented=set(method_table()) - {BANNER})


async def _echo_stream(stream: trio.abc.HalfCloseableStream) -> None:
    try:
        while data := await stream.receive_some():
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


async def _echo_session(session: MuxSession) -> None:
    async with trio.open_nursery() as nursery:
        while True:
            try:
                stream = await session.accept_stream()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            nursery.start_soon(_echo_stream, stream)


async def _serve_conn(sock: trio.SocketStream, kind: str, registry: Registry) -> None:
    session = MuxSession(sock, is_client=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(session.run)
        if kind == "rpc":
            await serve_session(session, registry)
        else:
            await _echo_session(session)
        nursery.cancel_scope.cancel()


async def serve(directory: str) -> None:
    registry = _registry()
    async with trio.open_nursery() as nursery:
        for kind in ("rpc", "echo"):
            path = os.path.join(directory, kind)
            sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
            await sock.bind(path)
            sock.listen(128)
            listener = trio.SocketListener(sock)

            async def handler(stream: trio.SocketStream, kind: str = kind) -> None:
                await _serve_conn(stream, kind, registry)

            nursery.start_soon(trio.serve_listeners, handler, [listener])
        print("ready", flush=True)
        # Exit when the benchmark closes our stdin.
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------------- client


async def _connect(directory: str, kind: str, nursery: trio.Nursery) -> MuxSession:
    sock = await trio.open_unix_socket(os.path.join(directory, kind))
    session = MuxSession(sock, is_client=True)
    await nursery.start(session.run)
    return session


async def _mux_new_stream(session: MuxSession) -> None:
    stream = await session.open_stream()
    await stream.send_all(PAYLOAD)
    got = 0
    while got < len(PAYLOAD):
        data = await stream.receive_some()
        if not data:
            raise RuntimeError("echo ended early")
        got += len(data)
    await stream.aclose()


async def _measure(
    make_worker: Callable[[], Awaitable[Callable[[], Awaitable[object]]]], calls: int, concurrency: int
) -> tuple[float, list[float]]:
    """Run ``calls`` operations split over ``concurrency`` tasks; (calls/s, per-call latencies)."""
    workers = [await make_worker() for _ in range(concurrency)]
    # Warm up each worker.
    for w in workers:
        await w()
    lat: list[float] = []
    per = calls // concurrency

    async def run(w: Callable[[], Awaitable[object]]) -> None:
        clock = time.perf_counter
        for _ in range(per):
            t0 = clock()
            await w()
            lat.append(clock() - t0)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for w in workers:
            nursery.start_soon(run, w)
    elapsed = time.perf_counter() - t0
    return per * concurrency / elapsed, lat


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def bench_once(directory: str, calls: int) -> dict[tuple[str, int], tuple[float, float, float]]:
    results: dict[tuple[str, int], tuple[float, float, float]] = {}
    async with trio.open_nursery() as nursery:
        rpc_session = await _connect(directory, "rpc", nursery)
        echo_session = await _connect(directory, "echo", nursery)
        client = RpcClient(rpc_session)
        conns: list[RpcConn] = []
        echo_streams: list[trio.abc.HalfCloseableStream] = []

        async def mux_new() -> Callable[[], Awaitable[object]]:
            return lambda: _mux_new_stream(echo_session)

        async def rpc_new() -> Callable[[], Awaitable[object]]:
            return lambda: client.agent.GetServiceBanner()

        async def mux_same() -> Callable[[], Awaitable[object]]:
            stream = await echo_session.open_stream()
            echo_streams.append(stream)

            async def rt() -> None:
                await stream.send_all(PAYLOAD)
                got = 0
                while got < len(PAYLOAD):
                    got += len(await stream.receive_some())

            return rt

        async def rpc_same() -> Callable[[], Awaitable[object]]:
            conn = RpcConn(await rpc_session.open_stream())
            conns.append(conn)
            return lambda: conn.unary(BANNER)

        modes = [
            ("mux new stream", mux_new),
            ("rpc new stream", rpc_new),
            ("mux same stream", mux_same),
            ("rpc same stream", rpc_same),
        ]
        for concurrency in (1, 32):
            for name, make in modes:
                rate, lat = await _measure(make, calls, concurrency)
                results[(name, concurrency)] = (rate, _pct(lat, 0.5), _pct(lat, 0.99))
        for conn in conns:
            await conn.aclose()
        for s in echo_streams:
            await s.aclose()
        nursery.cancel_scope.cancel()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--serve", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="short smoke run (1 run, few calls)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--calls", type=int, default=4000, help="calls per mode per run")
    args = parser.parse_args()
    if args.serve:
        trio.run(serve, args.serve)
        return 0
    runs, calls = (1, 320) if args.quick else (max(3, args.runs), args.calls)
    with tempfile.TemporaryDirectory() as directory:
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", directory],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        try:
            assert server.stdout is not None
            if server.stdout.readline().strip() != "ready":
                raise RuntimeError("server did not start")
            all_runs = [trio.run(bench_once, directory, calls) for _ in range(runs)]
        finally:
            if server.stdin is not None:
                server.stdin.close()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    _print(all_runs, runs, calls)
    return 0


def _print(all_runs: list[dict[tuple[str, int], tuple[float, float, float]]], runs: int, calls: int) -> None:
    print("agentd.drpc unary calls over agentd.mux, Unix socket, server in another process")
    print(
        f"median of {runs} run(s), {calls} calls per mode; latency in µs; ratio = cost per call vs mux baseline"
    )
    print()
    print(
        f"| {'mode':<16} | {'in flight':>9} | {'calls/s':>9} | {'p50 µs':>8} | {'p99 µs':>8} | {'ratio':>6} |"
    )
    print(f"|{'-' * 18}|{'-' * 11}:|{'-' * 10}:|{'-' * 9}:|{'-' * 9}:|{'-' * 7}:|")
    baseline = {"rpc new stream": "mux new stream", "rpc same stream": "mux same stream"}
    for concurrency in (1, 32):
        for name in ("mux new stream", "rpc new stream", "mux same stream", "rpc same stream"):
            key = (name, concurrency)
            rate = statistics.median(r[key][0] for r in all_runs)
            p50 = statistics.median(r[key][1] for r in all_runs)
            p99 = statistics.median(r[key][2] for r in all_runs)
            ratio = ""
            if name in baseline:
                base = statistics.median(r[(baseline[name], concurrency)][0] for r in all_runs)
                ratio = f"{base / rate:.2f}x"
            print(
                f"| {name:<16} | {concurrency:>9} | {rate:>9.0f} | {p50 * 1e6:>8.0f} | {p99 * 1e6:>8.0f} | {ratio:>6} |"
            )


if __name__ == "__main__":
    sys.exit(main())
