"""Domain errors and the handlers that turn every error into `{"detail": ..., "code": ...}`."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect


class AppError(Exception):
    """An error the client can act on: an HTTP status, a stable code and a sentence."""

    status_code = 400
    code = "bad_request"

    def __init__(self, detail: str, *, code: str | None = None, status_code: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code


class NotFoundError(AppError):
    status_code = 404
    code = "not_found"


class InvalidImageError(AppError):
    status_code = 400
    code = "invalid_image"


class EmptyFileError(AppError):
    status_code = 400
    code = "empty_file"


class UnsupportedFormatError(AppError):
    status_code = 415
    code = "unsupported_format"


class FileTooLargeError(AppError):
    status_code = 413
    code = "file_too_large"


class ImageTooLargeError(AppError):
    status_code = 422
    code = "image_too_large"


class TooManyFilesError(AppError):
    status_code = 400
    code = "too_many_files"


class ModelUnavailableError(AppError):
    status_code = 503
    code = "model_unavailable"


class RequestTooLargeError(StarletteHTTPException):
    """Raised from inside body reading; an HTTPException so FastAPI passes it through untouched."""

    code = "request_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
}


def error_response(status_code: int, detail: str, code: str, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status_code, content={"detail": detail, "code": code, **extra})


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        kind = err.get("type", "")
        if kind == "json_invalid":
            parts.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})")
            continue
        if loc == ("body",) and kind in ("model_attributes_type", "dict_type", "missing"):
            parts.append("send a JSON object as the body, with Content-Type: application/json")
            continue
        location = ".".join(str(p) for p in loc[1:] if not isinstance(p, int) or loc[0] != "body") or str(loc[0])
        parts.append(f"{location}: {str(err.get('msg')).removeprefix('Value error, ')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(_: Request, exc: AppError) -> JSONResponse:
        return error_response(exc.status_code, exc.detail, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _describe_validation(exc), "validation_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or _HTTP_CODES.get(exc.status_code)
        response = error_response(exc.status_code, str(exc.detail), code)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(ClientDisconnect)
    async def _gone(_: Request, exc: ClientDisconnect) -> JSONResponse:
        # Nobody reads this answer; handling it keeps a dropped connection out of the error log.
        return error_response(
            400, "the client disconnected before the request body was complete", "client_disconnected"
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # The server logs the traceback itself (Starlette re-raises after this answer).
        return error_response(500, "internal server error", "internal_error")
