"""The agent side of agentd's API: a DRPC client with typed stubs over a mux session."""

from agentd.client.rpc import BidiCall, ClientStreamCall, RpcClient, RpcConn, ServerStreamCall, StreamOpener
from agentd.drpc.errors import UNIMPLEMENTED, RpcError

__all__ = [
    "UNIMPLEMENTED",
    "BidiCall",
    "ClientStreamCall",
    "RpcClient",
    "RpcConn",
    "RpcError",
    "ServerStreamCall",
    "StreamOpener",
]
