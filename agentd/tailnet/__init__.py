"""agentd.tailnet: the in-memory tailnet coordinator and the DERP map source (spec §8).

``coordinator`` is the sans-I/O core, ``trio_coordinator`` its trio adapter (one process-wide
``Coordinator``), ``derpmap`` the process-wide ``DERPMapSource`` and ``convert`` the boundary to
the generated ``tailnet_pb2`` messages. The RPC handlers live in ``agentd.services.tailnet``.
"""

from agentd.tailnet.coordinator import (
    AgentAuth,
    Auth,
    ClientAuth,
    CoordinatorCore,
    Kind,
    Node,
    PeerUpdate,
    Request,
    Response,
    TrustedAuth,
)
from agentd.tailnet.derpmap import DERPMapError, DERPMapSource, default_derp_map, load_derp_map
from agentd.tailnet.trio_coordinator import Coordinator, PeerHandle

__all__ = [
    "AgentAuth",
    "Auth",
    "ClientAuth",
    "Coordinator",
    "CoordinatorCore",
    "DERPMapError",
    "DERPMapSource",
    "Kind",
    "Node",
    "PeerHandle",
    "PeerUpdate",
    "Request",
    "Response",
    "TrustedAuth",
    "default_derp_map",
    "load_derp_map",
]
