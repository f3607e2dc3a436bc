"""Every error the server answers with has one JSON shape: {"error": {"kind": ..., "message": ...}}.

`kind` is a stable machine-readable name (also the label of the errors metric); `message` is one
line for people. Framework errors (unknown route, bad multipart framing, crashes) are mapped to
the same shape, so clients only ever parse one format.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

CLIENT_CLOSED = 499  # nginx's status for "the client went away before the answer"


class APIError(Exception):
    """An expected failure of one request; the server answers it and carries on."""

    def __init__(self, status: int, kind: str, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message
        self.headers = dict(headers or {})  # e.g. Connection: close when the body was left unread


class ErrorDetail(BaseModel):
    kind: str  # e.g. invalid_image, too_many_pixels, too_large, invalid_options, host_not_allowed
    message: str  # one line naming the input and the reason


class ErrorBody(BaseModel):
    error: ErrorDetail


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_disconnect)
    app.add_exception_handler(Exception, _internal_error)


def error_response(request: Request, status: int, kind: str, message: str) -> JSONResponse:
    request.app.state.metrics.errors.labels(kind).inc()
    return JSONResponse({"error": {"kind": kind, "message": message}}, status_code=status)


async def _api_error(request: Request, error: APIError) -> JSONResponse:
    response = error_response(request, error.status, error.kind, error.message)
    response.headers.update(error.headers)
    return response


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own errors (404, 405, malformed multipart) under a kind named after the status."""
    kind = HTTPStatus(error.status_code).phrase.lower().replace(" ", "_")
    response = error_response(request, error.status_code, kind, str(error.detail))
    response.headers.update(error.headers or {})  # e.g. Allow on 405
    return response


async def _client_disconnect(request: Request, error: ClientDisconnect) -> JSONResponse:
    return error_response(request, CLIENT_CLOSED, "client_closed", "the client closed the connection")


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    """A bug or a model failure. Starlette re-raises it afterwards, so uvicorn logs the traceback;
    the client learns nothing about internals."""
    return error_response(request, 500, "internal", "internal server error; see the server log")
