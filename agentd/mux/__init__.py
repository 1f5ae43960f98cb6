"""agentd.mux: a hashicorp/yamux v0.1.2-compatible stream multiplexer for trio.

`frame` (codec), `state` (stream states and their transition table), `events` and `session` (the
sans-I/O state machine) do no I/O; `errors` holds every exception; `trio_session` runs the core over
any `trio.abc.Stream`.
"""

from agentd.mux.errors import MuxError, ProtocolError
from agentd.mux.frame import GoAwayCode
from agentd.mux.trio_session import MuxConfig, MuxSession, MuxStream

__all__ = ["GoAwayCode", "MuxConfig", "MuxError", "MuxSession", "MuxStream", "ProtocolError"]
