"""Optional API keys: `Authorization: Bearer <key>` or `X-API-Key: <key>`.

The keys are held as SHA-256 digests, and a presented key is compared with every one of them with
`hmac.compare_digest` on the digests: the time taken depends neither on how much of a key matched nor on its
length, nor on which key matched. A refusal (401, `errors.py`) says the same whatever was wrong: no
header, another scheme, an unknown key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated

from fastapi import Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

# auto_error=False: a missing header is this module's refusal (the same 401 as a wrong key), not FastAPI's 403
BEARER = HTTPBearer(auto_error=False, description="Authorization: Bearer <key>, a key of VAR_API_KEYS")
API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="a key of VAR_API_KEYS")


class Unauthorized(Exception):
    """No valid API key was presented."""

    CHALLENGE = 'Bearer realm="var-serve"'

    def __init__(self) -> None:
        super().__init__("a valid API key is required")  # the same answer whatever was wrong with the key


class ApiKeys:
    def __init__(self, keys: Iterable[str]):
        self._digests = [_digest(k) for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def accepts(self, key: str | None) -> bool:
        if key is None:
            return False
        given = _digest(key)
        found = False
        for d in self._digests:  # every key, without stopping at a match
            found |= hmac.compare_digest(given, d)
        return found

    def admit(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        """Whether an ASGI request's raw headers pass what `require_key` checks: no keys are set, or a valid key
        is presented (read without FastAPI, for the refusal before routing: `middleware.ShedWhenFull`)."""
        if not self:
            return True
        presented: list[str | None] = [None, None]
        for name, value in headers:
            if name == b"authorization":
                scheme, _, credentials = value.decode("latin-1").partition(" ")
                presented[0] = credentials.strip() if scheme.lower() == "bearer" else None
            elif name == b"x-api-key":
                presented[1] = value.decode("latin-1")
        return any([self.accepts(k) for k in presented])


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def require_key(keys: ApiKeys) -> Callable[..., Awaitable[None]]:
    """A route dependency that refuses (Unauthorized) a request without a valid key; both ways of presenting
    one are declared in the OpenAPI document (Swagger's Authorize button)."""

    async def api_key(
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
        header: Annotated[str | None, Security(API_KEY_HEADER)],
    ) -> None:
        presented = [bearer.credentials if bearer else None, header]
        if not any([keys.accepts(k) for k in presented]):  # both checked, whichever is given
            raise Unauthorized

    return api_key
