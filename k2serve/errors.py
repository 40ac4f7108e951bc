"""The error every layer raises, in the shape every OpenAI/Together SDK parses:
{"error": {message, type, param, code}}. The HTTP layer (k2serve.api.errors) turns it into
a reply; engines, model families and the platform raise it without knowing about HTTP."""

from __future__ import annotations

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

OVERLOAD_RETRY_AFTER_S = 1


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

    def reply_headers(self) -> dict[str, str]:
        """The reply's headers: a deterministic failure tells Stainless SDKs not to retry."""
        headers = dict(self.headers)
        if self.status < 500 and self.status not in (408, 409, 429):
            headers.setdefault("x-should-retry", "false")
        return headers


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


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


def too_deep() -> APIError:
    """400 for a JSON body nested deeper than the parser's recursion limit (about 1,000)."""
    return APIError(400, "Request body is not valid JSON: it is nested too deeply.",
                    code="invalid_json")
