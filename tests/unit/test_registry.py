"""The saga registry: ownership of event types, resolution, upcasting, loading."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest

import sagas.registry
from sagas.definition import Saga
from sagas.errors import RegistryError, UpcastError
from sagas.registry import (
    ENTRY_POINT_GROUP,
    Compensate,
    Ignored,
    Manual,
    SagaRegistry,
    Uncovered,
    load_registry,
)


async def undo(event: Any, ctx: Any) -> None:
    """A valid handler shape."""


def saga_with(name: str, *compensated: str) -> Saga:
    saga = Saga(name)
    for event_type in compensated:
        saga.compensate(event_type)(undo)
    return saga


# ------------------------------------------------------------- registration


class TestRegistration:
    def test_two_sagas_claiming_one_type_names_both(self) -> None:
        registry = SagaRegistry([saga_with("checkout", "OrderPlaced", "PaymentCaptured")])

        with pytest.raises(RegistryError) as caught:
            registry.add(saga_with("billing", "InvoiceIssued", "PaymentCaptured"))

        message = str(caught.value)
        assert "PaymentCaptured" in message
        assert "'checkout'" in message
        assert "'billing'" in message
        # Nothing of the rejected saga was half-registered.
        assert [s.name for s in registry.sagas] == ["checkout"]
        assert isinstance(registry.resolve("InvoiceIssued", 1), Uncovered)

    @pytest.mark.parametrize("declare", ["ignore", "irreversible"])
    def test_any_kind_of_claim_conflicts(self, declare: str) -> None:
        other = Saga("audit")
        if declare == "ignore":
            other.ignore("OrderPlaced")
        else:
            other.irreversible("OrderPlaced", action="Tell finance")

        with pytest.raises(RegistryError, match="claimed by two sagas: 'checkout' and 'audit'"):
            SagaRegistry([saga_with("checkout", "OrderPlaced"), other])

    def test_same_name_twice_is_an_error(self) -> None:
        with pytest.raises(RegistryError, match="two sagas are named 'checkout'"):
            SagaRegistry([saga_with("checkout", "OrderPlaced"), saga_with("checkout", "Other")])

    def test_same_saga_object_twice_is_registered_once(self) -> None:
        checkout = saga_with("checkout", "OrderPlaced")

        registry = SagaRegistry([checkout, checkout])

        assert registry.sagas == [checkout]

    def test_invalid_saga_is_refused_as_a_registry_error(self) -> None:
        saga = saga_with("checkout")
        saga.compensate("OrderPlaced", version=3)(undo)
        saga.upcaster("OrderPlaced", from_version=1)(lambda p: p)

        with pytest.raises(RegistryError, match="OrderPlaced"):
            SagaRegistry([saga])

    def test_sagas_keep_registration_order(self) -> None:
        a, b, c = saga_with("c1", "A"), saga_with("a2", "B"), saga_with("b3", "C")

        assert [s.name for s in SagaRegistry([a, b, c]).sagas] == ["c1", "a2", "b3"]


# ------------------------------------------------------------------ resolve


def versioned_saga() -> Saga:
    """OrderPlaced handled at v3 only, with upcasters v1→v2→v3 that leave a trail."""
    saga = Saga("checkout")

    async def cancel_order(event: Any, ctx: Any) -> None: ...

    saga.compensate("OrderPlaced", version=3)(cancel_order)

    @saga.upcaster("OrderPlaced", from_version=1)
    def v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
        # v2 renamed `id` to `order_id`.
        out = {k: v for k, v in payload.items() if k != "id"}
        return {**out, "order_id": payload["id"], "trail": [*payload.get("trail", []), "1→2"]}

    @saga.upcaster("OrderPlaced", from_version=2)
    def v2_to_v3(payload: dict[str, Any]) -> dict[str, Any]:
        # v3 added `channel`; needs `order_id`, which only exists from v2 on.
        return {
            **payload,
            "channel": f"web:{payload['order_id']}",
            "trail": [*payload["trail"], "2→3"],
        }

    saga.irreversible("ReceiptEmailed", action="Send a correction e-mail")
    saga.ignore("OrderViewed")
    return saga


class TestResolve:
    def test_unknown_type_is_uncovered_naming_it(self) -> None:
        resolution = SagaRegistry([versioned_saga()]).resolve("ParcelLost", 1)

        assert isinstance(resolution, Uncovered)
        assert "ParcelLost" in resolution.reason

    def test_ignored_and_manual(self) -> None:
        registry = SagaRegistry([versioned_saga()])

        assert registry.resolve("OrderViewed", 7) == Ignored("checkout")
        manual = registry.resolve("ReceiptEmailed", 1)
        assert isinstance(manual, Manual)
        assert manual.action.action == "Send a correction e-mail"
        assert manual.action.saga == "checkout"

    @pytest.mark.parametrize("version", [1, 2, 3])
    def test_older_versions_resolve_to_the_handled_version(self, version: int) -> None:
        resolution = SagaRegistry([versioned_saga()]).resolve("OrderPlaced", version)

        assert isinstance(resolution, Compensate)
        assert resolution.step.version == 3
        assert resolution.step.name == "checkout.cancel_order"

    def test_v1_payload_is_upcast_through_every_step_in_order(self) -> None:
        registry = SagaRegistry([versioned_saga()])
        original = {"id": "o-1", "total": 5}

        resolution = registry.resolve("OrderPlaced", 1)
        assert isinstance(resolution, Compensate)
        upcast = registry.upcast("OrderPlaced", 1, resolution.step.version, original)

        assert upcast == {
            "order_id": "o-1",
            "total": 5,
            "channel": "web:o-1",
            "trail": ["1→2", "2→3"],
        }
        assert original == {"id": "o-1", "total": 5}  # the caller's payload is untouched

    def test_v2_payload_takes_only_the_last_step(self) -> None:
        registry = SagaRegistry([versioned_saga()])

        upcast = registry.upcast("OrderPlaced", 2, 3, {"order_id": "o-9", "trail": []})

        assert upcast == {"order_id": "o-9", "channel": "web:o-9", "trail": ["2→3"]}

    def test_current_version_is_not_upcast(self) -> None:
        registry = SagaRegistry([versioned_saga()])
        payload = {"order_id": "o-1"}

        result = registry.upcast("OrderPlaced", 3, 3, payload)

        assert result == payload
        assert result is not payload

    def test_newer_version_than_any_handler_is_uncovered(self) -> None:
        resolution = SagaRegistry([versioned_saga()]).resolve("OrderPlaced", 4)

        assert isinstance(resolution, Uncovered)
        assert "up to v3" in resolution.reason
        assert "v4" in resolution.reason

    def test_missing_upcaster_is_uncovered_naming_the_version(self) -> None:
        saga = Saga("checkout")
        saga.compensate("OrderPlaced", version=3)(undo)
        saga.upcaster("OrderPlaced", from_version=2)(lambda p: p)
        registry = SagaRegistry([saga])

        resolution = registry.resolve("OrderPlaced", 1)

        assert isinstance(resolution, Uncovered)
        assert "no upcaster from v1" in resolution.reason
        assert "checkout" in resolution.reason
        assert isinstance(registry.resolve("OrderPlaced", 2), Compensate)

    def test_each_version_goes_to_the_nearest_handler_at_or_above_it(self) -> None:
        saga = Saga("checkout")

        async def undo_v1(event: Any, ctx: Any) -> None: ...

        async def undo_v3(event: Any, ctx: Any) -> None: ...

        saga.compensate("OrderPlaced", version=1)(undo_v1)
        saga.compensate("OrderPlaced", version=3)(undo_v3)
        saga.upcaster("OrderPlaced", from_version=2)(lambda p: p)
        registry = SagaRegistry([saga])

        chosen = {}
        for version in (1, 2, 3):
            resolution = registry.resolve("OrderPlaced", version)
            assert isinstance(resolution, Compensate)
            chosen[version] = resolution.step.handler

        assert chosen == {1: undo_v1, 2: undo_v3, 3: undo_v3}

    def test_step_rank_follows_declaration_order(self) -> None:
        saga = Saga("checkout")
        saga.compensate("OrderPlaced")(undo)
        saga.irreversible("ReceiptEmailed", action="x")
        saga.compensate("PaymentCaptured")(undo)
        saga.compensate("OrderPlaced", version=2)(undo)
        registry = SagaRegistry([saga])

        ranks = [
            registry.step_rank(t) for t in ("OrderPlaced", "ReceiptEmailed", "PaymentCaptured")
        ]

        assert ranks == [0, 1, 2]
        assert registry.step_rank("Unknown") > 1000


class TestUpcastErrors:
    def registry(self, upcaster: Callable[[dict[str, Any]], Any]) -> SagaRegistry:
        saga = Saga("checkout")
        saga.compensate("OrderPlaced", version=2)(undo)
        saga.upcaster("OrderPlaced", from_version=1)(upcaster)
        return SagaRegistry([saga])

    def test_failing_upcaster_is_named_and_chained(self) -> None:
        def broken(payload: dict[str, Any]) -> dict[str, Any]:
            return {"order_id": payload["id"]}

        with pytest.raises(UpcastError, match="OrderPlaced from v1 failed") as caught:
            self.registry(broken).upcast("OrderPlaced", 1, 2, {})

        assert isinstance(caught.value.__cause__, KeyError)

    def test_upcaster_returning_a_non_dict_is_an_error(self) -> None:
        with pytest.raises(UpcastError, match="did not return a dict"):
            self.registry(lambda p: [p]).upcast("OrderPlaced", 1, 2, {})

    def test_missing_step_and_unknown_type(self) -> None:
        registry = self.registry(lambda p: p)

        with pytest.raises(UpcastError, match="from v2"):
            registry.upcast("OrderPlaced", 1, 3, {})
        with pytest.raises(UpcastError, match="ParcelLost"):
            registry.upcast("ParcelLost", 1, 2, {})


# ---------------------------------------------------------------- loading


@pytest.fixture
def make_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[dict[str, str]], str]]:
    """Write a throwaway package of saga modules; return its (unique) name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    created: list[str] = []

    def make(modules: dict[str, str]) -> str:
        package = f"sagapkg_{uuid.uuid4().hex}"
        root = tmp_path / package
        root.mkdir()
        (root / "__init__.py").write_text("")
        for name, source in modules.items():
            (root / f"{name}.py").write_text(textwrap.dedent(source).replace("PKG", package))
        created.append(package)
        return package

    yield make
    for name in list(sys.modules):
        if any(name == p or name.startswith(p + ".") for p in created):
            del sys.modules[name]


