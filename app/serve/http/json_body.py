"""JSON request bodies parsed with limits, so that any body a client sends is 422 when it is not a request.

Starlette parses with a plain `json.loads`: a body nested a few thousand levels deep raises RecursionError,
an integer of more than 4,300 digits or bytes that are not UTF-8 raise ValueError, and FastAPI answers those
with a bare 400. Here each of them, and any nesting deeper than MAX_DEPTH (a request is 1 deep), is a
JSONDecodeError, which FastAPI answers as the 422 of JSON that does not parse (`json_invalid`). NaN,
Infinity and numbers beyond a double are parsed as usual and refused by the request model, naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

MAX_DEPTH = 32


def parse_json(body: bytes) -> Any:
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise _invalid(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # not UTF-8, an integer too long to convert
        raise _invalid(str(e)) from None
    if depth(value) > MAX_DEPTH:
        raise _invalid(f"nested deeper than {MAX_DEPTH} levels")
    return value


def depth(value: Any) -> int:
    """Levels of arrays and objects (a scalar is 0), counted without recursion and up to MAX_DEPTH + 1."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, level)
            if deepest > MAX_DEPTH:
                break
            stack.extend((child, level + 1) for child in children)
    return deepest


def _invalid(reason: str) -> json.JSONDecodeError:
    return json.JSONDecodeError(reason, "", 0)


class JSONBodyRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class JSONBodyRoute(APIRoute):
    """A route whose handler reads JSON bodies with `parse_json`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def with_limits(request: Request) -> Response:
            return await handler(JSONBodyRequest(request.scope, request.receive))

        return with_limits
