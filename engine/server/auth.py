"""Bearer tokens: the API key every /v1 request must carry (vLLM's `--api-key`) and the admin token of prompt
management. Compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence

from fastapi.responses import JSONResponse

from .schemas import anthropic_error_body, error_body, is_anthropic_path


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key among raw ASGI headers: an `Authorization: Bearer <token>` header's token, else an `x-api-key`
    header's value (Anthropic's clients send that), else None."""
    api_key = None
    for name, value in headers:
        name = name.lower()
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
        if name == b"x-api-key":
            api_key = value.decode("latin-1").strip()
    return api_key


def token_matches(token: str | None, keys: Sequence[str]) -> bool:
    if token is None:
        return False
    return any(hmac.compare_digest(token.encode(), key.encode()) for key in keys)


def unauthorized(message: str, path: str = "") -> JSONResponse:
    body = (anthropic_error_body(401, message) if is_anthropic_path(path)
            else error_body(message, "authentication_error", code="invalid_api_key"))
    return JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})


def missing_api_key(path: str = "") -> JSONResponse:
    return unauthorized("this server needs an API key: send Authorization: Bearer <key> (or x-api-key: <key>)", path)


class APIKeyGuard:
    """Pure ASGI middleware: a request to a /v1 route (or /invocations) without a bearer token among `keys` gets a
    401 before any route sees it (the others, /health, /ping, /metrics, /tokenize, /detokenize, are open, as in
    vLLM)."""

    def __init__(self, app, keys: Sequence[str]):
        self.app, self.keys = app, tuple(keys)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and is_guarded(scope["path"]) and not token_matches(
                presented_key(scope["headers"]), self.keys):
            return await missing_api_key(scope["path"])(scope, receive, send)
        return await self.app(scope, receive, send)


def is_guarded(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/") or path == "/invocations"
