"""A bounded fuzzing campaign against a live ``agentd serve`` (``just fuzz``; issue 11 item 7).

Hypothesis drives the codecs in the test suite; this feeds the whole daemon, over its Unix socket,
what a hostile or broken agent could send, while a second, well-behaved agent (in another workspace)
keeps calling and the daemon's ``/healthz`` and RSS are checked throughout:

* ``bytes``      random bytes after a valid upgrade (raw yamux)
* ``transcript`` valid yamux + DRPC transcripts (SYNs, Invoke/Message/CloseSend of real RPCs with
  valid requests, window updates, pings, FINs) with random mutations: bit flips, byte changes,
  insertions, deletions, duplicated and truncated spans
* ``protobuf``   well-framed calls of every RPC of agentd/proto (Agent and Tailnet) whose request is
  random protobuf wire data (random field numbers, wire types and values) or random bytes
* ``http``       random and mutated HTTP request heads (methods, targets, versions, headers, tokens)

It lives in bench/ beside the other live-daemon measurements (it starts the daemon as a subprocess,
runs for minutes and prints numbers), not in the test suite; tests/test_fuzz_smoke.py runs it for a
few seconds. It starts ``python -m agentd serve`` on a fresh database (a new database on
``--postgres-url``'s server, dropped afterwards; without it, the embedded PostgreSQL in a temporary
data directory), creates the two workspaces with ``agentd admin create-workspace``, then runs until
``--seconds`` or ``--max-inputs``. It prints inputs run per kind, crashes (daemon exit, tracebacks in
its log), the good agent's failed calls, /healthz failures and the daemon's RSS before, after and at
most; the exit status is 1 if any of those is non-zero (RSS is reported, not judged).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import psycopg
import trio
from google.protobuf import message_factory

from agentd.client import RpcClient
from agentd.drpc.wire import Kind, append_packet
from agentd.handshake import upgrade_client
from agentd.mux import MuxConfig, MuxSession
from agentd.mux.frame import FLAG_ACK, FLAG_FIN, FLAG_RST, FLAG_SYN, TYPE_DATA, TYPE_PING, TYPE_WINDOW_UPDATE
from agentd.mux.frame import encode_header as yamux_header
from agentd.proto import agent_pb2, tailnet_pb2
from agentd.websocket import UpgradeError

ROOT = Path(__file__).resolve().parent.parent
RPC_PATH = "/api/v2/workspaceagents/me/rpc"
KINDS = ("bytes", "transcript", "protobuf", "http")
#: how long one input may take before the fuzzer gives up on it (the daemon is not blamed)
INPUT_TIMEOUT = 3.0

WORKSPACE = """
name = "{name}"
[owner]
username = "fuzz"
email = "fuzz@example.com"
[organization]
name = "fuzz"
[template]
name = "fuzz"
version = "v1"
[resource]
name = "dev"
type = "docker_container"
[[agents]]
name = "main"
operating_system = "linux"
architecture = "amd64"
"""


def rpc_methods() -> list[tuple[str, Any]]:
    """(path, request class) of every RPC in agentd/proto."""
    out = []
    for module, service in ((agent_pb2, "Agent"), (tailnet_pb2, "Tailnet")):
        desc = module.DESCRIPTOR.services_by_name[service]
        for method in desc.methods:
            path = f"/{desc.full_name}/{method.name}"
            out.append((path, message_factory.GetMessageClass(method.input_type)))
    return out


# ---- input generators (pure: a random.Random in, bytes out) -----------------------------------------


def random_protobuf(rng: random.Random, depth: int = 0) -> bytes:
    """Random protobuf wire data: plausible tags with varint, fixed, length-delimited (sometimes
    nested) values."""
    out = bytearray()
    for _ in range(rng.randrange(0, 8)):
        field = rng.choice((1, 2, 3, 4, 5, 6, 7, 8, rng.randrange(1, 1 << 29)))
        wire = rng.choice((0, 0, 1, 2, 2, 5, 3, 4, 6))
        out += _varint((field << 3) | wire)
        if wire == 0:
            out += _varint(rng.choice((0, 1, 2, 127, 1 << 31, (1 << 64) - 1, rng.getrandbits(64))))
        elif wire == 1:
            out += rng.randbytes(8)
        elif wire == 5:
            out += rng.randbytes(4)
        elif wire == 2:
            if depth < 3 and rng.random() < 0.4:
                body = random_protobuf(rng, depth + 1)
            else:
                body = rng.choice(
                    (b"", rng.randbytes(rng.randrange(0, 64)), b"\x00" * 16, "é\u0000".encode())
                )
            length = len(body) if rng.random() < 0.9 else rng.randrange(0, 1 << 20)
            out += _varint(length) + body
    if rng.random() < 0.1:
        out += rng.randbytes(rng.randrange(1, 32))
    return bytes(out)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def drpc_call(path: str, payload: bytes, stream_id: int = 1, close_send: bool = True) -> bytes:
    buf = bytearray()
    append_packet(buf, Kind.INVOKE, stream_id, 1, path.encode())
    append_packet(buf, Kind.MESSAGE, stream_id, 2, payload)
    if close_send:
        append_packet(buf, Kind.CLOSE_SEND, stream_id, 3)
    return bytes(buf)


def yamux_transcript(rng: random.Random, methods: list[tuple[str, Any]]) -> bytes:
    """A valid client transcript: a few streams, each one DRPC call of a real RPC (valid request)."""
    out = bytearray()
    for i in range(rng.randrange(1, 4)):
        sid = 1 + 2 * i
        path, request_type = rng.choice(methods)
        body = drpc_call(path, request_type().SerializeToString())
        out += yamux_header(TYPE_WINDOW_UPDATE, FLAG_SYN, sid, 0)
        out += yamux_header(TYPE_DATA, 0, sid, len(body)) + body
        if rng.random() < 0.3:
            out += yamux_header(TYPE_PING, FLAG_SYN, 0, rng.getrandbits(32))
        if rng.random() < 0.3:
            out += yamux_header(TYPE_WINDOW_UPDATE, 0, sid, rng.randrange(0, 1 << 20))
        out += yamux_header(TYPE_WINDOW_UPDATE, rng.choice((FLAG_FIN, FLAG_FIN, FLAG_RST, FLAG_ACK)), sid, 0)
    return bytes(out)


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        if not buf:
            buf += rng.randbytes(8)
        op = rng.randrange(6)
        pos = rng.randrange(len(buf))
        if op == 0:
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2:
            buf[pos:pos] = rng.randbytes(rng.randrange(1, 16))
        elif op == 3:
            del buf[pos : pos + rng.randrange(1, 16)]
        elif op == 4:
            end = min(len(buf), pos + rng.randrange(1, 64))
            buf[pos:pos] = buf[pos:end]
        else:
            del buf[pos:]
    return bytes(buf)


def http_head(rng: random.Random, token: str) -> bytes:
    valid = (
        f"GET {RPC_PATH}?version=2.10 HTTP/1.1\r\nHost: agentd\r\nConnection: Upgrade\r\n"
        f"Upgrade: yamux\r\nCoder-Session-Token: {token}\r\n\r\n"
    ).encode()
    choice = rng.randrange(4)
    if choice == 0:
        return mutate(rng, valid)
    if choice == 1:
        method = rng.choice((b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"BREW", rng.randbytes(5)))
        target = rng.choice(
            (b"/healthz", b"/metrics", RPC_PATH.encode() + b"?version=" + rng.randbytes(4), b"*", b"/" * 3000)
        )
        version = rng.choice((b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9.9", b"HTTP/2.0", b"HTTP/1.1x", b""))
        headers = b"".join(
            rng.choice(
                (b"Host: a", b"Upgrade: websocket", b"Content-Length: 99999999", b"X: " + rng.randbytes(9))
            )
            + b"\r\n"
            for _ in range(rng.randrange(0, 6))
        )
        return method + b" " + target + b" " + version + b"\r\n" + headers + b"\r\n"
    if choice == 2:
        return rng.randbytes(rng.randrange(1, 512)) + b"\r\n\r\n"
    return valid.replace(b"\r\n\r\n", b"\r\n" + b"X-Pad: " + b"a" * rng.randrange(1000, 20000) + b"\r\n\r\n")


# ---- the daemon ----------------------------------------------------------------------------------


@attrs.define
class Daemon:
    proc: trio.Process
    socket: Path
    log_path: Path

    def rss_kib(self) -> int:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


async def _agentd(*args: str) -> str:
    """Run an agentd command to completion; its stdout."""
    done = await trio.run_process(
        [sys.executable, "-m", "agentd", *args], cwd=ROOT, capture_stdout=True, capture_stderr=True
    )
    return done.stdout.decode()


@asynccontextmanager
async def fresh_database(server_url: str | None, tmp: Path) -> AsyncIterator[list[str]]:
    """agentd flags naming a fresh database: a new one on ``server_url`` (dropped after), else the
    embedded server in a new data directory."""
    if server_url is None:
        yield ["--data-dir", str(tmp / "data")]
        return
    name = f"agentd_fuzz_{secrets.token_hex(4)}"
    await _psql(server_url, f'CREATE DATABASE "{name}"')
    try:
        yield ["--postgres-url", psycopg.conninfo.make_conninfo(server_url, dbname=name)]
    finally:
        with trio.CancelScope(shield=True):
            await _psql(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _psql(url: str, statement: str) -> None:
    def run() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(statement.encode())

    await trio.to_thread.run_sync(run)


@asynccontextmanager
async def start_daemon(db_flags: list[str], tmp: Path) -> AsyncIterator[tuple[Daemon, str, str]]:
    """Migrate, create the two workspaces, serve on a Unix socket; yields (daemon, good token, fuzz token)."""
    await _agentd("migrate", *db_flags)
    tokens = []
    for name in ("good", "fuzz"):
        spec = tmp / f"{name}.toml"
        spec.write_text(WORKSPACE.format(name=name))
        out = json.loads(await _agentd("admin", "create-workspace", "--file", str(spec), "--json", *db_flags))
        tokens.append(out["agents"][0]["token"])
    sock = tmp / "agentd.sock"
    log_path = tmp / "agentd.log"
    command = [
        sys.executable,
        "-m",
        "agentd",
        "serve",
        "--listen",
        f"unix:{sock}",
        "--metrics-listen",
        "none",
    ]
    with log_path.open("wb") as log:
        proc = await trio.lowlevel.open_process([*command, *db_flags], cwd=ROOT, stdout=log, stderr=log)
    daemon = Daemon(proc, sock, log_path)
    try:
        with trio.fail_after(60):
            while "ready" not in daemon.log_text():
                if proc.poll() is not None:
                    raise RuntimeError(f"agentd serve exited: {daemon.log_text()[-2000:]}")
                await trio.sleep(0.1)
        yield daemon, tokens[0], tokens[1]
    finally:
        with trio.CancelScope(shield=True):
            if proc.poll() is None:
                proc.terminate()
                with trio.move_on_after(15):
                    await proc.wait()
                if proc.poll() is None:
                    proc.kill()
                    await proc.wait()


# ---- the campaign --------------------------------------------------------------------------------


@attrs.define
class Stats:
    inputs: Counter[str] = attrs.field(factory=Counter)
    good_ok: int = 0
    good_failed: int = 0
    good_errors: Counter[str] = attrs.field(factory=Counter)
    health_ok: int = 0
    health_failed: int = 0
    rss_max: int = 0


async def _read_until_closed(stream: trio.abc.ReceiveStream, limit: float) -> None:
    with trio.move_on_after(limit):
        try:
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def _upgraded(daemon: Daemon, token: str) -> trio.abc.Stream:
    stream = await trio.open_unix_socket(str(daemon.socket))
    return await upgrade_client(stream, token=token, role=None, timeout=INPUT_TIMEOUT)


async def fuzz_raw(daemon: Daemon, token: str, data: bytes) -> None:
    """Send ``data`` on a freshly upgraded transport, then read until the daemon closes (bounded)."""
    transport = await _upgraded(daemon, token)
    async with transport:
        try:
            await transport.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        await _read_until_closed(transport, 0.25)


async def fuzz_http(daemon: Daemon, head: bytes) -> None:
    stream = await trio.open_unix_socket(str(daemon.socket))
    async with stream:
        try:
            await stream.send_all(head)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        await _read_until_closed(stream, 0.25)


async def fuzz_calls(daemon: Daemon, token: str, payloads: list[tuple[str, bytes]], stats: Stats) -> None:
    """Well-framed DRPC calls (one mux stream each) with the given request bytes, on one session."""
    transport = await _upgraded(daemon, token)
    session = MuxSession(transport, is_client=True, config=MuxConfig(enable_keepalive=False))
    async with trio.open_nursery() as nursery:
        await nursery.start(session.run)
        for path, payload in payloads:
            try:
                stream = await session.open_stream()
                await stream.send_all(drpc_call(path, payload))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break
            stats.inputs["protobuf"] += 1
            await _read_until_closed(stream, 0.2)
            await stream.aclose()
        await session.aclose()


async def good_agent(daemon: Daemon, token: str, stats: Stats, stop: trio.Event) -> None:
    """A well-behaved agent: GetManifest, GetAnnouncementBanners, UpdateStats in a loop; every failed
    call (error, timeout or lost session) is counted and the agent redials."""
    while not stop.is_set():
        try:
            stream = await trio.open_unix_socket(str(daemon.socket))
            transport = await upgrade_client(stream, token=token, role="agent", timeout=10)
            session = MuxSession(transport, is_client=True)
            async with trio.open_nursery() as nursery:
                await nursery.start(session.run)
                client = RpcClient(session)
                while not stop.is_set():
                    with trio.fail_after(10):
                        manifest = await client.agent.GetManifest(agent_pb2.GetManifestRequest())
                        assert manifest.agent_name == "main"
                        await client.agent.GetAnnouncementBanners(agent_pb2.GetAnnouncementBannersRequest())
                        await client.agent.UpdateStats(agent_pb2.UpdateStatsRequest())
                    stats.good_ok += 3
                    await trio.sleep(0.05)
                await session.aclose()
        except Exception as exc:
            stats.good_failed += 1
            stats.good_errors[f"{type(exc).__name__}: {exc}"[:200]] += 1
            await trio.sleep(0.5)


async def health_checks(daemon: Daemon, stats: Stats, stop: trio.Event) -> None:
    while not stop.is_set():
        stats.rss_max = max(stats.rss_max, daemon.rss_kib())
        try:
            with trio.fail_after(5):
                stream = await trio.open_unix_socket(str(daemon.socket))
                async with stream:
                    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    raw = b""
                    while chunk := await stream.receive_some(65536):
                        raw += chunk
            ok = raw.startswith(b"HTTP/1.1 200 ")
        except (OSError, trio.TooSlowError, trio.BrokenResourceError):
            ok = False
        if ok:
            stats.health_ok += 1
        else:
            stats.health_failed += 1
        await trio.sleep(1)


async def fuzz_worker(
    daemon: Daemon, token: str, rng: random.Random, stats: Stats, stop: trio.Event, budget: Callable[[], bool]
) -> None:
    methods = rpc_methods()
    while not stop.is_set() and budget():
        kind = rng.choice(KINDS)
        try:
            with trio.move_on_after(INPUT_TIMEOUT * 3):
                if kind == "bytes":
                    size = rng.choice((rng.randrange(1, 64), rng.randrange(64, 4096), 65536))
                    await fuzz_raw(daemon, token, rng.randbytes(size))
                elif kind == "transcript":
                    await fuzz_raw(daemon, token, mutate(rng, yamux_transcript(rng, methods)))
                elif kind == "http":
                    await fuzz_http(
                        daemon, http_head(rng, token if rng.random() < 0.5 else secrets.token_hex(16))
                    )
                else:
                    batch = []
                    for _ in range(20):
                        path, _type = rng.choice(methods)
                        payload = (
                            random_protobuf(rng) if rng.random() < 0.8 else rng.randbytes(rng.randrange(64))
                        )
                        batch.append((path, payload))
                    await fuzz_calls(daemon, token, batch, stats)  # counts each call it sends
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass  # the daemon refusing or dropping a bad input is fine; health is checked separately
        except UpgradeError:
            pass  # e.g. refused while the daemon is busy: not a crash (health is checked separately)
        if kind != "protobuf":
            stats.inputs[kind] += 1


async def campaign(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    stats = Stats()
    with tempfile.TemporaryDirectory(prefix="agentd-fuzz-") as tmpdir:
        tmp = Path(tmpdir)
        async with (
            fresh_database(args.postgres_url, tmp) as db_flags,
            start_daemon(db_flags, tmp) as (
                daemon,
                good_token,
                fuzz_token,
            ),
        ):
            rss_before = daemon.rss_kib()
            stats.rss_max = rss_before
            stop = trio.Event()
            started = time.monotonic()

            def budget() -> bool:
                return sum(stats.inputs.values()) < args.max_inputs

            async with trio.open_nursery() as nursery:
                nursery.start_soon(good_agent, daemon, good_token, stats, stop)
                nursery.start_soon(health_checks, daemon, stats, stop)
                with trio.move_on_after(args.seconds):
                    async with trio.open_nursery() as workers:
                        for i in range(args.workers):
                            workers.start_soon(
                                fuzz_worker,
                                daemon,
                                fuzz_token,
                                random.Random(rng.getrandbits(64) + i),
                                stats,
                                stop,
                                budget,
                            )
                        await daemon.proc.wait()  # the daemon exited: a crash
                        workers.cancel_scope.cancel()
                # Let the daemon settle, then one last good round and health check.
                await trio.sleep(2)
                stop.set()
            elapsed = time.monotonic() - started
            rss_after = daemon.rss_kib()
            exited = daemon.proc.poll()
            log_text = daemon.log_text()
    tracebacks = log_text.count("Traceback (most recent call last)")
    error_lines = Counter(line.split(" ERROR ", 1)[1] for line in log_text.splitlines() if " ERROR " in line)
    errors = sum(error_lines.values())
    total = sum(stats.inputs.values())
    print(f"agentd fuzz campaign: {elapsed:.0f} s, seed {args.seed}, {args.workers} workers")
    print(f"inputs run: {total} ({', '.join(f'{k} {stats.inputs[k]}' for k in KINDS)})")
    print(f"crashes: daemon exit {'none' if exited is None else exited}, tracebacks in its log {tracebacks}")
    print(f"daemon log ERROR lines: {errors}")
    for text, count in error_lines.most_common(8):
        print(f"  {count} x {text[:200]}")
    print(f"good agent: {stats.good_ok} calls ok, {stats.good_failed} failed")
    for text, count in stats.good_errors.most_common(5):
        print(f"  {count} x {text}")
    print(f"/healthz: {stats.health_ok} ok, {stats.health_failed} failed")
    mib = [f"{kib / 1024:.1f} MiB" for kib in (rss_before, rss_after, stats.rss_max)]
    print(f"daemon RSS: before {mib[0]}, after {mib[1]}, max {mib[2]}")
    if tracebacks:
        first = log_text.index("Traceback (most recent call last)")
        print("first traceback:\n" + log_text[max(0, first - 300) : first + 3000])
    bad = exited is not None or tracebacks or stats.good_failed or stats.health_failed
    return 1 if bad else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180.0, help="how long to fuzz (default 180)")
    parser.add_argument("--max-inputs", type=int, default=10**9, help="stop after this many inputs")
    parser.add_argument("--workers", type=int, default=8, help="concurrent fuzzing connections (default 8)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("AGENTD_TEST_POSTGRES_URL"),
        help="PostgreSQL server to create a fresh database on (default $AGENTD_TEST_POSTGRES_URL; "
        "unset: the embedded server in a temporary data directory)",
    )
    args = parser.parse_args()
    if args.seed is None:
        args.seed = secrets.randbits(32)
    sys.exit(trio.run(campaign, args))


if __name__ == "__main__":
    main()
