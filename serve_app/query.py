"""Query parameters of `/recommend`, the hot route, read by hand.

FastAPI's per-parameter validation and its response-model pass cost about a tenth of a precomputed answer's
replica time (py-spy under hey load, README "Serving"). The rules are FastAPI's own: an absent parameter takes
its default, a malformed one is a 422 naming it; booleans take the same spellings. `openapi` documents the
parameters as FastAPI would, so /docs is unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
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
    """The body as FastAPI's JSONResponse renders it, without a response-model pass over every item."""
    return Response(json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_plain),
                    media_type="application/json")
