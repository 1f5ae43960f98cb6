"""The wall clock every component reads through an injectable ``now`` (tests pass their own)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

__all__ = ["Now", "utcnow"]


def utcnow() -> dt.datetime:
    """Wall-clock now in UTC: the default ``now`` every service and batcher takes."""
    return dt.datetime.now(dt.UTC)


Now = Callable[[], dt.datetime]
