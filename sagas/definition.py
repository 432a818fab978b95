"""Saga definitions: inert data built by decorators that validate eagerly.

A `Saga` declares, per event type, how to undo it (`compensate`), that it
cannot be undone automatically (`irreversible`), or that there is nothing to
undo (`ignore`), plus the upcasters that bring old payload versions up to the
version a handler expects. Decorators check their input when applied and
only attach metadata; nothing here runs a handler.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from sagas.errors import DefinitionError
from sagas.retry import RetryPolicy

if TYPE_CHECKING:
    from sagas.context import CompensationContext

Handler = Callable[[Any, "CompensationContext"], Awaitable[None]]
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
HandlerT = TypeVar("HandlerT", bound=Callable[..., Any])
UpcasterT = TypeVar("UpcasterT", bound=Upcaster)


def event_type_of(model: type[BaseModel]) -> str:
    """The event type a payload model stands for: `__event_type__`, else its class name."""
    return str(getattr(model, "__event_type__", model.__name__))


def schema_version_of(model: type[BaseModel]) -> int:
    """The payload schema version of a model: `__schema_version__`, else 1."""
    version = getattr(model, "__schema_version__", 1)
    if not isinstance(version, int) or version < 1:
        raise DefinitionError(f"{model.__name__}.__schema_version__ must be an int >= 1")
    return version


@dataclass(frozen=True, slots=True)
class CompensationStep:
    """How one (event type, schema version) is undone."""

    saga: str
    event_type: str
    version: int
    handler: Handler
    model: type[BaseModel] | None
    confirm: str | None
    confirm_timeout: float
    retry: RetryPolicy

    @property
    def name(self) -> str:
        """The step's name: `<saga>.<handler>`; part of the idempotency key."""
        return f"{self.saga}.{getattr(self.handler, '__name__', 'handler')}"


@dataclass(frozen=True, slots=True)
class ManualAction:
    """An irreversible event type: an operator must act, with these instructions."""

    saga: str
    event_type: str
    action: str


