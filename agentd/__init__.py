"""agentd: a trio daemon serving Coder's workspace-agent API over yamux + DRPC, backed by PostgreSQL."""

__version__ = "0.1.0"
