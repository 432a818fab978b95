"""The ledger encodes and decodes JSON with orjson, else the standard library.

`sagas.ledger.jsontext.json_text` must give text that decodes to the very value
`json.dumps` would have written, for anything JSON can hold: lone
surrogates and integers beyond 64 bits go to the standard library. And
`json_value` must read any JSON text as `json.loads` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sagas.ledger import jsontext
from sagas.ledger.jsontext import json_text, json_value

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()  # beyond 64 bits as well
    | st.floats(allow_nan=False, allow_infinity=False)  # -0.0, subnormals, 1e308
    | st.text(),  # lone surrogates as well
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@given(JSON_VALUES)
def test_the_text_decodes_to_what_the_standard_library_writes(value: Any) -> None:
    text = json_text(value)
    # repr: -0.0 stays -0.0, floats keep their digits, keys their order.
    assert repr(json.loads(text)) == repr(json.loads(json.dumps(value)))


# What the standard library writes besides: NaN and infinities.
WRITTEN_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@given(WRITTEN_VALUES)
def test_the_value_read_is_what_the_standard_library_reads(value: Any) -> None:
    for text in {json.dumps(value), json.dumps(value, ensure_ascii=False), json_text(value)}:
        # repr: -0.0 stays -0.0, NaN is NaN, integers stay exact.
        assert repr(json_value(text)) == repr(json.loads(text))


@pytest.mark.parametrize(
    "text",
    [
        "[18446744073709551616]",  # 2**64: a float in orjson
        "[-99999999999999999999]",
        "[9223372036854775807, 1.0000000000000000001]",
        '{"n": NaN, "i": -Infinity}',
        '["\\ud800"]',
    ],
)
def test_what_orjson_reads_otherwise_or_refuses_is_read_as_json_does(text: str) -> None:
    assert repr(json_value(text)) == repr(json.loads(text))


def test_orjson_reads_what_it_can(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(text: str) -> Any:
        raise AssertionError(f"the standard library read {text!r}")

    monkeypatch.setattr(jsontext.json, "loads", refuse)
    assert json_value('{"order": "o-1", "amount": 12.5, "items": [1, 2]}') == {
        "order": "o-1",
        "amount": 12.5,
        "items": [1, 2],
    }


def test_orjson_writes_what_it_can() -> None:
    # No spaces, UTF-8 instead of escapes: the orjson path, not the fallback.
    assert json_text({"a": ["é", 1.5, None]}) == '{"a":["é",1.5,null]}'


def test_what_orjson_refuses_and_json_allows_goes_to_the_standard_library() -> None:
    assert json_text({"s": "\ud800"}) == json.dumps({"s": "\ud800"})
    assert json_text([2**64]) == json.dumps([2**64])


class Colour(StrEnum):
    RED = "red"


@dataclass
class Point:
    x: int


def test_values_the_standard_library_refuses_stay_refused() -> None:
    assert json.loads(json_text({"c": Colour.RED})) == {"c": "red"}  # a str, as json writes it
    for refused in (datetime(2026, 1, 1, tzinfo=UTC), Point(1)):
        with pytest.raises(TypeError):
            json_text({"v": refused})
