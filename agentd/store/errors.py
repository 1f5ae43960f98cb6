"""Store exceptions: the vocabulary services see instead of psycopg's.

Nothing outside ``agentd.store`` imports psycopg, so database failures that callers must tell apart
(a check constraint such as ``max_logs_length``, a unique violation from the agent-name trigger, a
serialization failure to retry) are translated into these classes at the store boundary. Every
instance carries the SQLSTATE and, for integrity errors, the constraint name.
"""

from __future__ import annotations


class StoreError(Exception):
    """Any failure reported by the database or the store layer."""

    def __init__(self, message: str, *, sqlstate: str | None = None, constraint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.constraint = constraint


class DatabaseUnavailable(StoreError):
    """The database cannot be reached (connect failure, lost connection, pool exhausted)."""


class IntegrityError(StoreError):
    """A constraint rejected the statement (SQLSTATE class 23)."""


class UniqueViolation(IntegrityError):
    """SQLSTATE 23505."""


class ForeignKeyViolation(IntegrityError):
    """SQLSTATE 23503."""


class CheckViolation(IntegrityError):
    """SQLSTATE 23514; ``constraint`` names the check (e.g. ``max_logs_length``)."""


class NotNullViolation(IntegrityError):
    """SQLSTATE 23502."""


class DataError(StoreError):
    """Invalid input for a column type (SQLSTATE class 22), e.g. an unknown enum label."""


class SerializationFailure(StoreError):
    """SQLSTATE 40001 / 40P01: the transaction may succeed if retried."""


class QueryCanceled(StoreError):
    """SQLSTATE 57014: statement_timeout fired or the query was cancelled by someone else."""


class PayloadTooLarge(StoreError, ValueError):
    """A NOTIFY payload or channel name exceeds PostgreSQL's limits (checked before sending)."""
