"""Saga declarations, retry policies and the handler's `CompensationContext`."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel

from sagas.context import CompensationContext, Headers
from sagas.definition import CompensationStep, ManualAction, Saga
from sagas.errors import DefinitionError
from sagas.retry import RetryPolicy
from schemas.envelope import EventEnvelope


class OrderPlaced(BaseModel):
    order_id: str


class OrderPlacedV3(BaseModel):
    __event_type__ = "OrderPlaced"
    __schema_version__ = 3

    order_id: str
    channel: str


class PaymentCaptured(BaseModel):
    __schema_version__ = 2

    payment_id: str
    amount_cents: int


async def undo(event: Any, ctx: Any) -> None:
    """A valid handler shape, used where only the declaration matters."""


# --------------------------------------------------------------------- Saga


class TestSagaName:
    @pytest.mark.parametrize("name", ["checkout", "checkout-v2", "shop.checkout", "_x1"])
    def test_identifier_like_names_are_accepted(self, name: str) -> None:
        assert Saga(name).name == name

    @pytest.mark.parametrize("name", ["", "has space", "1st", "a/b", "ünicode?"])
    def test_other_names_are_rejected(self, name: str) -> None:
        with pytest.raises(DefinitionError, match="saga name"):
            Saga(name)


class TestCompensate:
    def test_model_gives_type_and_version_and_step_metadata(self) -> None:
        saga = Saga("checkout")
        policy = RetryPolicy(max_attempts=8)

        returned = saga.compensate(
            PaymentCaptured, confirm="PaymentRefunded", confirm_timeout=5.0, retry=policy
        )(undo)

        assert returned is undo  # decorators only attach metadata
        step = saga.steps[("PaymentCaptured", 2)]
        assert step == CompensationStep(
            saga="checkout",
            event_type="PaymentCaptured",
            version=2,
            handler=undo,
            model=PaymentCaptured,
            confirm="PaymentRefunded",
            confirm_timeout=5.0,
            retry=policy,
        )
        assert step.name == "checkout.undo"

    def test_model_without_version_is_v1_and_default_policy_applies(self) -> None:
        saga = Saga("checkout")

        saga.compensate(OrderPlaced)(undo)

        step = saga.steps[("OrderPlaced", 1)]
        assert step.retry == RetryPolicy()
        assert step.confirm is None
        assert step.model is OrderPlaced

    def test_event_type_override_on_the_model(self) -> None:
        saga = Saga("checkout")

        saga.compensate(OrderPlacedV3)(undo)

        assert set(saga.steps) == {("OrderPlaced", 3)}

    def test_type_name_defaults_to_v1_and_takes_an_explicit_version(self) -> None:
        saga = Saga("checkout")

        async def undo_v1(event: dict[str, Any], ctx: Any) -> None: ...

        async def undo_v4(event: dict[str, Any], ctx: Any) -> None: ...

        saga.compensate("ShipmentBooked")(undo_v1)
        saga.compensate("ShipmentBooked", version=4)(undo_v4)

        assert saga.steps[("ShipmentBooked", 1)].handler is undo_v1
        assert saga.steps[("ShipmentBooked", 4)].handler is undo_v4
        assert saga.steps[("ShipmentBooked", 4)].model is None

    def test_explicit_version_contradicting_the_model_is_rejected(self) -> None:
        with pytest.raises(DefinitionError, match="contradicts"):
            Saga("checkout").compensate(PaymentCaptured, version=1)

    def test_explicit_version_matching_the_model_is_fine(self) -> None:
        saga = Saga("checkout")

        saga.compensate(PaymentCaptured, version=2)(undo)

        assert ("PaymentCaptured", 2) in saga.steps

    def test_sync_handler_is_rejected(self) -> None:
        def sync_handler(event: Any, ctx: Any) -> None: ...

        with pytest.raises(DefinitionError, match="async"):
            Saga("checkout").compensate(OrderPlaced)(sync_handler)

    def test_async_generator_is_not_a_handler(self) -> None:
        async def generator(event: Any, ctx: Any) -> Any:
            yield None

        with pytest.raises(DefinitionError, match="async"):
            Saga("checkout").compensate(OrderPlaced)(generator)

    @pytest.mark.parametrize("arity", [0, 1, 3])
    def test_wrong_parameter_count_is_rejected(self, arity: int) -> None:
        handlers = {
            0: _async_noargs,
            1: _async_one,
            3: _async_three,
        }

        with pytest.raises(DefinitionError, match="exactly two parameters"):
            Saga("checkout").compensate(OrderPlaced)(handlers[arity])

    def test_keyword_only_extras_do_not_count(self) -> None:
        async def handler(event: Any, ctx: Any, *, verbose: bool = False) -> None: ...

        saga = Saga("checkout")
        saga.compensate(OrderPlaced)(handler)

        assert saga.steps[("OrderPlaced", 1)].handler is handler

    def test_bound_method_counts_without_self(self) -> None:
        class Handlers:
            async def cancel(self, event: Any, ctx: Any) -> None: ...

        saga = Saga("checkout")
        saga.compensate(OrderPlaced)(Handlers().cancel)

        assert ("OrderPlaced", 1) in saga.steps

    def test_duplicate_type_and_version_names_both_handlers(self) -> None:
        saga = Saga("checkout")

        async def first(event: Any, ctx: Any) -> None: ...

        async def second(event: Any, ctx: Any) -> None: ...

        saga.compensate(OrderPlaced)(first)
        with pytest.raises(DefinitionError) as caught:
            saga.compensate("OrderPlaced", version=1)(second)

        message = str(caught.value)
        assert "checkout" in message
        assert "OrderPlaced v1" in message
        assert "first" in message
        assert "second" in message
        assert saga.steps[("OrderPlaced", 1)].handler is first

    def test_same_type_other_version_is_a_second_step(self) -> None:
        saga = Saga("checkout")

        saga.compensate(OrderPlaced)(undo)
        saga.compensate(OrderPlacedV3)(undo)

        assert set(saga.steps) == {("OrderPlaced", 1), ("OrderPlaced", 3)}
        assert saga.step_order == ["OrderPlaced"]

    @pytest.mark.parametrize("timeout", [0, -1.5])
    def test_non_positive_confirm_timeout_is_rejected(self, timeout: float) -> None:
        with pytest.raises(DefinitionError, match="confirm_timeout"):
            Saga("checkout").compensate(
                OrderPlaced, confirm="OrderCancelled", confirm_timeout=timeout
            )

    @pytest.mark.parametrize("bad", ["", "   "])
    def test_blank_confirm_type_is_rejected(self, bad: str) -> None:
        with pytest.raises(DefinitionError, match="event type"):
            Saga("checkout").compensate(OrderPlaced, confirm=bad)

    @pytest.mark.parametrize("version", [0, -1, "2", 1.5, None])
    def test_model_with_bad_schema_version_is_rejected(self, version: Any) -> None:
        model = type(
            "Broken", (BaseModel,), {"__schema_version__": version, "__annotations__": {"x": int}}
        )

        with pytest.raises(DefinitionError, match="__schema_version__"):
            Saga("checkout").compensate(model)

    @pytest.mark.parametrize("version", [0, -3])
    def test_bad_explicit_version_for_a_type_name_is_rejected(self, version: int) -> None:
        with pytest.raises(DefinitionError, match="version"):
            Saga("checkout").compensate("OrderPlaced", version=version)

    @pytest.mark.parametrize("event", [object(), dict, 42, ""])
    def test_neither_model_nor_type_name_is_rejected(self, event: Any) -> None:
        with pytest.raises(DefinitionError):
            Saga("checkout").compensate(event)


async def _async_noargs() -> None: ...


async def _async_one(event: Any) -> None: ...


async def _async_three(event: Any, ctx: Any, extra: Any) -> None: ...


class TestDeclaredOnce:
    @pytest.mark.parametrize(
        ("first", "second"),
        [
            ("compensate", "ignore"),
            ("compensate", "irreversible"),
            ("ignore", "compensate"),
            ("ignore", "irreversible"),
            ("irreversible", "compensate"),
            ("irreversible", "ignore"),
        ],
    )
    def test_a_type_has_one_kind_of_declaration(self, first: str, second: str) -> None:
        saga = Saga("checkout")
        declare = {
            "compensate": lambda: saga.compensate("ReceiptEmailed")(undo),
            "ignore": lambda: saga.ignore("ReceiptEmailed"),
            "irreversible": lambda: saga.irreversible("ReceiptEmailed", action="Call them"),
        }
        declare[first]()
        before = (dict(saga.steps), dict(saga.manual), set(saga.ignored))

        with pytest.raises(DefinitionError, match="ReceiptEmailed") as caught:
            declare[second]()

        assert "both" in str(caught.value)
        assert (dict(saga.steps), dict(saga.manual), set(saga.ignored)) == before


class TestIrreversibleAndIgnore:
    def test_irreversible_records_a_stripped_action(self) -> None:
        saga = Saga("checkout")

        saga.irreversible("ReceiptEmailed", action="  Send a correction e-mail  ")

        assert saga.manual["ReceiptEmailed"] == ManualAction(
            "checkout", "ReceiptEmailed", "Send a correction e-mail"
        )
        assert saga.step_order == ["ReceiptEmailed"]

    @pytest.mark.parametrize("action", ["", "   \n"])
    def test_irreversible_needs_an_action(self, action: str) -> None:
        saga = Saga("checkout")

        with pytest.raises(DefinitionError, match="needs an action"):
            saga.irreversible("ReceiptEmailed", action=action)
        assert saga.manual == {}

    def test_ignore_and_claims(self) -> None:
        saga = Saga("checkout")
        saga.ignore("OrderViewed")
        saga.irreversible("ReceiptEmailed", action="Apologise")
        saga.compensate(OrderPlaced)(undo)
        saga.compensate(OrderPlacedV3)(undo)

        assert saga.claims() == {"OrderViewed", "ReceiptEmailed", "OrderPlaced"}

    @pytest.mark.parametrize("name", ["", "  "])
    def test_blank_type_names_are_rejected(self, name: str) -> None:
        saga = Saga("checkout")

        with pytest.raises(DefinitionError):
            saga.ignore(name)
        with pytest.raises(DefinitionError):
            saga.irreversible(name, action="x")
        with pytest.raises(DefinitionError):
            saga.upcaster(name, from_version=1)


# ---------------------------------------------------------------- upcasters


class TestUpcaster:
    def test_plain_function_of_one_parameter_is_registered(self) -> None:
        saga = Saga("checkout")

        def v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
            return {**payload, "channel": "web"}

        returned = saga.upcaster("OrderPlaced", from_version=1)(v1_to_v2)

        assert returned is v1_to_v2
        assert saga.upcasters == {("OrderPlaced", 1): v1_to_v2}

    def test_async_upcaster_is_rejected(self) -> None:
        async def v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
            return payload

        with pytest.raises(DefinitionError, match="not async"):
            Saga("checkout").upcaster("OrderPlaced", from_version=1)(v1_to_v2)  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        "function",
        [lambda: {}, lambda payload, extra: payload],
        ids=["no-parameter", "two-parameters"],
    )
    def test_upcaster_must_take_exactly_one_parameter(self, function: Any) -> None:
        with pytest.raises(DefinitionError, match="exactly one parameter"):
            Saga("checkout").upcaster("OrderPlaced", from_version=1)(function)

    def test_duplicate_upcaster_is_rejected(self) -> None:
        saga = Saga("checkout")
        saga.upcaster("OrderPlaced", from_version=1)(lambda p: p)

        with pytest.raises(DefinitionError, match="two upcasters for OrderPlaced from v1"):
            saga.upcaster("OrderPlaced", from_version=1)(lambda p: p)

    def test_same_version_of_another_type_is_fine(self) -> None:
        saga = Saga("checkout")
        saga.upcaster("OrderPlaced", from_version=1)(lambda p: p)
        saga.upcaster("PaymentCaptured", from_version=1)(lambda p: p)

        assert set(saga.upcasters) == {("OrderPlaced", 1), ("PaymentCaptured", 1)}

    @pytest.mark.parametrize("version", [0, -1])
    def test_from_version_must_be_positive(self, version: int) -> None:
        with pytest.raises(DefinitionError, match="from_version"):
            Saga("checkout").upcaster("OrderPlaced", from_version=version)


class TestValidate:
    def test_complete_chain_to_a_handled_version_passes(self) -> None:
        saga = Saga("checkout")
        saga.compensate(OrderPlacedV3)(undo)
        saga.upcaster("OrderPlaced", from_version=2)(lambda p: p)
        saga.upcaster("OrderPlaced", from_version=1)(lambda p: p)

        saga.validate()

    def test_gap_in_the_chain_is_named(self) -> None:
        saga = Saga("checkout")
        saga.compensate("OrderPlaced", version=4)(undo)
        saga.upcaster("OrderPlaced", from_version=1)(lambda p: p)
        saga.upcaster("OrderPlaced", from_version=3)(lambda p: p)

        with pytest.raises(DefinitionError, match="gap: no upcaster from v2"):
            saga.validate()

    def test_chain_leading_to_an_unhandled_version_is_named(self) -> None:
        saga = Saga("checkout")
        saga.compensate(OrderPlacedV3)(undo)
        saga.upcaster("OrderPlaced", from_version=1)(lambda p: p)

        with pytest.raises(DefinitionError) as caught:
            saga.validate()

        message = str(caught.value)
        assert "OrderPlaced" in message
        assert "lead to v2" in message
        assert "[3]" in message

    def test_chain_past_the_newest_handled_version_is_rejected(self) -> None:
        saga = Saga("checkout")
        saga.compensate(OrderPlaced)(undo)
        saga.upcaster("OrderPlaced", from_version=1)(lambda p: p)

        with pytest.raises(DefinitionError, match="lead to v2"):
            saga.validate()

    def test_chains_of_each_type_are_checked_separately(self) -> None:
        saga = Saga("checkout")
        saga.compensate(OrderPlacedV3)(undo)
        saga.upcaster("OrderPlaced", from_version=1)(lambda p: p)
        saga.upcaster("OrderPlaced", from_version=2)(lambda p: p)
        saga.compensate(PaymentCaptured)(undo)
        saga.upcaster("PaymentCaptured", from_version=2)(lambda p: p)

        with pytest.raises(DefinitionError, match="PaymentCaptured"):
            saga.validate()


# -------------------------------------------------------------- RetryPolicy


class TestRetryPolicy:
    @pytest.mark.parametrize(
        "kwargs",
        [
            {"max_attempts": 0},
            {"initial_delay": -0.1},
            {"max_delay": -1},
            {"multiplier": 0.5},
            {"jitter": -0.01},
            {"jitter": 1.01},
            {"timeout": 0},
            {"timeout": -5},
        ],
    )
    def test_invalid_policies_are_rejected(self, kwargs: dict[str, float]) -> None:
        with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
            RetryPolicy(**kwargs)  # type: ignore[arg-type]

    def test_boundary_values_are_valid(self) -> None:
        policy = RetryPolicy(
            max_attempts=1, initial_delay=0, multiplier=1, max_delay=0, jitter=1, timeout=0.001
        )

        assert policy.delay(3) == 0

    def test_delay_grows_exponentially_up_to_the_cap(self) -> None:
        policy = RetryPolicy(initial_delay=0.5, multiplier=3, max_delay=10, jitter=0)

        assert [policy.delay(n) for n in range(1, 7)] == [0.5, 1.5, 4.5, 10, 10, 10]
        # "0 failures" is treated like the first.
        assert policy.delay(0) == 0.5

    def test_multiplier_one_is_a_constant_delay(self) -> None:
        policy = RetryPolicy(initial_delay=2, multiplier=1, jitter=0)

        assert {policy.delay(n) for n in range(1, 50)} == {2}

    def test_cap_holds_for_very_many_attempts(self) -> None:
        # A "retry every minute, for days" policy reaches attempt numbers where
        # multiplier ** attempts no longer fits a float.
        policy = RetryPolicy(max_attempts=100_000, max_delay=60, jitter=0)

        assert policy.delay(5_000) == 60
        assert 0 <= policy.delay(5_000, random.Random(1)) <= 60
        assert RetryPolicy(initial_delay=0, max_attempts=100_000).delay(5_000) == 0

    def test_jitter_stays_within_its_bounds_and_varies(self) -> None:
        policy = RetryPolicy(initial_delay=1, multiplier=2, max_delay=1000, jitter=0.25)
        rng = random.Random(20260101)

        for failed in (1, 2, 5):
            base = 2 ** (failed - 1)
            samples = [policy.delay(failed, rng) for _ in range(500)]
            assert all(base * 0.75 <= s <= base * 1.25 for s in samples)
            # Jitter spreads retries: not one value, and both sides of the base.
            assert len(set(samples)) > 100
            assert min(samples) < base < max(samples)

    def test_jitter_never_exceeds_the_cap(self) -> None:
        policy = RetryPolicy(initial_delay=1, multiplier=2, max_delay=8, jitter=0.5)
        rng = random.Random(7)

        samples = [policy.delay(10, rng) for _ in range(500)]

        assert max(samples) <= 8
        assert min(samples) >= 4

    def test_same_seed_same_delays(self) -> None:
        policy = RetryPolicy(jitter=0.5)

        first = [policy.delay(n, random.Random(42)) for n in range(1, 6)]
        second = [policy.delay(n, random.Random(42)) for n in range(1, 6)]

        assert first == second

    def test_full_jitter_is_never_negative(self) -> None:
        policy = RetryPolicy(initial_delay=1, jitter=1)
        rng = random.Random(3)

        assert all(policy.delay(1, rng) >= 0 for _ in range(500))

    def test_exhausted(self) -> None:
        policy = RetryPolicy(max_attempts=3)

        assert [policy.exhausted(n) for n in range(5)] == [False, False, False, True, True]


# ---------------------------------------------------- CompensationContext


class FakeSink:
    def __init__(self, fail: Exception | None = None) -> None:
        self.records: list[tuple[str, bytes, bytes | None, Headers]] = []
        self.fail = fail

    async def send(self, topic: str, value: bytes, key: bytes | None, headers: Headers) -> None:
        if self.fail is not None:
            raise self.fail
        self.records.append((topic, value, key, headers))


class CancelOrder(BaseModel):
    command: str = "CancelOrder"
    order_id: str
    at: datetime


def make_context(sink: FakeSink) -> CompensationContext:
    envelope = EventEnvelope(
        event_id="evt-1",
        event_type="OrderPlaced",
        schema_version=1,
        service="orders",
        service_version="2.4.0",
        deployment_id="orders-2.4.0-7f3a",
        occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
        payload={"order_id": "o-1"},
    )
    return CompensationContext(
        rollback_id="rb-1",
        deployment_id="orders-2.4.0-7f3a",
        idempotency_key="idem-abc",
        attempt=2,
        envelope=envelope,
        saga="checkout",
        sink=sink,
    )


def without_trace(headers: Headers) -> Headers:
    """The headers minus the W3C trace context (covered in tests/unit/test_tracing.py)."""
    return [(n, v) for n, v in headers if n not in ("traceparent", "tracestate")]


class TestCompensationContextSend:
    async def test_dict_value_headers_and_str_key(self) -> None:
        sink = FakeSink()
        ctx = make_context(sink)

        await ctx.send("orders.commands", {"command": "CancelOrder", "order_id": "o-1"}, key="o-1")

        [(topic, value, key, headers)] = sink.records
        assert topic == "orders.commands"
        assert key == b"o-1"
        assert json.loads(value) == {"command": "CancelOrder", "order_id": "o-1"}
        assert b" " not in value  # compact
        assert without_trace(headers) == [
            ("backout-idempotency-key", b"idem-abc"),
            ("backout-rollback-id", b"rb-1"),
            ("backout-compensates", b"evt-1"),
        ]

    async def test_caller_headers_come_first_then_backout_then_trace(self) -> None:
        sink = FakeSink()
        ctx = make_context(sink)

        await ctx.send("t", b"raw", headers={"x-tenant": "acme", "x-bin": b"\x00\x01"})

        [(_, _, _, headers)] = sink.records
        assert headers[:5] == [
            ("x-tenant", b"acme"),
            ("x-bin", b"\x00\x01"),
            ("backout-idempotency-key", b"idem-abc"),
            ("backout-rollback-id", b"rb-1"),
            ("backout-compensates", b"evt-1"),
        ]
        assert [name for name, _ in headers[5:]] == ["traceparent"]

    async def test_pydantic_value_is_its_json(self) -> None:
        sink = FakeSink()
        ctx = make_context(sink)
        command = CancelOrder(order_id="o-1", at=datetime(2026, 1, 1, 12, tzinfo=UTC))

        await ctx.send("orders.commands", command, key=b"o-1")

        [(_, value, key, _)] = sink.records
        assert key == b"o-1"
        assert CancelOrder.model_validate_json(value) == command

    @pytest.mark.parametrize(
        ("value", "expected"),
        [(b"\x00binary\xff", b"\x00binary\xff"), ("plain text ü", "plain text ü".encode())],
    )
    async def test_bytes_and_str_values(self, value: bytes | str, expected: bytes) -> None:
        sink = FakeSink()
        ctx = make_context(sink)

        await ctx.send("t", value)

        [(_, sent, key, _)] = sink.records
        assert sent == expected
        assert key is None

    async def test_sent_commands_are_recorded_for_inspection(self) -> None:
        sink = FakeSink()
        ctx = make_context(sink)

        await ctx.send("a", {"n": 1}, key="k1")
        await ctx.send("b", {"n": 2})

        assert [c.topic for c in ctx.sent] == ["a", "b"]
        assert ctx.sent[0].json() == {"n": 1}
        assert ctx.sent[0].header("backout-idempotency-key") == "idem-abc"
        assert ctx.sent[1].header("backout-compensates") == "evt-1"
        assert ctx.sent[1].header("no-such-header") is None

    async def test_a_failed_send_is_not_recorded_as_sent(self) -> None:
        ctx = make_context(FakeSink(fail=ConnectionError("broker down")))

        with pytest.raises(ConnectionError):
            await ctx.send("t", {"n": 1})

        assert ctx.sent == []
