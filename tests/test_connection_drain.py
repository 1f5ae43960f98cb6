"""What a draining stop asks of an agent session (issue 11 item 3): GoAway refuses new calls, and
long-lived streaming calls are not counted as calls in flight (they never end by themselves)."""

from __future__ import annotations

import pytest
import trio

from agentd.mux import MuxError
from agentd.proto import agent_pb2, tailnet_pb2
from agentd.store import Database
from tests.test_connection import seed, start_agent


async def test_go_away_refuses_new_calls_and_streams_are_not_in_flight(
    db: Database, nursery: trio.Nursery
) -> None:
    ws = await seed(db)
    agent = await start_agent(nursery, db, ws.agents[0].token)
    connection = agent.connection
    assert connection.calls_in_flight == 0
    with trio.fail_after(10):
        async with agent.client.tailnet.StreamDERPMaps(tailnet_pb2.StreamDERPMapsRequest()) as maps:
            await maps.__anext__()  # the first map: the stream is live and stays open
            assert connection.session is not None and connection.session.num_streams == 1
            assert connection.calls_in_flight == 0
            await connection.go_away()
            await agent.session.ping()  # frames arrive in order: the GoAway is in by now
            with pytest.raises(MuxError, match="not accepting"):
                await agent.client.agent.GetAnnouncementBanners(agent_pb2.GetAnnouncementBannersRequest())
            assert not connection.session.closed  # the session and its stream go on
