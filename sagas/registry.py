"""Loading saga modules and answering "how is this event undone?".

Saga modules are only ever imported from module paths given in settings
(`BACKOUT_SAGAS`) or from the `backout.sagas` entry-point group — never from
anything a message says.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

from sagas.definition import CompensationStep, ManualAction, Saga
from sagas.errors import DefinitionError, RegistryError, UpcastError

ENTRY_POINT_GROUP = "backout.sagas"


@dataclass(frozen=True, slots=True)
class Compensate:
    """The event is undone by `step`, after upcasting its payload to `step.version`."""

    step: CompensationStep


@dataclass(frozen=True, slots=True)
class Manual:
    """The event cannot be undone by code; an operator follows `action`."""

    action: ManualAction


@dataclass(frozen=True, slots=True)
class Ignored:
    """Nothing to undo."""

    saga: str


@dataclass(frozen=True, slots=True)
class Uncovered:
    """No saga knows how to undo this event; `reason` says why."""

    reason: str


Resolution = Compensate | Manual | Ignored | Uncovered


class SagaRegistry:
    """The loaded sagas, indexed by the event types they claim.

    Raises:
        RegistryError: two sagas use the same name, or claim the same event
            type (naming both).
    """

    def __init__(self, sagas: Iterable[Saga] = ()) -> None:
        self._sagas: dict[str, Saga] = {}
        self._owner: dict[str, Saga] = {}
        for saga in sagas:
            self.add(saga)

    def add(self, saga: Saga) -> None:
        """Register one saga after validating it."""
        try:
            saga.validate()
        except DefinitionError as exc:
            raise RegistryError(str(exc)) from exc
        if saga.name in self._sagas:
            if self._sagas[saga.name] is saga:
                return
            raise RegistryError(f"two sagas are named {saga.name!r}")
        for event_type in sorted(saga.claims()):
            owner = self._owner.get(event_type)
            if owner is not None:
                raise RegistryError(
                    f"event type {event_type} is claimed by two sagas: "
                    f"{owner.name!r} and {saga.name!r}"
                )
        self._sagas[saga.name] = saga
        for event_type in saga.claims():
            self._owner[event_type] = saga

    @property
    def sagas(self) -> Sequence[Saga]:
        """The registered sagas, in registration order."""
        return list(self._sagas.values())

    def resolve(self, event_type: str, version: int) -> Resolution:
        """How an event of `event_type` at payload `version` is undone."""
        saga = self._owner.get(event_type)
        if saga is None:
            return Uncovered(f"no saga declares {event_type}")
        if event_type in saga.ignored:
            return Ignored(saga.name)
        if event_type in saga.manual:
            return Manual(saga.manual[event_type])
        versions = sorted(v for (t, v) in saga.steps if t == event_type)
        target = next((v for v in versions if v >= version), None)
        if target is None:
            return Uncovered(
                f"saga {saga.name!r} compensates {event_type} up to v{versions[-1]}, not v{version}"
            )
        missing = [v for v in range(version, target) if (event_type, v) not in saga.upcasters]
        if missing:
            return Uncovered(
                f"{event_type} v{version} cannot reach v{target}: saga {saga.name!r} "
                f"has no upcaster from v{missing[0]}"
            )
        return Compensate(saga.steps[(event_type, target)])

    def upcast(
        self, event_type: str, version: int, target: int, payload: dict[str, Any]
    ) -> dict[str, Any]:
        """Bring `payload` from `version` to `target` through the owning saga's upcasters."""
        saga = self._owner.get(event_type)
        current = dict(payload)
        for step in range(version, target):
            upcaster = saga.upcasters.get((event_type, step)) if saga else None
            if upcaster is None:
                raise UpcastError(f"no upcaster for {event_type} from v{step}")
            try:
                current = upcaster(current)
            except Exception as exc:  # a user function: report which one failed
                raise UpcastError(f"upcaster of {event_type} from v{step} failed: {exc}") from exc
            if not isinstance(current, dict):
                raise UpcastError(f"upcaster of {event_type} from v{step} did not return a dict")
        return current

    def step_rank(self, event_type: str) -> int:
        """Position of an event type in its saga's declaration order (forward order)."""
        saga = self._owner.get(event_type)
        if saga is None or event_type not in saga.step_order:
            return 1_000_000
        return saga.step_order.index(event_type)


def sagas_in_module(module: ModuleType) -> list[Saga]:
    """Every `Saga` object defined at the top level of `module`."""
    found: list[Saga] = []
    for value in vars(module).values():
        if isinstance(value, Saga) and all(value is not s for s in found):
            found.append(value)
    return found


def load_registry(module_paths: Iterable[str], *, use_entry_points: bool = True) -> SagaRegistry:
    """Import the configured saga modules and build the registry.

    Args:
        module_paths: dotted module paths (from `BACKOUT_SAGAS`).
        use_entry_points: also load the `backout.sagas` entry-point group; each
            entry point names a module or a `Saga` object.

    Raises:
        RegistryError: a module cannot be imported, holds no saga, or sagas clash.
    """
    registry = SagaRegistry()
    for path in module_paths:
        path = path.strip()
        if not path:
            continue
        try:
            module = importlib.import_module(path)
        except Exception as exc:  # any import-time failure of user code
            raise RegistryError(f"cannot import saga module {path!r}: {exc}") from exc
        sagas = sagas_in_module(module)
        if not sagas:
            raise RegistryError(f"saga module {path!r} defines no Saga")
        for saga in sagas:
            registry.add(saga)
    if use_entry_points:
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            try:
                loaded = entry.load()
            except Exception as exc:
                raise RegistryError(f"cannot load entry point {entry.name!r}: {exc}") from exc
            candidates = sagas_in_module(loaded) if isinstance(loaded, ModuleType) else [loaded]
            for saga in candidates:
                if not isinstance(saga, Saga):
                    raise RegistryError(f"entry point {entry.name!r} is not a Saga or module")
                registry.add(saga)
    return registry
