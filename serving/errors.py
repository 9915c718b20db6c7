"""One error envelope for every failure: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "internal_server_error", 502: "upstream_error", 503: "service_unavailable", 504: "timeout_error"}


class APIError(Exception):
    """An error the gateway answers with; ``headers`` (e.g. ``Retry-After``) go out with it."""

    def __init__(self, status: int, message: str, *, type: Optional[str] = None, param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "api_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def sse(self) -> bytes:
        """The error as a final server-sent event, for failures after a stream has begun."""
        return f"data: {json.dumps(self.body())}\n\n".encode()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return (f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")), param


def _count(request: Request, status: int) -> None:
    """Counts a request refused before the proxy saw it (bad body, unknown route, internal error)."""
    proxy = getattr(request.app.state, "proxy", None)
    if proxy is not None:
        # the endpoint label for the generation routes, "other" for the rest (a bounded label set)
        endpoint = request.url.path if request.url.path in getattr(request.app, "hot_routes", ()) else "other"
        proxy.metrics.requests.labels("unknown", endpoint, str(status), "-").inc()


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``limit`` bytes, by its Content-Length before anything
    is read, else counted as it arrives (a chunked upload stops being read at the limit)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            request = Request(scope)
            _count(request, 413)
            return await self._too_large().response()(scope, receive, send)
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                too_large = StarletteHTTPException(413, self._too_large().message)
                too_large.code = "body_too_large"  # type: ignore[attr-defined]  # kept by the handler below
                raise too_large
            return message

        await self.app(scope, limited, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"request body over the gateway's limit of {self.limit:,} bytes; send a shorter "
                             f"prompt (or raise max_body_bytes in the gateway config)", code="body_too_large")


def install_error_handlers(app: FastAPI) -> None:
    """Routes every exception the app can raise into the envelope."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        _count(request, 400)
        message, param = _validation_message(exc)
        return APIError(400, message, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        _count(request, exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=getattr(exc, "code", None),
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        _count(request, 500)
        return APIError(500, f"internal error: {type(exc).__name__}").response()
