"""Errors in the shape every OpenAI/Together SDK parses: {"error": {message, type, param, code}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from k2serve.engine.async_engine import EngineOverloaded, ShareExceeded

log = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


OVERLOAD_RETRY_AFTER_S = 1


def overloaded(message: str) -> APIError:
    """503: the server is at capacity (the caller is within its own rate); retry shortly."""
    return APIError(503, f"The server is overloaded: {message}. Retry shortly.",
                    code="server_overloaded", type="service_unavailable",
                    headers={"retry-after": str(OVERLOAD_RETRY_AFTER_S)})


def share_exceeded(message: str) -> APIError:
    """429: the server is full and this key holds more than its share of it; other keys'
    requests are still admitted. Retry shortly."""
    return APIError(429, f"Too many concurrent requests: {message}. Retry shortly.",
                    code="too_many_concurrent_requests",
                    headers={"retry-after": str(OVERLOAD_RETRY_AFTER_S)})


def error_response(error: APIError) -> JSONResponse:
    headers = dict(error.headers)
    # Deterministic failures: tell Stainless SDKs not to retry them.
    if error.status < 500 and error.status not in (408, 409, 429):
        headers.setdefault("x-should-retry", "false")
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _describe_validation_error(err: dict) -> tuple[str, str | None]:
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind = err.get("type", "")
    if kind == "json_invalid":
        return "Request body is not valid JSON: " + str(err.get("ctx", {}).get("error", "")), None
    msg = err.get("msg", "invalid value")
    if kind == "missing":
        return f"Missing required parameter: '{param}'.", param
    if param:
        return f"Invalid value for '{param}': {msg}.", param
    return f"Invalid request body: {msg}.", None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        message, param = _describe_validation_error(errors[0]) if errors else ("Invalid request.", None)
        return error_response(APIError(400, message, param=param, code="invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = {404: f"Unknown path: {request.method} {request.url.path}",
                   405: f"Method {request.method} not allowed on {request.url.path}"}.get(
                       exc.status_code, str(exc.detail))
        return error_response(APIError(exc.status_code, message))

    @app.exception_handler(EngineOverloaded)
    async def _overloaded(request: Request, exc: EngineOverloaded):
        if isinstance(exc, ShareExceeded):
            return error_response(share_exceeded(str(exc)))
        return error_response(overloaded(str(exc)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(APIError(500, "Internal server error.", type="server_error"))
