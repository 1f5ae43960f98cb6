"""The Go hashicorp/yamux peer (interop/goyamux) for interop tests and bench/mux.py.

`build_go_peer()` compiles the program once into `<repo>/.gobuild/<hash>/goyamux`, keyed by a hash
of the Go sources and the Go version, so every test session after the first reuses the binary.
When Go or Debian's hashicorp/yamux sources are missing the `go_peer` fixture skips, unless
AGENTD_REQUIRE_INTEROP=1 (CI), where it fails: interop is then a requirement, not an option.

The async helpers run the peer as a subprocess under trio: `go_server()` starts a listener and
yields its address and its stdout event lines; `run_go_client()` runs a script or benchmark client
and returns the JSON objects it printed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

REPO = Path(__file__).resolve().parent.parent
GOCODE = Path("/usr/share/gocode")
YAMUX_SOURCES = GOCODE / "src" / "github.com" / "hashicorp" / "yamux"
CACHE = REPO / ".gobuild"


class GoPeerUnavailable(RuntimeError):
    """Go or the hashicorp/yamux sources are not installed, so the peer cannot be built."""


def _source_key(go: str, sources: Path) -> str:
    digest = hashlib.sha256()
    version = subprocess.run([go, "version"], capture_output=True, text=True, check=True).stdout
    digest.update(version.encode())
    for path in sorted(sources.glob("*.go")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_go_peer() -> Path:
    """Return the path of an up-to-date goyamux binary, building it if needed."""
    return build_go_program("goyamux")


def build_go_program(name: str) -> Path:
    """Build `interop/<name>` (GOPATH mode, Debian's hashicorp/yamux) once per source version."""
    sources = REPO / "interop" / name
    go = shutil.which("go")
    if go is None:
        raise GoPeerUnavailable("the `go` toolchain is not on PATH (Debian package golang-go)")
    if not YAMUX_SOURCES.is_dir():
        raise GoPeerUnavailable(
            f"{YAMUX_SOURCES} is missing (Debian package golang-github-hashicorp-yamux-dev)"
        )
    target = CACHE / _source_key(go, sources) / name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        GO111MODULE="off",
        GOPATH=f"{CACHE / 'gopath'}{os.pathsep}{GOCODE}",
        GOCACHE=str(CACHE / "gocache"),
        GOFLAGS="",
    )
    partial = target.with_name(f"{name}.{os.getpid()}.partial")
    done = subprocess.run(
        [go, "build", "-o", str(partial), "."],
        cwd=sources,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"building interop/{name} failed:\n{done.stdout}{done.stderr}")
    os.replace(partial, target)  # atomic: a concurrent build of the same sources is harmless
    return target


def require(build: Callable[..., Path], *args: Any) -> Path:
    """`build(*args)`, skipping the test when Go is missing, or failing under AGENTD_REQUIRE_INTEROP=1
    (CI), where interop with the real Go libraries is a requirement, not an option."""
    try:
        return build(*args)
    except GoPeerUnavailable as exc:
        if os.environ.get("AGENTD_REQUIRE_INTEROP") == "1":
            pytest.fail(f"Go interop peer required (AGENTD_REQUIRE_INTEROP=1) but unavailable: {exc}")
        pytest.skip(f"Go interop peer unavailable: {exc}")


@pytest.fixture(scope="session")
def go_peer() -> Path:
    """Path of the built Go peer; skips (or fails under AGENTD_REQUIRE_INTEROP=1) without Go."""
    return require(build_go_peer)


@attrs.define
class GoServer:
    """A running `goyamux -listen` process: its address and the JSON events it printed."""

    address: str
    process: trio.Process
    _lines: trio.MemoryReceiveChannel[str]

    async def next_event(self) -> dict[str, Any]:
        """The next JSON line the server printed (e.g. a `watch` result)."""
        return json.loads(await self._lines.receive())  # type: ignore[no-any-return]


async def _read_lines(stream: trio.abc.ReceiveStream, send: trio.MemorySendChannel[str]) -> None:
    buffer = b""
    async with send:
        while chunk := await stream.receive_some(65536):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                await send.send(line.decode())


@asynccontextmanager
async def go_server(binary: Path, listen: str, *args: str, role: str = "server") -> AsyncIterator[GoServer]:
    """Run `goyamux -role <role> -listen <listen> <args>` until the block ends.

    `listen` is `unix:PATH` or `tcp:127.0.0.1:0`; the yielded address has the real port.
    """
    send, receive = trio.open_memory_channel[str](1000)
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            functools.partial(
                trio.run_process,
                [str(binary), "-role", role, "-listen", listen, *args],
                stdout=subprocess.PIPE,
                check=False,
            )
        )
        nursery.start_soon(_read_lines, process.stdout, send)
        with trio.fail_after(10):
            first = await receive.receive()
        assert first.startswith("LISTENING "), first
        try:
            yield GoServer(first.removeprefix("LISTENING "), process, receive)
        finally:
            process.kill()


async def run_go_client(
    binary: Path, dial: str, *args: str, role: str = "client", time_limit: float = 60
) -> list[dict[str, Any]]:
    """Run `goyamux -role <role> -dial <dial> <args>` to completion; return its JSON output lines."""
    with trio.fail_after(time_limit):
        done = await trio.run_process(
            [str(binary), "-role", role, "-dial", dial, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()
    return [json.loads(line) for line in done.stdout.decode().splitlines() if line.strip()]


def sock_address(address: str) -> tuple[str, str | tuple[str, int]]:
    """Split `unix:PATH` / `tcp:HOST:PORT` into (family, trio connect argument)."""
    family, _, rest = address.partition(":")
    if family == "unix":
        return family, rest
    host, _, port = rest.rpartition(":")
    return family, (host, int(port))


async def connect(address: str) -> trio.SocketStream:
    """Dial a `unix:` or `tcp:` address the way the Go peer prints it."""
    family, where = sock_address(address)
    if family == "unix":
        assert isinstance(where, str)
        return await trio.open_unix_socket(where)
    assert isinstance(where, tuple)
    return await trio.open_tcp_stream(*where)


def client_args(scenarios: Sequence[str]) -> list[str]:
    """Arguments that make the Go client run the named script scenarios."""
    return ["-script", ",".join(scenarios)]
