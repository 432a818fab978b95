"""A command's bytes (`ctx.send` with a dict): the same whichever encoder wrote them.

Flat dicts of strings, integers, booleans and None take orjson, everything
else `json.dumps`; the bytes must not depend on which (services may compare
or sign them).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from sagas.context import _encode_value


def _standard(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), default=str).encode()


_flat_values = st.one_of(
    st.text(),
    st.text(alphabet=st.characters(max_codepoint=0x7F)),
    st.integers(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.booleans(),
    st.none(),
)
_other_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@given(st.dictionaries(st.text(), _flat_values))
def test_flat_commands_are_written_as_json_dumps_writes_them(value: dict[str, Any]) -> None:
    assert _encode_value(value) == _standard(value)


@given(st.dictionaries(st.text(), st.one_of(_flat_values, _other_values), min_size=1))
def test_any_command_dict_is_written_as_json_dumps_writes_it(value: dict[str, Any]) -> None:
    assert _encode_value(value) == _standard(value)


def test_the_cases_orjson_writes_otherwise() -> None:
    for value in (
        {"name": "Zoë"},  # non-ASCII: escaped by json.dumps
        {"control": "\x7f"},  # DEL: escaped by json.dumps only
        {"big": 2**64},  # beyond 64 bits: orjson refuses
        {"line": "\u2028"},
    ):
        assert _encode_value(value) == _standard(value), value


def test_a_plain_command_takes_the_fast_path(monkeypatch: Any) -> None:
    def refuse(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("json.dumps was used")

    monkeypatch.setattr(json, "dumps", refuse)
    assert _encode_value({"command": "CancelOrder", "order_id": "o-1", "cents": 1250}) == (
        b'{"command":"CancelOrder","order_id":"o-1","cents":1250}'
    )
