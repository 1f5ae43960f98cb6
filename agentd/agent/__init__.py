"""``agentd agent``: a reference workspace agent built on agentd.client.

It dials agentd (Unix socket or TCP; raw yamux or WebSocket upgrade), then behaves like Coder's
agent (spec §11): banners, manifest + startup report, startup scripts run for real with their output
sent as logs, lifecycle created → starting → ready, metadata and stats loops, the resources monitor,
DERP map subscription and a coordinate stream, optionally boundary logs — printing one line per step.
"""

from agentd.agent.agent import AGENT_VERSION, Agent, ConnectionLost, describe_error
from agentd.agent.backoff import Backoff
from agentd.agent.dial import Target, TargetError, connect, open_target, parse_target
from agentd.agent.main import run_agent

__all__ = [
    "AGENT_VERSION",
    "Agent",
    "Backoff",
    "ConnectionLost",
    "Target",
    "TargetError",
    "connect",
    "describe_error",
    "open_target",
    "parse_target",
    "run_agent",
]
