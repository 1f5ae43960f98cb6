"""Process-wide components that batch or aggregate what many agent connections report.

Each has ``async def run(self, *, task_status=trio.TASK_STATUS_IGNORED)`` and flushes what it holds when
that run is cancelled (daemon shutdown).
"""
