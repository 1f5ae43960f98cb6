"""Exceptions of agentd.mux: every error the multiplexer raises or reports."""

from __future__ import annotations

from agentd.mux.frame import GoAwayCode


class MuxError(Exception):
    """A multiplexer operation failed (session gone away, stream ids exhausted, ping timeout...)."""


class ProtocolError(MuxError):
    """The peer broke the yamux protocol; the session ends.

    `code` is the GoAway code to send; `send_go_away` is False where hashicorp tears the session down
    silently (bad version, unknown frame type). The sans-I/O core does not raise it: it reports it as
    the last event of `Connection.receive_data` (`ProtocolViolated`).
    """

    def __init__(
        self, message: str, *, code: GoAwayCode = GoAwayCode.PROTOCOL_ERROR, send_go_away: bool = True
    ):
        super().__init__(message)
        self.code = code
        self.send_go_away = send_go_away


class StreamClosedError(MuxError):
    """The stream was closed locally (write after half-close / close)."""


class StreamResetError(MuxError):
    """The stream was reset (by the peer, by us, or by the close timeout)."""


class SessionClosedError(MuxError):
    """The session is over."""


__all__ = ["MuxError", "ProtocolError", "SessionClosedError", "StreamClosedError", "StreamResetError"]
