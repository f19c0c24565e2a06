"""Domain errors, and the one place that turns them (and every other error) into `{"detail", "code"}` answers.

Services raise the named errors below; they know nothing of HTTP. Each error belongs to a kind (a base
class: `InvalidInput`, `NotFound`, `Conflict`, ...) and `HTTP_STATUS` maps kinds to status codes, here and
nowhere else. `code` is stable for clients; `detail` is a sentence for people.
"""

from __future__ import annotations

from typing import Any, Self

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect


class DomainError(Exception):
    """Something the caller can act on: a stable code and a sentence."""

    code = "bad_request"

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code

    def about(self, subject: str) -> Self:
        """The same error, its sentence prefixed with what it is about (a filename, say)."""
        return type(self)(f"{subject}: {self.detail}", code=self.code)


# The kinds. Every error below is one of them; HTTP_STATUS gives each kind its status code.
class InvalidInput(DomainError):
    """The request (a body, a file, a path) cannot be used as it is."""


class InvalidParameter(DomainError):
    """A parameter has a value outside what the operation accepts."""

    code = "validation_error"


class Unauthorized(DomainError):
    code = "unauthorized"


class Forbidden(DomainError):
    code = "forbidden"


class NotFound(DomainError):
    code = "not_found"


class Conflict(DomainError):
    """The request is fine, but the state of the collection does not allow it now."""

    code = "conflict"


class TooLarge(DomainError):
    code = "file_too_large"


class UnsupportedFormat(DomainError):
    code = "unsupported_format"


class Unprocessable(DomainError):
    """A well-formed input the service will not process (an image with too many pixels, say)."""

    code = "unprocessable"


class Busy(DomainError):
    """The operation is fine, but too much of its kind is waiting already: try again later."""

    code = "busy"


class Unavailable(DomainError):
    """Something the operation needs (a model, the service itself) is not available right now."""

    code = "unavailable"


class StorageFailure(DomainError):
    """The service could not write what it was given (disk full, I/O error): not the caller's fault."""

    code = "storage_error"


# Images and files.
class InvalidImageError(InvalidInput):
    code = "invalid_image"


class EmptyFileError(InvalidInput):
    code = "empty_file"


class UnsupportedFormatError(UnsupportedFormat):
    code = "unsupported_format"


class FileTooLargeError(TooLarge):
    code = "file_too_large"


class ImageTooLargeError(Unprocessable):
    code = "image_too_large"


class ImageTooComplexError(Unprocessable):
    """An image whose decoding would take far more work than its size suggests (a scan bomb)."""

    code = "image_too_complex"


class TooManyFilesError(InvalidInput):
    code = "too_many_files"


class MalformedMultipart(InvalidInput):
    code = "malformed_multipart"


class NoFileSent(InvalidParameter):
    code = "no_file"


class ChangedFile(InvalidInput):
    """A listed file that is not the same regular file when it is opened (replaced by a link, a FIFO...)."""

    code = "file_changed"


class UnreadableFile(InvalidInput):
    """A file of a folder being imported could not be read."""

    code = "unreadable"


# Records.
class ImageNotFound(NotFound):
    code = "image_not_found"


class StoredFileMissing(NotFound):
    code = "file_missing"


class RunNotFound(NotFound):
    code = "run_not_found"


class ClusterNotFound(NotFound):
    code = "cluster_not_found"


class JobNotFound(NotFound):
    code = "job_not_found"


class JobFinished(Conflict):
    code = "job_finished"


class StaleEmbedding(Conflict):
    """An image whose vector another CLIP model made than the current one."""

    code = "stale_embedding"


class DamagedVector(Conflict):
    """A stored vector that cannot be read (a damaged database row)."""

    code = "damaged_vector"


class DeletedMeanwhile(Conflict):
    code = "deleted_meanwhile"


class OriginalUnreadable(Conflict):
    code = "original_unreadable"


class ClusteringFailed(Conflict):
    code = "clustering_failed"


class InvalidClustering(InvalidInput):
    code = "invalid_clustering"


class NothingToDo(InvalidParameter):
    code = "nothing_to_do"


# Duplicates and the trash.
class NotInTrash(Conflict):
    code = "not_in_trash"


class InTrash(Conflict):
    """The image is in the trash: restore it first."""

    code = "in_trash"


class GroupNotFound(NotFound):
    """No duplicates group has this id now (resolved, or changed by a scan)."""

    code = "group_not_found"


class InvalidResolve(InvalidInput):
    code = "invalid_resolve"


class GroupChanged(Conflict):
    """A member to keep left the collection (another resolve trashed it) since the group was read."""

    code = "group_changed"


# Folder import paths: refused (403), malformed (400) or not there (404).
class ImportPathRefused(Forbidden):
    code = "import_path_refused"


class InvalidImportPath(InvalidInput):
    code = "invalid_path"


class ImportPathNotFound(NotFound):
    code = "path_not_found"


# The service's own state.
class LibraryNotFound(NotFound):
    code = "library_not_found"


class LibraryExists(Conflict):
    """The folder, or one inside or around it, or the name, is a library already."""

    code = "library_exists"


class LibraryOffline(Conflict):
    """The library's folder cannot be reached (an unmounted disk): its images have no original for now."""

    code = "library_offline"


class ModelUnavailableError(Unavailable):
    code = "model_unavailable"


class TooManyJobs(Busy):
    code = "too_many_jobs"


class ShuttingDown(Unavailable):
    code = "shutting_down"


HTTP_STATUS: dict[type[DomainError], int] = {
    InvalidInput: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    UnsupportedFormat: 415,
    InvalidParameter: 422,
    Unprocessable: 422,
    Busy: 429,
    StorageFailure: 500,
    Unavailable: 503,
}


def http_status(error: DomainError) -> int:
    """The status code of an error's kind (400 for a bare DomainError)."""
    for kind in type(error).__mro__:
        if kind in HTTP_STATUS:
            return HTTP_STATUS[kind]
    return 400


class RequestTooLargeError(StarletteHTTPException):
    """Raised from inside body reading; an HTTPException so FastAPI passes it through untouched."""

    code = "request_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")


class RequestTimeoutError(StarletteHTTPException):
    """The body stopped arriving, or arrives too slowly; raised from inside body reading, like the above."""

    code = "request_timeout"

    def __init__(self, detail: str) -> None:
        super().__init__(408, detail, headers={"Connection": "close"})


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


def domain_error_response(error: DomainError, **extra: Any) -> JSONResponse:
    return error_response(http_status(error), error.detail, error.code, **extra)


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
    @app.exception_handler(DomainError)
    async def _domain_error(_: Request, exc: DomainError) -> JSONResponse:
        return domain_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _describe_validation(exc), "validation_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or _HTTP_CODES.get(exc.status_code) or "error"
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
