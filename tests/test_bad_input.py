"""Values the database cannot store (found by bench/fuzz.py): a clear RPC error, not an internal one."""

from __future__ import annotations

import functools

import pytest
import trio

from agentd.client import RpcError
from agentd.proto import agent_pb2
from agentd.store import Database
from agentd.store.errors import DataError
from agentd.store.testing import seed_workspace
from agentd.testing import serve_agent


async def test_a_nul_in_a_text_value_is_a_data_error(db: Database) -> None:
    with pytest.raises(DataError, match="NUL"):
        await db.fetchval("SELECT %s::text", ["a\x00b"])


async def test_a_nul_in_a_request_string_is_invalid_input_without_a_traceback(
    db: Database, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    ws = await seed_workspace(db)
    agent = await nursery.start(functools.partial(serve_agent, db, ws.agent().auth_token, services=("apps",)))
    request = agent_pb2.UpdateAppStatusRequest(
        slug="code\x00", state=agent_pb2.UpdateAppStatusRequest.WORKING, message="m"
    )
    with pytest.raises(RpcError, match=r"invalid input: .*NUL"):
        await agent.client.agent.UpdateAppStatus(request)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    await agent.disconnect()
