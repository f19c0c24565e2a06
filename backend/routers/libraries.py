from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from backend.deps import ContextDep
from backend.models import (
    VALIDATION_ERROR_RESPONSE,
    ErrorBody,
    JobPublic,
    LibrariesPublic,
    LibraryCreate,
    LibraryPublic,
    LibraryUpdate,
    Responses,
)
from backend.services import libraries
from backend.services.jobs import job_public

router = APIRouter(prefix="/libraries", tags=["libraries"], responses=VALIDATION_ERROR_RESPONSE)

LibraryId = Annotated[int, Path(ge=1, le=2**63 - 1, description="The library's id.")]
_NOT_FOUND: Responses = {404: {"model": ErrorBody, "description": "No library with this id"}}


@router.post(
    "",
    response_model=LibraryPublic,
    status_code=status.HTTP_201_CREATED,
    summary="Index a folder in place (its first scan is queued)",
    responses={
        400: {"model": ErrorBody, "description": "A body that is not JSON, a relative path, `..`, or not a folder"},
        403: {"model": ErrorBody, "description": "Outside IMPORT_ROOTS (or none set), or the service's storage"},
        404: {"model": ErrorBody, "description": "The folder does not exist"},
        409: {"model": ErrorBody, "description": "The folder, one inside or around it, or the name is a library"},
    },
)
async def create_library(ctx: ContextDep, body: LibraryCreate, response: Response) -> LibraryPublic:
    """Register a folder inside IMPORT_ROOTS as a library. Its files stay where they are, read-only: only
    thumbnails, vectors and metadata are stored. With `watch`, changes are followed while the service runs."""
    library = await libraries.create_library(ctx, body)
    response.headers["Location"] = f"/libraries/{library.id}"
    return library


@router.get("", response_model=LibrariesPublic, summary="The libraries, with their counts")
async def list_libraries(ctx: ContextDep) -> LibrariesPublic:
    return await libraries.list_libraries(ctx)


@router.get("/{library_id}", response_model=LibraryPublic, summary="One library", responses=_NOT_FOUND)
async def get_library(ctx: ContextDep, library_id: LibraryId) -> LibraryPublic:
    """Its folder, counts, last scan, and whether the folder can be reached (`online`)."""
    return await libraries.get_library(ctx, library_id)


@router.patch(
    "/{library_id}",
    response_model=LibraryPublic,
    summary="Rename a library, or start or stop watching it",
    responses={
        **_NOT_FOUND,
        400: {"model": ErrorBody, "description": "A body that is not JSON, or a name of only spaces"},
        409: {"model": ErrorBody, "description": "Another library has this name"},
    },
)
async def update_library(ctx: ContextDep, library_id: LibraryId, body: LibraryUpdate) -> LibraryPublic:
    return await libraries.update_library(ctx, library_id, body)


@router.delete(
    "/{library_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Forget a library (its files are not touched)",
    responses=_NOT_FOUND,
)
async def delete_library(ctx: ContextDep, library_id: LibraryId) -> Response:
    """Its images leave the catalog, with their thumbnails and vectors; the folder and its files stay as
    they are. An image whose bytes also lie elsewhere (another library, an upload) stays, found there."""
    await libraries.delete_library(ctx, library_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{library_id}/scan",
    response_model=JobPublic,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Scan a library's folder now (a job)",
    responses=_NOT_FOUND,
)
async def scan_library(ctx: ContextDep, library_id: LibraryId, response: Response) -> JobPublic:
    """New, changed, moved and deleted files are brought into the catalog; an unreachable folder takes the
    library offline without losing anything."""
    job = job_public(await libraries.start_scan(ctx, library_id))
    response.headers["Location"] = job.url
    return job
