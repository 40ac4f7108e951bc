"""Errors as HTTP replies: APIError (k2serve.errors) and every other exception become
{"error": {message, type, param, code}} with the right status; the OpenAPI error schema."""

from __future__ import annotations

import json
import logging
import re
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from k2serve.engine.async_engine import EngineOverloaded, ShareExceeded
from k2serve.errors import APIError, bad_request, overloaded, share_exceeded, too_deep

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# Every router declares these, so the OpenAPI schema says what an error looks like (and no
# longer lists FastAPI's 422, which this server never sends: its validation errors are 400).
ERROR_RESPONSES: dict = {
    "4XX": {"model": ErrorResponse, "description": "The request cannot be served as sent"},
    "5XX": {"model": ErrorResponse, "description": "Overloaded (503) or a server fault"},
}


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    type: Literal["error"]
    error: AnthropicErrorDetail


# Anthropic's API (/v1/messages) answers its errors in its own shape.
ANTHROPIC_ERROR_RESPONSES: dict = {
    "4XX": {"model": AnthropicErrorResponse, "description": "The request cannot be served as sent"},
    "5XX": {"model": AnthropicErrorResponse, "description": "Overloaded or a server fault"},
}


# Generation routes answer JSON, or server-sent events when the request sets `stream`.
STREAM_OR_JSON: dict = {200: {"description": "The reply, or its chunks as server-sent events",
                              "content": {"application/json": {}, "text/event-stream": {}}}}


def error_response(error: APIError, path: str = "") -> JSONResponse:
    """The error in the shape of the API the path belongs to: Anthropic's for /v1/messages,
    OpenAI's everywhere else."""
    body = anthropic_error_body(error) if is_anthropic_path(path) else error.body()
    return JSONResponse(body, status_code=error.status, headers=error.reply_headers())


def is_anthropic_path(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


# Anthropic's error types, by status (docs: "HTTP errors"); its SDKs pick their exception
# class from the status, and show the type and message.
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 500: "api_error", 503: "overloaded_error",
                    529: "overloaded_error"}


def anthropic_error_body(error: APIError) -> dict:
    kind = _ANTHROPIC_TYPES.get(error.status,
                                "invalid_request_error" if error.status < 500 else "api_error")
    message = error.message
    if error.param is not None and f"'{error.param}'" not in message:
        message = f"{error.param}: {message}"
    return {"type": "error", "error": {"type": kind, "message": message}}


# pydantic names the member of a union that failed in the error's location
# (`tool_choice.str`, `stop.list[str]`, `prompt.constrained-str`): not part of the field's name.
_UNION_MEMBER = re.compile(r"(str|bool|int|float|none|constrained-[a-z]+|[a-z][a-z0-9_-]*\[.*\])")


def _loc(err: dict) -> list[str]:
    loc = [p for p in err.get("loc", ()) if p != "body"]
    return [str(p) for i, p in enumerate(loc)
            if not (i and isinstance(p, str) and _UNION_MEMBER.fullmatch(p))]


def _describe_validation_error(err: dict, others: list[dict] = ()) -> tuple[str, str | None]:
    loc = _loc(err)
    param = ".".join(loc) or None
    kind = err.get("type", "")
    if kind == "json_invalid":
        return "Request body is not valid JSON: " + str(err.get("ctx", {}).get("error", "")), None
    # every member of a union failed: say what each wanted
    msgs = [err.get("msg", "invalid value")] + [o.get("msg", "") for o in others
                                                if _loc(o) == loc and o.get("msg")]
    msg = " or ".join(dict.fromkeys(msgs))
    if kind == "missing":
        return f"Missing required parameter: '{param}'.", param
    if kind == "extra_forbidden":
        return f"Unsupported parameter: '{param}' is not supported by this server.", param
    if param:
        return f"Invalid value for '{param}': {msg}.", param
    return f"Invalid request body: {msg}.", None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        message, param = (_describe_validation_error(errors[0], errors[1:]) if errors
                          else ("Invalid request.", None))
        return error_response(APIError(400, message, param=param, code="invalid_request"),
                              request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, RecursionError):  # FastAPI's json.loads gave up
            return error_response(too_deep(), request.url.path)
        message = {404: f"Unknown path: {request.method} {request.url.path}",
                   405: f"Method {request.method} not allowed on {request.url.path}"}.get(
                       exc.status_code, str(exc.detail))
        return error_response(APIError(exc.status_code, message), request.url.path)

    @app.exception_handler(EngineOverloaded)
    async def _overloaded(request: Request, exc: EngineOverloaded):
        if isinstance(exc, ShareExceeded):
            return error_response(share_exceeded(str(exc)), request.url.path)
        return error_response(overloaded(str(exc)), request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(APIError(500, "Internal server error.", type="server_error"),
                              request.url.path)


# -- reading a body a route parses itself ------------------------------------------
def validation_error(exc: ValidationError) -> APIError:
    """A pydantic validation failure as a 400 naming its first field."""
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err.get("loc", ())) or None
    if err.get("type") == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param)
    return bad_request(f"Invalid value for '{param}': {err.get('msg')}.", param=param)


async def json_body(request: Request) -> dict:
    """The request's JSON object; a 400 in the API's error shape otherwise."""
    try:
        body = json.loads(await request.body() or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"Request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise too_deep() from None
    if not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object.")
    return body
