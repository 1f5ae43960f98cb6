"""Jittered exponential backoff for the redial loop (Coder's agent: 100 ms doubling up to 10 s)."""

from __future__ import annotations

import random

import attrs

__all__ = ["Backoff"]


@attrs.define
class Backoff:
    """``next()`` gives the next delay: ``floor * 2**n`` capped at ``ceiling``, with "equal jitter"
    (half fixed, half random) so that many agents dropped together do not redial in lockstep."""

    floor: float = 0.1
    ceiling: float = 10.0
    rng: random.Random = attrs.field(factory=random.Random)
    attempts: int = attrs.field(default=0, init=False)

    def next(self) -> float:
        base = min(self.ceiling, self.floor * float(2 ** min(self.attempts, 32)))
        self.attempts += 1
        jitter: float = self.rng.uniform(0, base / 2)
        return base / 2 + jitter

    def reset(self) -> None:
        """After a connection that worked: the next failure starts again at the floor."""
        self.attempts = 0
