"""The coder.tailnet.v2 Tailnet service on an agent connection (spec/agent-api.md §8).

One ``TailnetService`` per authenticated agent connection. It serves StreamDERPMaps (the current
map, then each change, open until the agent goes), Coordinate (the agent's peer in the
process-wide coordinator, always as itself with agent auth), PostTelemetry (accepted) and answers
RefreshResumeToken / WorkspaceUpdates with code 12: an agent connection has neither provider.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import attrs
import trio

from agentd.drpc.errors import UNIMPLEMENTED, UNIMPLEMENTED_TEXT, RpcError
from agentd.drpc.registry import Handler, ServerStream
from agentd.proto import tailnet_pb2
from agentd.tailnet.api import PeerConnection, TailnetCoordinator
from agentd.tailnet.convert import request_from_proto, response_to_proto
from agentd.tailnet.coordinator import AgentAuth
from agentd.tailnet.derpmap import DERPMapSource, with_home_params

__all__ = ["TailnetService", "TelemetrySink", "stream_name"]

log = logging.getLogger("agentd.services.tailnet")

SERVICE = "/coder.tailnet.v2.Tailnet/"
POST_TELEMETRY = SERVICE + "PostTelemetry"
STREAM_DERP_MAPS = SERVICE + "StreamDERPMaps"
REFRESH_RESUME_TOKEN = SERVICE + "RefreshResumeToken"
COORDINATE = SERVICE + "Coordinate"
WORKSPACE_UPDATES = SERVICE + "WorkspaceUpdates"

#: Receives the events of each PostTelemetry call (the daemon may batch them; default: dropped).
TelemetrySink = Callable[[Sequence[tailnet_pb2.TelemetryEvent]], None]


def stream_name(owner_username: str, workspace_name: str, agent_name: str) -> str:
    """The coordinator peer name of an agent connection: ``<owner>-<workspace>-<agent>`` (§2.7)."""
    return f"{owner_username}-{workspace_name}-{agent_name}"


@attrs.define(eq=False)
class TailnetService:
    """Tailnet RPCs for one agent connection; ``handlers()`` goes into the connection's Registry."""

    coordinator: TailnetCoordinator
    derp_maps: DERPMapSource
    agent_id: uuid.UUID
    peer_name: str
    telemetry: TelemetrySink | None = None

    def handlers(self) -> dict[str, Handler]:
        return {
            POST_TELEMETRY: self.post_telemetry,
            STREAM_DERP_MAPS: self.stream_derp_maps,
            REFRESH_RESUME_TOKEN: self.refresh_resume_token,
            COORDINATE: self.coordinate,
            WORKSPACE_UPDATES: self.workspace_updates,
        }

    async def post_telemetry(self, request: tailnet_pb2.TelemetryRequest) -> tailnet_pb2.TelemetryResponse:
        if self.telemetry is not None and request.events:
            self.telemetry(list(request.events))
        await trio.lowlevel.checkpoint()
        return tailnet_pb2.TelemetryResponse()

    async def stream_derp_maps(
        self, request: tailnet_pb2.StreamDERPMapsRequest, stream: ServerStream
    ) -> None:
        """Send the current map, then every map that differs from the last one sent; never ends by itself."""
        last: tailnet_pb2.DERPMap | None = None
        async for derp_map in self.derp_maps.value.eventual_values():
            if last is not None and derp_map == last:
                continue
            await stream.send(with_home_params(derp_map))
            last = derp_map

    async def coordinate(self, stream: ServerStream) -> None:
        """Join the coordinator as this agent; relay requests in and responses out until either side ends.

        The response queue ending (disconnect, overwrite by a newer connection, an unauthorised
        request, coordinator shutdown) ends the RPC cleanly. The agent's CloseSend or a broken
        stream without ``disconnect`` marks the peer LOST.
        """
        if not self.coordinator.running:
            raise RpcError("coordinator is closed")
        auth = AgentAuth(self.agent_id)
        async with (
            self.coordinator.connect(self.agent_id, self.peer_name, auth) as peer,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(self._forward_requests, stream, peer)
            try:
                async for response in peer:
                    await stream.send(response_to_proto(response))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                # The agent is gone; like Go, a failed send just ends coordination (peer LOST).
                log.debug("coordinate %s: response stream broke: %s", self.peer_name, exc)
            nursery.cancel_scope.cancel()

    async def _forward_requests(self, stream: ServerStream, peer: PeerConnection) -> None:
        try:
            async for message in stream:
                if not await peer.send(request_from_proto(message)):
                    return  # removed: the response side is ending
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("coordinate %s: request stream broke: %s", self.peer_name, exc)
        # The agent stopped sending without a disconnect: it is lost (no-op after disconnect).
        peer.close()

    async def refresh_resume_token(self, request: tailnet_pb2.RefreshResumeTokenRequest) -> NoReturn:
        await trio.lowlevel.checkpoint()
        raise RpcError(UNIMPLEMENTED_TEXT, UNIMPLEMENTED)

    async def workspace_updates(self, request: tailnet_pb2.WorkspaceUpdatesRequest, stream: Any) -> NoReturn:
        await trio.lowlevel.checkpoint()
        raise RpcError(UNIMPLEMENTED_TEXT, UNIMPLEMENTED)


def build(scope: Any) -> TailnetService:
    """The connection's Tailnet service on the daemon-wide coordinator and DERP map source."""
    return TailnetService(
        coordinator=scope.components.coordinator,
        derp_maps=scope.components.derp_map,
        agent_id=scope.ident.agent_id,
        peer_name=scope.ident.peer_name,
    )
