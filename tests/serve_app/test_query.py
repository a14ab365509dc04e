"""The hand-read query parameters of /recommend follow FastAPI's rules: defaults, spellings, 422 naming the key."""

import json

import numpy as np
import pytest
from fastapi import HTTPException
from hypothesis import given
from hypothesis import strategies as st

from serve_app import query


def test_absent_parameters_take_their_defaults() -> None:
    assert query.int_param({}, "k", 20) == 20
    assert query.bool_param({}, "explain", False) is False and query.bool_param({}, "exclude_seen", True) is True


@pytest.mark.parametrize(("raw", "want"), [("1", True), ("TRUE", True), ("on", True), ("Yes", True),
                                           ("0", False), ("false", False), ("OFF", False), ("no", False)])
def test_booleans_take_fastapis_spellings(raw: str, want: bool) -> None:
    assert query.bool_param({"explain": raw}, "explain", not want) is want


@given(st.text(max_size=60))
def test_any_text_is_an_integer_or_a_422_naming_the_parameter(raw: str) -> None:
    try:
        expected: int | None = int(raw)
    except ValueError:
        expected = None
    if expected is not None:
        assert query.int_param({"k": raw}, "k", 20) == expected
        return
    with pytest.raises(HTTPException) as err:
        query.int_param({"k": raw}, "k", 20)
    assert err.value.status_code == 422 and err.value.detail.startswith("k must be an integer")
    assert err.value.detail.endswith(repr(raw[: query.SHOWN]))  # a long value is not echoed back whole


@given(st.text(max_size=60).filter(lambda s: s.lower() not in query.TRUE | query.FALSE))
def test_any_other_text_is_a_422_for_a_boolean(raw: str) -> None:
    with pytest.raises(HTTPException) as err:
        query.bool_param({"explain": raw}, "explain", False)
    assert err.value.status_code == 422 and "explain must be true or false" in err.value.detail


def test_the_body_renders_numpy_scalars_and_non_finite_numbers_as_null() -> None:
    body = query.json_response({"items": [{"item_id": "é", "score": np.float32(0.5)}], "n": np.int64(3),
                                "b": np.bool_(True), "x": float("nan")}).body
    assert json.loads(body) == {"items": [{"item_id": "é", "score": 0.5}], "n": 3, "b": True, "x": None}
    assert "é".encode() in body  # UTF-8 as is, like FastAPI's JSONResponse


def test_openapi_lists_each_parameter_with_its_default() -> None:
    doc = query.openapi([("k", "integer", 20, "how many"), ("category", "string", None, "filter")])
    assert doc["parameters"][0]["schema"] == {"type": "integer", "default": 20}
    assert doc["parameters"][1]["schema"] == {"type": "string"} and doc["parameters"][1]["in"] == "query"