@dataclass
class Saga:
    """A named set of compensation declarations.

    Example:
        >>> checkout = Saga("checkout")
        >>> checkout.ignore("OrderViewed")
    """

    name: str
    steps: dict[tuple[str, int], CompensationStep] = field(default_factory=dict)
    manual: dict[str, ManualAction] = field(default_factory=dict)
    ignored: set[str] = field(default_factory=set)
    upcasters: dict[tuple[str, int], Upcaster] = field(default_factory=dict)
    # The order steps were declared in: the forward order of the saga, used to
    # break ties when events of one instance carry the same timestamp.
    step_order: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "_").replace(".", "_").isidentifier():
            raise DefinitionError(
                f"saga name {self.name!r} must be a non-empty identifier (letters, digits, _-.)"
            )

    def compensate(
        self,
        event: type[BaseModel] | str,
        *,
        version: int | None = None,
        confirm: str | None = None,
        confirm_timeout: float = 60.0,
        retry: RetryPolicy | None = None,
    ) -> Callable[[HandlerT], HandlerT]:
        """Declare the compensation of an event type.

        Args:
            event: the payload model (event type and version are read from it)
                or the event type's name (the handler then gets the payload dict).
            version: the payload version the handler expects; defaults to the
                model's `__schema_version__`, or 1 for a plain type name.
            confirm: event type a service emits when it has applied the command;
                the compensation is confirmed by such an event whose
                `causation_id` is the compensation's idempotency key.
            confirm_timeout: seconds to wait for the confirmation before the
                handler runs again (same key), within the retry budget.
            retry: the retry policy; `RetryPolicy()` by default.

        Raises:
            DefinitionError: the handler is not `async def h(event, ctx)`, or the
                (type, version) is declared twice in this saga.
        """
        if isinstance(event, str):
            model: type[BaseModel] | None = None
            event_type = event
            step_version = 1 if version is None else version
        elif isinstance(event, type) and issubclass(event, BaseModel):
            model = event
            event_type = event_type_of(event)
            model_version = schema_version_of(event)
            if version is not None and version != model_version:
                raise DefinitionError(
                    f"{self.name}: version={version} contradicts "
                    f"{event.__name__}.__schema_version__={model_version}"
                )
            step_version = model_version
        else:
            raise DefinitionError(
                f"{self.name}: compensate() takes a pydantic model class or an event type name, "
                f"not {event!r}"
            )
        self._check_type_name(event_type)
        if step_version < 1:
            raise DefinitionError(f"{self.name}: version must be >= 1, got {step_version}")
        if confirm is not None:
            self._check_type_name(confirm)
        if confirm_timeout <= 0:
            raise DefinitionError(f"{self.name}: confirm_timeout must be positive")
        policy = retry or RetryPolicy()

        def decorate(handler: HandlerT) -> HandlerT:
            _check_handler(self.name, event_type, handler)
            key = (event_type, step_version)
            if key in self.steps:
                previous = self.steps[key].handler
                raise DefinitionError(
                    f"saga {self.name!r} compensates {event_type} v{step_version} twice: "
                    f"{getattr(previous, '__qualname__', previous)} and "
                    f"{getattr(handler, '__qualname__', handler)}"
                )
            self._check_not_declared_otherwise(event_type, "compensated")
            self.steps[key] = CompensationStep(
                saga=self.name,
                event_type=event_type,
                version=step_version,
                handler=handler,
                model=model,
                confirm=confirm,
                confirm_timeout=confirm_timeout,
                retry=policy,
            )
            if event_type not in self.step_order:
                self.step_order.append(event_type)
            return handler

        return decorate

    def irreversible(self, event_type: str, *, action: str) -> None:
        """Declare an event type that cannot be undone by code.

        A rollback lists such events as manual actions, with `action` as the
        instruction for the operator, and ends `completed_with_warnings`.
        """
        self._check_type_name(event_type)
        if not action.strip():
            raise DefinitionError(f"{self.name}: irreversible({event_type!r}) needs an action")
        self._check_not_declared_otherwise(event_type, "irreversible")
        self.manual[event_type] = ManualAction(self.name, event_type, action.strip())
        if event_type not in self.step_order:
            self.step_order.append(event_type)

    def ignore(self, event_type: str) -> None:
        """Declare an event type with nothing to undo (read-only, informational)."""
        self._check_type_name(event_type)
        self._check_not_declared_otherwise(event_type, "ignored")
        self.ignored.add(event_type)

    def upcaster(self, event_type: str, *, from_version: int) -> Callable[[UpcasterT], UpcasterT]:
        """Declare a function turning a `from_version` payload into `from_version + 1`.

        Raises:
            DefinitionError: not a plain function of one argument, or declared twice.
        """
        self._check_type_name(event_type)
        if from_version < 1:
            raise DefinitionError(f"{self.name}: from_version must be >= 1")

        def decorate(function: UpcasterT) -> UpcasterT:
            if inspect.iscoroutinefunction(function) or not callable(function):
                raise DefinitionError(
                    f"upcaster {event_type} v{from_version} of saga {self.name!r} must be a "
                    "plain (not async) function taking the payload dict"
                )
            if len(_positional_parameters(function)) != 1:
                raise DefinitionError(
                    f"upcaster {event_type} v{from_version} of saga {self.name!r} must take "
                    "exactly one parameter: the payload dict"
                )
            key = (event_type, from_version)
            if key in self.upcasters:
                raise DefinitionError(
                    f"saga {self.name!r} has two upcasters for {event_type} from v{from_version}"
                )
            self.upcasters[key] = function
            return function

        return decorate

    def validate(self) -> None:
        """Check what only the whole saga can tell: upcaster chains without gaps.

        For each event type with upcasters, the `from_version`s must be
        consecutive and lead to a version some step handles.

        Raises:
            DefinitionError: naming the type and the missing version.
        """
        by_type: dict[str, list[int]] = {}
        for event_type, from_version in self.upcasters:
            by_type.setdefault(event_type, []).append(from_version)
        for event_type, versions in by_type.items():
            versions.sort()
            for lower, upper in itertools.pairwise(versions):
                if upper != lower + 1:
                    raise DefinitionError(
                        f"saga {self.name!r}: upcaster chain of {event_type} has a gap: "
                        f"no upcaster from v{lower + 1}"
                    )
            target = versions[-1] + 1
            handled = {v for (t, v) in self.steps if t == event_type}
            if handled and target not in handled:
                raise DefinitionError(
                    f"saga {self.name!r}: upcasters of {event_type} lead to v{target}, but the "
                    f"saga compensates versions {sorted(handled)}"
                )

    def claims(self) -> set[str]:
        """Every event type this saga says something about."""
        return {t for t, _ in self.steps} | set(self.manual) | self.ignored

    def _check_type_name(self, event_type: str) -> None:
        if not isinstance(event_type, str) or not event_type.strip():
            raise DefinitionError(f"{self.name}: event type must be a non-empty string")

    def _check_not_declared_otherwise(self, event_type: str, as_what: str) -> None:
        declared = {
            "compensated": {t for t, _ in self.steps},
            "irreversible": set(self.manual),
            "ignored": self.ignored,
        }
        for kind, types in declared.items():
            if kind != as_what and event_type in types:
                raise DefinitionError(
                    f"saga {self.name!r} declares {event_type} both {kind} and {as_what}"
                )


def _positional_parameters(function: Callable[..., Any]) -> list[inspect.Parameter]:
    return [
        p
        for p in inspect.signature(function).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def _check_handler(saga: str, event_type: str, handler: Callable[..., Any]) -> None:
    label = f"compensation of {event_type} in saga {saga!r}"
    if not inspect.iscoroutinefunction(handler):
        raise DefinitionError(f"{label} must be an async function (async def), got {handler!r}")
    if len(_positional_parameters(handler)) != 2:
        raise DefinitionError(f"{label} must take exactly two parameters: (event, ctx)")
