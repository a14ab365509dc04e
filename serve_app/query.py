"""Query parameters and the body of `/recommend`, the hot route, by hand.

FastAPI's per-parameter validation, its response-model pass and the json module's float printing cost about a
tenth of a precomputed answer's replica time (py-spy under hey load, README "Serving"). The rules are FastAPI's
own: an absent parameter takes its default, a malformed one is a 422 naming it; booleans take the same
spellings. `openapi` documents the parameters as FastAPI would, so /docs is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
from fastapi import HTTPException
from fastapi.responses import Response

TRUE = frozenset({"1", "true", "on", "yes"})
FALSE = frozenset({"0", "false", "off", "no"})
SHOWN = 40  # characters of a malformed value quoted back


def int_param(query: Mapping[str, str], name: str, default: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise HTTPException(422, f"{name} must be an integer, got {raw[:SHOWN]!r}") from None


def bool_param(query: Mapping[str, str], name: str, default: bool) -> bool:
    raw = query.get(name)
    if raw is None:
        return default
    low = raw.lower()
    if low in TRUE:
        return True
    if low in FALSE:
        return False
    raise HTTPException(422, f"{name} must be true or false, got {raw[:SHOWN]!r}")


def openapi(params: list[tuple[str, str, Any, str]]) -> dict[str, Any]:
    """`openapi_extra` for query parameters (name, JSON type, default, description) read by hand."""
    return {"parameters": [{"name": name, "in": "query", "required": False, "description": text,
                            "schema": {"type": kind, **({} if default is None else {"default": default})}}
                           for name, kind, default, text in params]}


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def json_response(body: dict[str, Any]) -> Response:
    """The body as FastAPI's JSONResponse renders it (compact UTF-8), without a response-model pass over every item,
    through orjson: the json module took 17 us for a 20-item answer, mostly printing floats; orjson 1 us. A
    non-finite number becomes null where the json module refused it."""
    return Response(orjson.dumps(body, default=_plain, option=orjson.OPT_SERIALIZE_NUMPY),
                    media_type="application/json")
