from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from router.accounting.ledger import StoreUnavailable
from router.accounting.ledger_spool import RETRY_AFTER_S
from router.errors import InvalidRequest, NotFound, SpilloverError, Unavailable, to_response
from router.providers.anthropic import anthropic_error

log = logging.getLogger("spillover.api")


def internal_error(path: str, exc: Exception) -> Response:
    # The detail goes to the log; the caller gets the shape, never the traceback.
    log.error("unhandled %s on %s", type(exc).__name__, path, exc_info=exc)
    return to_response(SpilloverError("internal error in the gateway", status=500))


def install_error_handlers(app: FastAPI) -> None:
    async def spillover_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SpilloverError)
        return to_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            err: SpilloverError = NotFound(f"no route for {request.method} {request.url.path}")
        else:
            err = SpilloverError(str(exc.detail), status=exc.status_code)
            err.type = "invalid_request_error"
        if request.url.path.startswith("/v1/messages"):
            # Anthropic's SDK reads only its own error shape (a wrong method included).
            status, body = anthropic_error(err.status, err.message)
            return JSONResponse(body, status_code=status, headers=exc.headers)
        return to_response(err, exc.headers)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
        return to_response(InvalidRequest(f"{loc}: {first.get('msg', 'invalid')}",
                                          param=loc or None))

    async def store_unavailable(request: Request, exc: Exception) -> Response:
        # The database restarts or fails over: a retryable 503, not an internal error.
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return to_response(Unavailable(f"{exc}; try again shortly",
                                       code="store_unavailable",
                                       headers={"retry-after": str(RETRY_AFTER_S)}))

    async def unexpected(request: Request, exc: Exception) -> Response:
        return internal_error(request.url.path, exc)

    app.add_exception_handler(SpilloverError, spillover_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(StoreUnavailable, store_unavailable)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)
