"""One exception root for Backout; retryability lives on the type."""

from __future__ import annotations


class BackoutError(Exception):
    """Root of every error Backout raises on purpose."""


class DefinitionError(BackoutError):
    """A saga module is wrong: bad decorator use, duplicate step, broken upcaster chain."""


class RegistryError(BackoutError):
    """Saga modules could not be loaded, or two sagas claim the same event type."""


class PlanningError(BackoutError):
    """A rollback could not be planned (unknown deployment, guard exceeded, ...)."""


class LedgerError(BackoutError):
    """The ledger refused an operation (unknown id, illegal state change)."""


class UpcastError(BackoutError):
    """An event payload cannot be brought to the version a handler expects."""


class CompensationError(BackoutError):
    """Raised by a compensation handler: retried according to its `RetryPolicy`.

    Args:
        message: what went wrong.
        next_retry_delay: seconds to wait before the next attempt, overriding
            the policy's backoff (e.g. a service's Retry-After).
    """

    def __init__(self, message: str, *, next_retry_delay: float | None = None) -> None:
        super().__init__(message)
        self.next_retry_delay = next_retry_delay


class PermanentError(CompensationError):
    """Raised by a compensation handler when retrying cannot help.

    The compensation becomes `failed` at once and blocks the steps that depend on it.
    """
