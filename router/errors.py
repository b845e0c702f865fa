"""One exception tree for everything the gateway can refuse or fail at.

    SpilloverError                      -> OpenAI error JSON {"error": {...}}
    ├── InvalidRequest        400       malformed JSON, missing / mistyped fields
    ├── Unauthorized          401
    ├── Forbidden             403       licence, alias not allowed
    ├── NotFound              404       unknown model or path
    ├── PayloadTooLarge       413
    ├── UnsupportedMediaType  415       a body that is not JSON
    ├── RateLimited           429       budgets, rate limits (Retry-After)
    ├── UpstreamError         502       every candidate failed before the first byte
    ├── Unavailable           503       nothing can serve it now (Retry-After)
    └── GatewayTimeout        504       the request's deadline passed

Errors are rendered in exactly one place: `to_response` for a response that has not
started, `sse_event` once a stream is under way (a status code can no longer change).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from starlette.responses import Response


class SpilloverError(Exception):
    status: int = 500
    type: str = "api_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(SpilloverError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(SpilloverError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(SpilloverError):
    status = 403
    type = "permission_error"


class NotFound(SpilloverError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class PayloadTooLarge(SpilloverError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class UnsupportedMediaType(SpilloverError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class RateLimited(SpilloverError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamError(SpilloverError):
    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"


class Unavailable(SpilloverError):
    status = 503
    type = "service_unavailable"
    code = "no_capacity"


class GatewayTimeout(SpilloverError):
    status = 504
    type = "timeout_error"
    code = "deadline_exceeded"


def to_response(err: SpilloverError, extra_headers: Mapping[str, str] | None = None) -> Response:
    headers = dict(err.headers)
    if extra_headers:
        headers.update(extra_headers)
    return Response(
        orjson.dumps(err.body()),
        status_code=err.status,
        media_type="application/json",
        headers=headers,
    )


def sse_event(err: SpilloverError) -> bytes:
    """The event that ends a stream which failed after its first byte.

    The openai client raises on a data payload carrying an "error" key, so callers see a
    real exception rather than a silently truncated answer.
    """
    return b"data: " + orjson.dumps(err.body()) + b"\n\n"


class Scrubber:
    """Removes secrets (the provider keys we send) from text an upstream wrote: a provider
    that echoes the Authorization header must not hand our key to a caller or a log."""

    __slots__ = ("_pattern",)

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so a key that contains another is removed whole; the Bearer form
        # goes with the key, "Bearer" itself is harmless.
        keys = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, keys))) if keys else None

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub("[redacted]", text)


def from_upstream(status: int, payload: bytes) -> SpilloverError:
    """An upstream's 4xx, reshaped as OpenAI's error (vLLM, Mistral and FastAPI differ)."""
    message = _upstream_message(payload) or f"upstream answered {status}"
    err = SpilloverError(message, status=status)
    err.type = "invalid_request_error" if status < 500 else "upstream_error"
    return err


def _upstream_message(payload: bytes) -> str | None:
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        text = payload[:500].decode("utf-8", "replace").strip()
        return text or None
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    if isinstance(data.get("message"), str):
        return str(data["message"])
    detail = data.get("detail")
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list) and detail:
        parts = []
        for item in detail[:5]:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
        return "; ".join(parts) or None
    return None
