"""The saga model and compensation engine of Backout (no Kafka inside).

The public API is re-exported here; `tests/unit/test_public_api.py` pins it.
"""

from sagas.context import CompensationContext, SentCommand
from sagas.definition import CompensationStep, ManualAction, Saga
from sagas.errors import (
    BackoutError,
    CompensationError,
    DefinitionError,
    LedgerError,
    PermanentError,
    PlanningError,
    RegistryError,
    UpcastError,
)
from sagas.retry import RetryPolicy

__all__ = [
    "BackoutError",
    "CompensationContext",
    "CompensationError",
    "CompensationStep",
    "DefinitionError",
    "LedgerError",
    "ManualAction",
    "PermanentError",
    "PlanningError",
    "RegistryError",
    "RetryPolicy",
    "Saga",
    "SentCommand",
    "UpcastError",
]
