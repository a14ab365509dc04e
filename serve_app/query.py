"""Query parameters and the body of `/recommend`, the hot route, by hand.

FastAPI's dependency solving, its response-model pass and the json module's float printing cost about a tenth of
a precomputed answer's replica time (py-spy under hey load, README "Serving"). Parameters are validated by the
same pydantic types FastAPI would use, so the values accepted, the 422 body (every malformed parameter, each with
its location) and the OpenAPI entry are FastAPI's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import TypeAdapter, ValidationError

JSON_TYPES = {int: "integer", bool: "boolean", str: "string"}


@dataclass(frozen=True)
class Param:
    name: str
    kind: type
    default: Any
    description: str
    adapter: TypeAdapter = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapter", TypeAdapter(self.kind))


def read(query: Mapping[str, str], params: list[Param]) -> dict[str, Any]:
    """Each parameter's value (its default when absent); a 422 listing every malformed one, as FastAPI answers."""
    values: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    for p in params:
        raw = query.get(p.name)
        if raw is None:
            values[p.name] = p.default
            continue
        try:
            values[p.name] = p.adapter.validate_python(raw)
        except ValidationError as err:
            errors.extend({**e, "loc": ("query", p.name)} for e in err.errors(include_url=False))
    if errors:
        raise RequestValidationError(errors)
    return values


def openapi(params: list[Param]) -> dict[str, Any]:
    """`openapi_extra` documenting the parameters `read` takes."""
    return {"parameters": [{"name": p.name, "in": "query", "required": False, "description": p.description,
                            "schema": {"type": JSON_TYPES[p.kind], **({} if p.default is None else
                                                                      {"default": p.default})}}
                           for p in params]}


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
