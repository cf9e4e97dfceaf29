"""Errors in the OpenAI format, and the handlers that guarantee no bad input ever becomes a 500.

Every error body is ``{"error": {"message", "type", "param", "code"}}`` as the OpenAI API sends it, so the
official clients raise their usual typed exceptions (``BadRequestError``, ``AuthenticationError``, ...).
Invalid parameters name the field in ``param`` and in the message. Unexpected exceptions are logged with
their traceback on the server and answered with a generic message: a stack trace never leaves the process.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("onspec.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
          413: "invalid_request_error", 415: "invalid_request_error", 503: "overloaded_error"}


class APIError(Exception):
    """An error answered to the client as is (status, message, the offending field, a code)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    etype = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}


def bad_request(exc: ValueError, default_param: str | None = None) -> APIError:
    """A ``ValueError`` whose message starts with ``field:`` (the engine's convention) -> 400 naming it."""
    msg = str(exc) or exc.__class__.__name__
    param = getattr(exc, "field", None)
    head, sep, _ = msg.partition(":")
    if param is None and sep and head and " " not in head.strip():
        param = head.strip()
    code = "context_length_exceeded" if exc.__class__.__name__ == "PromptTooLongError" else None
    return APIError(400, msg, param or default_param, code)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """Pydantic's list of errors -> one readable sentence and the top-level field it concerns."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    kind = err.get("type", "")
    if kind == "json_invalid":
        return "request body is not valid JSON", None
    if kind in ("model_attributes_type", "dict_type", "model_type") and not loc:
        return "request body must be a JSON object", None
    if kind == "missing" and loc:
        return f"missing required parameter: '{loc[0]}'", loc[0]
    if not loc:
        return f"invalid request body: {err.get('msg', 'invalid')}", None
    # Keep list indices and field names, drop pydantic's union-branch tags like 'list[int]' or 'str'.
    tags = {"str", "int", "float", "bool", "list", "dict", "none", "null"}
    path = [p for p in loc if p.isdigit() or (p.isidentifier() and p.lower() not in tags)]
    where = ".".join(path) or loc[0]
    return f"invalid value for '{where}': {err.get('msg', 'invalid')}", loc[0]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return JSONResponse(error_body(400, message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404:
            message = f"unknown route: {request.method} {request.url.path}"
        elif status == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return JSONResponse(error_body(status, message), status_code=status, headers=getattr(exc, "headers", None))

    @app.exception_handler(ValueError)
    async def _value(_request: Request, exc: ValueError) -> JSONResponse:
        return bad_request(exc).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, "internal server error (details are in the server log)"),
                            status_code=500)
