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
calls/s and p50/p99 latency; the ratio compares each RPC row with its mux baseline per call.  A
baseline and its RPC mode alternate every 100 calls, so a noisy shared machine loads both alike.
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


Worker = Callable[[], Awaitable[object]]

#: Calls per alternation slice: baseline and RPC take turns so both see the same machine load.
SLICE = 100


async def _measure_pair(
    makers: tuple[Callable[[], Awaitable[Worker]], Callable[[], Awaitable[Worker]]],
    calls: int,
    concurrency: int,
) -> list[tuple[float, list[float]]]:
    """Run ``calls`` operations of each of two modes over ``concurrency`` tasks, alternating the
    modes every SLICE calls; return (calls/s, per-call latencies) for each mode."""
    workers = [[await make() for _ in range(concurrency)] for make in makers]
    for ws in workers:  # warm up
        for w in ws:
            await w()
    lat: list[list[float]] = [[], []]
    busy = [0.0, 0.0]
    done = [0, 0]
    per_slice = max(1, SLICE // concurrency)

    async def run(w: Worker, out: list[float]) -> None:
        clock = time.perf_counter
        for _ in range(per_slice):
            t0 = clock()
            await w()
            out.append(clock() - t0)

    while done[0] < calls:
        for i in (0, 1):
            t0 = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for w in workers[i]:
                    nursery.start_soon(run, w, lat[i])
            busy[i] += time.perf_counter() - t0
            done[i] += per_slice * concurrency
    return [(done[i] / busy[i], lat[i]) for i in (0, 1)]


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

        pairs = [
            (("mux new stream", mux_new), ("rpc new stream", rpc_new)),
            (("mux same stream", mux_same), ("rpc same stream", rpc_same)),
        ]
        for concurrency in (1, 32):
            for (base_name, base_make), (rpc_name, rpc_make) in pairs:
                measured = await _measure_pair((base_make, rpc_make), calls, concurrency)
                for name, (rate, lat) in zip((base_name, rpc_name), measured, strict=True):
                    results[(name, concurrency)] = (rate, _pct(lat, 0.5), _pct(lat, 0.99))
        for conn in conns:
            await conn.aclose()
        for s in echo_streams:
            await s.aclose()
        nursery.cancel_scope.cancel()
    return results


async def _cpu_once(mode: str, calls: int) -> float:
    """CPU µs per call with client and server in this process over a memory stream pair."""
    import trio.testing

    a, b = trio.testing.memory_stream_pair()
    cs = MuxSession(a, is_client=True)
    ss = MuxSession(b, is_client=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(cs.run)
        await nursery.start(ss.run)
        if mode.startswith("rpc"):
            await nursery.start(serve_session, ss, _registry())
        else:
            nursery.start_soon(_echo_session, ss)
        client = RpcClient(cs)
        conn = RpcConn(await cs.open_stream())
        stream = await cs.open_stream()

        async def mux_same() -> None:
            await stream.send_all(PAYLOAD)
            got = 0
            while got < len(PAYLOAD):
                got += len(await stream.receive_some())

        op: Worker = {
            "mux new stream": lambda: _mux_new_stream(cs),
            "rpc new stream": lambda: client.agent.GetServiceBanner(),
            "mux same stream": mux_same,
            "rpc same stream": lambda: conn.unary(BANNER),
        }[mode]
        for _ in range(100):
            await op()
        t0 = time.process_time()
        for _ in range(calls):
            await op()
        cpu = (time.process_time() - t0) / calls
        nursery.cancel_scope.cancel()
    return cpu


def cpu_table(runs: int, calls: int) -> None:
    """Client + server CPU per call in one process (robust on a busy machine): min over runs."""
    names = ("mux new stream", "rpc new stream", "mux same stream", "rpc same stream")
    best = {n: min(trio.run(_cpu_once, n, calls) for _ in range(runs)) for n in names}
    print()
    print(f"in-process CPU per call (client + server, memory streams, min of {runs} runs of {calls} calls)")
    print("| mode             | CPU us/call |  ratio |")
    print("|-----------------:|------------:|-------:|")
    for n in names:
        ratio = f"{best[n] / best['mux' + n[3:]]:.2f}x" if n.startswith("rpc") else ""
        print(f"| {n:<16} | {best[n] * 1e6:>11.0f} | {ratio:>6} |")


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
    cpu_table(runs, calls // 2)
    return 0


def _print(all_runs: list[dict[tuple[str, int], tuple[float, float, float]]], runs: int, calls: int) -> None:
    print("agentd.drpc unary calls over agentd.mux, Unix socket, server in another process")
    print(f"median of {runs} run(s), {calls} calls per mode; latencies in microseconds")
    print("ratio = rpc cost / its mux baseline: by throughput (calls/s) and by median latency (p50)")
    print()
    head = ("mode", "in flight", "calls/s", "p50 us", "p99 us", "ratio/s", "ratio p50")
    print("| {:<16} | {:>9} | {:>9} | {:>8} | {:>8} | {:>7} | {:>9} |".format(*head))
    print("|" + "|".join("-" * (w + 1) + ":" for w in (16, 9, 9, 8, 8, 7, 9)) + "|")
    baseline = {"rpc new stream": "mux new stream", "rpc same stream": "mux same stream"}
    for concurrency in (1, 32):
        for name in ("mux new stream", "rpc new stream", "mux same stream", "rpc same stream"):
            key = (name, concurrency)
            rate = statistics.median(r[key][0] for r in all_runs)
            p50 = statistics.median(r[key][1] for r in all_runs)
            p99 = statistics.median(r[key][2] for r in all_runs)
            by_rate = by_p50 = ""
            if name in baseline:
                base = (baseline[name], concurrency)
                by_rate = f"{statistics.median(r[base][0] for r in all_runs) / rate:.2f}x"
                by_p50 = f"{p50 / statistics.median(r[base][1] for r in all_runs):.2f}x"
            row = (name, concurrency, f"{rate:.0f}", f"{p50 * 1e6:.0f}", f"{p99 * 1e6:.0f}", by_rate, by_p50)
            print("| {:<16} | {:>9} | {:>9} | {:>8} | {:>8} | {:>7} | {:>9} |".format(*row))


if __name__ == "__main__":
    sys.exit(main())