CHECKOUT = """
    from sagas.definition import Saga

    checkout = Saga("checkout")

    @checkout.compensate("OrderPlaced")
    async def cancel_order(event, ctx):
        pass

    checkout.ignore("OrderViewed")
"""

BILLING = """
    from sagas.definition import Saga

    billing = Saga("billing")

    @billing.compensate("InvoiceIssued")
    async def void_invoice(event, ctx):
        pass
"""


class TestLoadRegistry:
    def test_loads_sagas_from_module_paths(self, make_package: Callable[..., str]) -> None:
        pkg = make_package({"checkout": CHECKOUT, "billing": BILLING})

        registry = load_registry(
            [f"{pkg}.checkout", f" {pkg}.billing ", "", "  "], use_entry_points=False
        )

        assert [s.name for s in registry.sagas] == ["checkout", "billing"]
        resolution = registry.resolve("InvoiceIssued", 1)
        assert isinstance(resolution, Compensate)
        assert resolution.step.name == "billing.void_invoice"
        assert registry.resolve("OrderViewed", 1) == Ignored("checkout")

    def test_a_saga_imported_into_another_module_counts_once(
        self, make_package: Callable[..., str]
    ) -> None:
        pkg = make_package(
            {
                "checkout": CHECKOUT,
                "reexport": "from PKG.checkout import checkout\nshop = checkout\n",
            }
        )

        registry = load_registry([f"{pkg}.checkout", f"{pkg}.reexport"], use_entry_points=False)

        assert [s.name for s in registry.sagas] == ["checkout"]

    def test_several_sagas_in_one_module(self, make_package: Callable[..., str]) -> None:
        pkg = make_package({"both": textwrap.dedent(CHECKOUT) + textwrap.dedent(BILLING)})

        registry = load_registry([f"{pkg}.both"], use_entry_points=False)

        assert sorted(s.name for s in registry.sagas) == ["billing", "checkout"]

    def test_import_failure_names_the_module(self, make_package: Callable[..., str]) -> None:
        pkg = make_package({"broken": "raise RuntimeError('saga module exploded')\n"})

        with pytest.raises(RegistryError) as caught:
            load_registry([f"{pkg}.broken"], use_entry_points=False)

        assert f"{pkg}.broken" in str(caught.value)
        assert "saga module exploded" in str(caught.value)
        assert isinstance(caught.value.__cause__, RuntimeError)

    def test_definition_error_at_import_names_the_module(
        self, make_package: Callable[..., str]
    ) -> None:
        source = textwrap.dedent(CHECKOUT) + (
            "\n@checkout.compensate('Late')\ndef not_async(event, ctx): ...\n"
        )
        pkg = make_package({"bad": source})

        with pytest.raises(RegistryError, match=f"{pkg}.bad.*async"):
            load_registry([f"{pkg}.bad"], use_entry_points=False)

    def test_missing_module_names_it(self) -> None:
        missing = f"no_such_saga_module_{uuid.uuid4().hex}"

        with pytest.raises(RegistryError, match=missing):
            load_registry([missing], use_entry_points=False)

    def test_module_without_saga_is_an_error(self, make_package: Callable[..., str]) -> None:
        pkg = make_package({"empty": "from sagas.definition import Saga\nVALUE = 1\n"})

        with pytest.raises(RegistryError, match=f"{pkg}.empty.*defines no Saga"):
            load_registry([f"{pkg}.empty"], use_entry_points=False)

    def test_clash_between_modules_names_both_sagas(self, make_package: Callable[..., str]) -> None:
        clash = CHECKOUT.replace('Saga("checkout")', 'Saga("returns")')
        pkg = make_package({"checkout": CHECKOUT, "returns": clash})

        with pytest.raises(RegistryError, match="'checkout' and 'returns'"):
            load_registry([f"{pkg}.checkout", f"{pkg}.returns"], use_entry_points=False)


