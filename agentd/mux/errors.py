"""Exceptions of agentd.mux."""

from __future__ import annotations

from agentd.mux.frame import GoAwayCode


class MuxError(Exception):
    """A multiplexer operation failed (session gone away, stream ids exhausted, ping timeout...)."""


class ProtocolError(MuxError):
    """The peer broke the yamux protocol; the session ends.

    `code` is the GoAway code to send; `send_go_away` is False where hashicorp tears the session down
    silently (bad version, unknown frame type).
    """

    def __init__(
        self, message: str, *, code: GoAwayCode = GoAwayCode.PROTOCOL_ERROR, send_go_away: bool = True
    ):
        super().__init__(message)
        self.code = code
        self.send_go_away = send_go_away
        #: events produced by the same receive_data call before the error (for sans-I/O callers)
        self.events: list[object] = []
