"""RPC errors as they travel in DRPC Error packets (code + text)."""

from __future__ import annotations

__all__ = ["UNIMPLEMENTED", "UNIMPLEMENTED_TEXT", "RpcError", "unknown_rpc_text"]

#: drpcerr code used by generated "unimplemented" servers.
UNIMPLEMENTED = 12
#: The text Go's generated unimplemented servers send with code 12.
UNIMPLEMENTED_TEXT = "Unimplemented"


def unknown_rpc_text(path: str) -> str:
    """Go drpcmux's text for a path it has no handler for (sent with code 0)."""
    return f'protocol error: unknown rpc: "{path}"'


class RpcError(Exception):
    """An RPC failed with ``message`` and a drpcerr ``code`` (0 when the peer gave none).

    Raised by handlers to send a typed Error packet, and raised by the client when the server
    answered with an Error packet.
    """

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __repr__(self) -> str:
        return f"RpcError({self.message!r}, code={self.code})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RpcError):
            return NotImplemented
        return (self.message, self.code) == (other.message, other.code)

    def __hash__(self) -> int:
        return hash((self.message, self.code))
