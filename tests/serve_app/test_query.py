"""The hand-read query parameters of /recommend follow FastAPI's rules: defaults, pydantic's parsing, and a 422
listing every malformed parameter with its location."""

import json

import numpy as np
import pytest
from fastapi.exceptions import RequestValidationError
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from serve_app import query
from serve_app.app import RECOMMEND_PARAMS


def _fastapi(kind: type, raw: str) -> object:
    """What FastAPI's own validation makes of `raw` for a parameter of `kind` (None: a 422)."""
    try:
        return TypeAdapter(kind).validate_python(raw)
    except ValidationError:
        return None


def test_absent_parameters_take_their_defaults() -> None:
    assert query.read({}, RECOMMEND_PARAMS) == {"k": 20, "category": None, "exclude_seen": True, "explain": False}


@given(st.sampled_from([int, bool]), st.text(max_size=40))
def test_any_text_gets_fastapis_value_or_a_422_locating_the_parameter(kind: type, raw: str) -> None:
    param = query.Param("x", kind, None, "")
    want = _fastapi(kind, raw)
    if want is not None:
        assert query.read({"x": raw}, [param]) == {"x": want}
        return
    with pytest.raises(RequestValidationError) as err:
        query.read({"x": raw}, [param])
    assert [e["loc"] for e in err.value.errors()] == [("query", "x")]


def test_every_malformed_parameter_is_listed() -> None:
    with pytest.raises(RequestValidationError) as err:
        query.read({"k": "many", "explain": "perhaps", "exclude_seen": "no"}, RECOMMEND_PARAMS)
    assert [e["loc"] for e in err.value.errors()] == [("query", "k"), ("query", "explain")]


@pytest.mark.parametrize("raw", ["5.0", " 5", "+5"])
def test_integers_as_pydantic_reads_them(raw: str) -> None:
    assert query.read({"k": raw}, RECOMMEND_PARAMS)["k"] == 5


def test_the_body_renders_numpy_scalars_and_non_finite_numbers_as_null() -> None:
    body = query.json_response({"items": [{"item_id": "é", "score": np.float32(0.5)}], "n": np.int64(3),
                                "b": np.bool_(True), "x": float("nan")}).body
    assert json.loads(body) == {"items": [{"item_id": "é", "score": 0.5}], "n": 3, "b": True, "x": None}
    assert "é".encode() in body  # UTF-8 as is, like FastAPI's JSONResponse


def test_openapi_lists_each_parameter_with_its_default() -> None:
    doc = {p["name"]: p for p in query.openapi(RECOMMEND_PARAMS)["parameters"]}
    assert doc["k"]["schema"] == {"type": "integer", "default": 20}
    assert doc["category"]["schema"] == {"type": "string"} and doc["category"]["in"] == "query"
    assert doc["explain"]["schema"] == {"type": "boolean", "default": False}


def test_the_deployed_app_routes_recommend_to_the_starlette_route_first() -> None:
    """serve.ingress deploys a copy of the FastAPI app frozen when the class is decorated: the hand-read route for
    /recommend must already be first in that copy, or every request pays FastAPI's dependency solving (py-spy under
    load found it so, 2026-12-06)."""
    from fastapi import FastAPI
    from starlette.routing import Match, Route

    from serve_app import app

    frozen = [c.cell_contents for c in app.Recommender.func_or_class.__init__.__closure__
              if isinstance(c.cell_contents, FastAPI)]
    assert len(frozen) == 1 and frozen[0] is not app.api  # what replicas run is the copy
    scope = {"type": "http", "method": "GET", "path": "/recommend/u1", "root_path": ""}
    first = next(r for r in frozen[0].router.routes if r.matches(scope)[0] == Match.FULL)
    assert isinstance(first, Route) and first.endpoint is app._recommend_route