class TestEntryPoints:
    def patch(self, monkeypatch: pytest.MonkeyPatch, points: list[EntryPoint]) -> None:
        def fake_entry_points(*, group: str) -> list[EntryPoint]:
            assert group == ENTRY_POINT_GROUP
            return points

        monkeypatch.setattr(sagas.registry, "entry_points", fake_entry_points)

    def test_entry_points_name_modules_or_saga_objects(
        self, make_package: Callable[..., str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        pkg = make_package({"checkout": CHECKOUT, "billing": BILLING})
        self.patch(
            monkeypatch,
            [
                EntryPoint("shop", f"{pkg}.checkout", ENTRY_POINT_GROUP),
                EntryPoint("billing", f"{pkg}.billing:billing", ENTRY_POINT_GROUP),
            ],
        )

        registry = load_registry([])

        assert [s.name for s in registry.sagas] == ["checkout", "billing"]

    def test_entry_point_and_module_path_naming_the_same_saga(
        self, make_package: Callable[..., str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        pkg = make_package({"checkout": CHECKOUT})
        self.patch(monkeypatch, [EntryPoint("shop", f"{pkg}.checkout", ENTRY_POINT_GROUP)])

        registry = load_registry([f"{pkg}.checkout"])

        assert [s.name for s in registry.sagas] == ["checkout"]

    def test_entry_point_to_something_else_is_an_error(
        self, make_package: Callable[..., str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        pkg = make_package({"odd": "VALUE = 42\n"})
        self.patch(monkeypatch, [EntryPoint("odd-one", f"{pkg}.odd:VALUE", ENTRY_POINT_GROUP)])

        with pytest.raises(RegistryError, match="'odd-one' is not a Saga"):
            load_registry([])

    def test_entry_point_that_fails_to_load_is_named(
        self, make_package: Callable[..., str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        pkg = make_package({"broken": "raise ImportError('missing dependency foo')\n"})
        self.patch(monkeypatch, [EntryPoint("shop", f"{pkg}.broken", ENTRY_POINT_GROUP)])

        with pytest.raises(RegistryError, match=r"'shop'.*missing dependency foo"):
            load_registry([])

    def test_entry_points_can_be_turned_off(
        self, make_package: Callable[..., str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        pkg = make_package({"broken": "raise ImportError('must not be imported')\n"})
        self.patch(monkeypatch, [EntryPoint("shop", f"{pkg}.broken", ENTRY_POINT_GROUP)])

        assert load_registry([], use_entry_points=False).sagas == []
