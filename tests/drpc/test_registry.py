"""Registry built from service descriptors; the generated client stubs stay in sync."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agentd.client import RpcClient
from agentd.client.gen_stubs import TARGET, write
from agentd.drpc.registry import CallShape, Registry, RegistryError, default_services, method_table
from agentd.proto import agent_pb2, tailnet_pb2
from tests.drpc.svc import ECHO, EchoService


async def _h(*_: Any) -> Any:
    raise AssertionError("not called")


def test_method_table_covers_agent_and_tailnet() -> None:
    table = method_table()
    agent = [p for p in table if p.startswith("/coder.agent.v2.Agent/")]
    tailnet = [p for p in table if p.startswith("/coder.tailnet.v2.Tailnet/")]
    assert len(agent) == 19 and len(tailnet) == 5
    m = table["/coder.agent.v2.Agent/GetManifest"]
    assert (m.request_type, m.response_type, m.shape) == (
        agent_pb2.GetManifestRequest,
        agent_pb2.Manifest,
        CallShape.UNARY,
    )
    assert all(table[p].shape is CallShape.UNARY for p in agent)
    shapes = {p.rsplit("/", 1)[1]: table[p].shape for p in tailnet}
    assert shapes["Coordinate"] is CallShape.BIDI
    assert shapes["StreamDERPMaps"] is CallShape.SERVER_STREAM
    assert shapes["WorkspaceUpdates"] is CallShape.SERVER_STREAM
    assert table["/coder.tailnet.v2.Tailnet/Coordinate"].request_type is tailnet_pb2.CoordinateRequest
    assert method_table() is table  # cached


def test_build_requires_every_rpc() -> None:
    table = method_table()
    paths = sorted(table)
    Registry.build(handlers={p: _h for p in paths})
    Registry.build(handlers={paths[0]: _h}, unimplemented=paths[1:])
    with pytest.raises(RegistryError, match="no handler and not unimplemented") as info:
        Registry.build(handlers={p: _h for p in paths[1:]})
    assert paths[0] in str(info.value)
    with pytest.raises(RegistryError, match="not an RPC"):
        Registry.build(handlers={p: _h for p in paths} | {"/coder.agent.v2.Agent/Nope": _h})
    with pytest.raises(RegistryError, match="both"):
        Registry.build(handlers={p: _h for p in paths}, unimplemented=[paths[0]])


def test_build_for_custom_services() -> None:
    reg = EchoService().registry()
    method, handler = reg.lookup("/test.drpc.v1.Echo/Unary")  # type: ignore[misc]
    assert method.shape is CallShape.UNARY and handler is not None
    method, handler = reg.lookup("/test.drpc.v1.Echo/Unimpl")  # type: ignore[misc]
    assert handler is None
    assert reg.lookup("/coder.agent.v2.Agent/GetManifest") is None
    with pytest.raises(RegistryError):
        Registry.build(handlers={}, services=[ECHO])


def test_stub_methods_generated_for_every_rpc() -> None:
    class Dummy:
        async def open_stream(self) -> Any:
            raise AssertionError

    client = RpcClient(Dummy())
    for service in default_services():
        stub = getattr(client, service.name.lower())
        for m in service.methods:
            assert callable(getattr(stub, m.name))
            assert m.name in (getattr(stub, m.name).__doc__ or "") or f"/{service.full_name}/{m.name}" in (
                getattr(stub, m.name).__doc__ or ""
            )
    with pytest.raises(TypeError):
        client.tailnet.StreamDERPMaps(agent_pb2.GetManifestRequest())  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        _ = client.nope


def test_committed_stubs_are_current(tmp_path: Path) -> None:
    out = tmp_path / "stubs.py"
    write(out, default_services())
    assert out.read_text() == TARGET.read_text(), "run: python -m agentd.client.gen_stubs"


def test_typed_use_checks_with_mypy(tmp_path: Path) -> None:
    """client.agent.GetManifest is typed: mypy accepts right use and rejects a wrong request type."""
    good = tmp_path / "good.py"
    good.write_text(
        "from agentd.client import RpcClient\n"
        "from agentd.proto import agent_pb2, tailnet_pb2\n"
        "async def f(c: RpcClient) -> None:\n"
        "    m: agent_pb2.Manifest = await c.agent.GetManifest(agent_pb2.GetManifestRequest())\n"
        "    async with c.tailnet.Coordinate() as call:\n"
        "        await call.send(tailnet_pb2.CoordinateRequest())\n"
        "        r: tailnet_pb2.CoordinateResponse = await call.receive()\n"
        "    async for d in c.tailnet.StreamDERPMaps():\n"
        "        x: tailnet_pb2.DERPMap = d\n"
    )
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from agentd.client import RpcClient\n"
        "from agentd.proto import agent_pb2\n"
        "async def f(c: RpcClient) -> None:\n"
        "    await c.agent.GetManifest(agent_pb2.UpdateStatsRequest())\n"
    )
    root = Path(__file__).resolve().parents[2]
    base = [
        sys.executable,
        "-m",
        "mypy",
        "--no-error-summary",
        "--follow-imports=silent",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    ok = subprocess.run([*base, str(good)], capture_output=True, text=True, cwd=root)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    ko = subprocess.run([*base, str(bad)], capture_output=True, text=True, cwd=root)
    assert ko.returncode != 0 and "UpdateStatsRequest" in ko.stdout
