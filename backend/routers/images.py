from functools import partial
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response, status
from fastapi.responses import FileResponse, JSONResponse
from starlette.background import BackgroundTask

from backend.deps import ContextDep
from backend.errors import domain_error_response, http_status
from backend.models import (
    VALIDATION_ERROR_RESPONSE,
    ErrorBody,
    ImageEmbedding,
    ImagePublic,
    ImagesPublic,
    ImageUploaded,
    ImportRequest,
    JobPublic,
    Responses,
    SearchResults,
    UploadBatch,
    UploadError,
    UploadItem,
)
from backend.multipart import multipart_body, receive_uploads
from backend.routers.params import FilterDep, NarrowingDep
from backend.services import captions, catalog, importer, metadata, search, trash, uploads
from backend.services.catalog import StoredFile
from backend.services.filters import ImageSort
from backend.services.jobs import job_public

router = APIRouter(
    prefix="/images",
    tags=["images"],
    responses=VALIDATION_ERROR_RESPONSE,
)

MAX_ID = 2**63 - 1  # SQLite's INTEGER range
ImageId = Annotated[int, Path(ge=1, le=MAX_ID, description="The image's id.")]
_NOT_FOUND: Responses = {404: {"model": ErrorBody, "description": "No image with this id"}}
_UPLOAD_ERRORS: Responses = {
    200: {"model": ImageUploaded | UploadBatch, "description": "Only duplicates: nothing new was stored"},
    400: {"model": ErrorBody, "description": "Not an image, empty, corrupt, or too many files"},
    413: {"model": ErrorBody, "description": "A file or the request is larger than the limits"},
    415: {"model": ErrorBody, "description": "An image format outside the allow-list"},
    422: {"model": ErrorBody, "description": "No file sent, or an image with too many pixels"},
    503: {"model": ErrorBody, "description": "The CLIP model is not available"},
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ImageUploaded | UploadBatch,
    summary="Upload one image (`file`) or many (`files`)",
    responses=_UPLOAD_ERRORS,
    openapi_extra=multipart_body(
        file=(False, "One image; the answer is its record."),
        files=(True, "Many images; the answer is per file."),
    ),
)
async def upload_images(
    request: Request, ctx: ContextDep, response: Response
) -> ImageUploaded | UploadBatch | JSONResponse:
    """Store, thumbnail and embed images. The same bytes again return the stored record with `duplicate: true`."""
    result = await uploads.upload_images(
        ctx,
        partial(
            receive_uploads,
            request,
            ctx,
            fields={"file", "files"},
            missing="send images as multipart/form-data in the field `file` or `files`",
        ),
    )
    outcomes = result.outcomes
    if len(outcomes) == 1 and outcomes[0].form_field == "file":  # one image: the answer is its record
        item = _item(outcomes[0], result)
        if item.image is None:
            assert outcomes[0].error is not None
            return domain_error_response(outcomes[0].error)
        response.status_code = status.HTTP_200_OK if item.image.duplicate else status.HTTP_201_CREATED
        return item.image
    batch = _batch(outcomes, result)
    if batch.failed == len(outcomes):
        statuses = {item.error.status for item in batch.items if item.error}
        return JSONResponse(
            status_code=statuses.pop() if len(statuses) == 1 else 400,
            content={
                "detail": "no file in the request was accepted",
                "code": "no_image_accepted",
                **batch.model_dump(mode="json"),
            },
        )
    if batch.created == 0:
        response.status_code = status.HTTP_200_OK
    return batch


def _item(outcome: uploads.UploadOutcome, result: uploads.UploadResult) -> UploadItem:
    if outcome.error is not None:
        error = UploadError(status=http_status(outcome.error), code=outcome.error.code, detail=outcome.error.detail)
        return UploadItem(filename=outcome.filename, status="failed", error=error)
    assert outcome.image is not None
    return UploadItem(
        filename=outcome.filename,
        status="duplicate" if outcome.duplicate else "created",
        image=catalog.image_uploaded(
            outcome.image, duplicate=outcome.duplicate, tags=result.tags.get(outcome.image.id or 0)
        ),
    )


def _batch(outcomes: list[uploads.UploadOutcome], result: uploads.UploadResult) -> UploadBatch:
    items = [_item(outcome, result) for outcome in outcomes]
    return UploadBatch(
        created=sum(item.status == "created" for item in items),
        duplicates=sum(item.status == "duplicate" for item in items),
        failed=sum(item.status == "failed" for item in items),
        items=items,
    )


@router.get("", response_model=ImagesPublic, summary="List images, newest first, filtered")
async def list_images(
    ctx: ContextDep,
    image_filter: FilterDep,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    sort: Annotated[
        ImageSort,
        Query(description="By date taken or date stored, `-` for newest first; images without a date taken last."),
    ] = "-created_at",
) -> ImagesPublic:
    """A page of image records with the count of all that the filters keep."""
    return await catalog.list_images(ctx, offset=offset, limit=limit, image_filter=image_filter, sort=sort)


@router.post(
    "/metadata",
    response_model=JobPublic,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Read date, place and camera from the originals' EXIF again (a job)",
)
async def read_metadata(
    ctx: ContextDep,
    response: Response,
    all_images: Annotated[
        bool, Query(alias="all", description="Read every image again, not only those without any metadata.")
    ] = False,
) -> JobPublic:
    """Images stored before the service read EXIF time, place and camera get them from their originals."""
    job = job_public(await metadata.start_metadata(ctx, missing_only=not all_images))
    response.headers["Location"] = job.url
    return job


@router.post(
    "/import",
    response_model=JobPublic,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Import a folder on the server (a job)",
    responses={
        400: {"model": ErrorBody, "description": "A relative path, `..`, or not a folder"},
        403: {"model": ErrorBody, "description": "Import disabled, or the path is outside IMPORT_ROOTS or is storage"},
        404: {"model": ErrorBody, "description": "The folder does not exist"},
        503: {"model": ErrorBody, "description": "The CLIP model is not available"},
    },
)
async def import_folder(ctx: ContextDep, request: ImportRequest, response: Response) -> JobPublic:
    """Walks the folder (recursively by default) and ingests every image file like an upload. The path
    must resolve, symlinks followed, inside one of IMPORT_ROOTS. Unreadable or invalid files are counted
    and listed in the job's result; they do not stop the import."""
    job = job_public(await importer.start_import(ctx, request.path, recursive=request.recursive))
    response.headers["Location"] = job.url
    return job


@router.get("/{image_id}", response_model=ImagePublic, summary="One image's metadata", responses=_NOT_FOUND)
async def get_image(ctx: ContextDep, image_id: ImageId) -> ImagePublic:
    """Metadata of one image, with its tags and caption."""
    return await catalog.get_image(ctx, image_id)


@router.get(
    "/{image_id}/embedding",
    response_model=ImageEmbedding,
    summary="One image's CLIP vector",
    responses={**_NOT_FOUND, 409: {"model": ErrorBody, "description": "The stored vector is damaged"}},
)
async def get_embedding(ctx: ContextDep, image_id: ImageId) -> ImageEmbedding:
    """The stored vector (a list of floats, L2-normalised), the model that made it, whether it is the current
    one, and its precision and runtime, for exporting embeddings."""
    return await catalog.image_embedding(ctx, image_id)


@router.post(
    "/{image_id}/caption",
    response_model=ImagePublic,
    summary="Caption an image with BLIP",
    responses={
        **_NOT_FOUND,
        409: {"model": ErrorBody, "description": "The original file is missing or cannot be decoded"},
        503: {"model": ErrorBody, "description": "The BLIP model is not available"},
    },
)
async def caption_image(
    ctx: ContextDep,
    image_id: ImageId,
    refresh: Annotated[bool, Query(description="Caption again even when a caption is stored.")] = False,
) -> ImagePublic:
    """Writes (or, without `refresh`, returns the stored) BLIP caption of one image; about 2 s on a CPU."""
    return await captions.caption_image(ctx, image_id, refresh=refresh)


@router.get(
    "/{image_id}/file",
    response_class=FileResponse,
    summary="The original file",
    responses={200: {"content": {"image/*": {}}}, **_NOT_FOUND},
)
async def get_file(ctx: ContextDep, image_id: ImageId) -> FileResponse:
    """The uploaded bytes, unchanged, with their content type."""
    return _serve(await catalog.stored_file(ctx, image_id, "original"))


@router.get(
    "/{image_id}/thumbnail",
    response_class=FileResponse,
    summary="A JPEG thumbnail",
    responses={200: {"content": {"image/jpeg": {}}}, **_NOT_FOUND},
)
async def get_thumbnail(ctx: ContextDep, image_id: ImageId) -> FileResponse:
    """A JPEG no larger than THUMBNAIL_SIZE on its longer side, EXIF orientation applied."""
    return _serve(await catalog.stored_file(ctx, image_id, "thumbnail"))


def _serve(found: StoredFile) -> FileResponse:
    return FileResponse(
        found.path,
        background=BackgroundTask(found.opened.close) if found.opened is not None else None,
        media_type=found.media_type,
        filename=found.filename,
        content_disposition_type="inline",
        # A stored file never changes; a library's original may, in its folder: revalidated every time.
        headers={
            "ETag": f'"{found.etag}"',
            "Cache-Control": "private, no-cache"
            if found.opened is not None
            else "private, max-age=31536000, immutable",
        },
    )


@router.delete(
    "/{image_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Move an image to the trash (or delete it at once)",
    responses=_NOT_FOUND,
)
async def delete_image(
    ctx: ContextDep,
    image_id: ImageId,
    purge: Annotated[bool, Query(description="Delete at once, not into the trash: no undo.")] = False,
) -> Response:
    """Moves the image to the trash: out of listings, searches, clusters, maps and exports, with its files
    and vector kept for TRASH_DAYS (`POST /trash/{id}/restore` undoes it). `purge=true` removes the
    record, its vector and the files the service stored at once. A library's original file is never
    deleted: only the record goes, and scans of that library leave the file out from then on."""
    if purge:
        await trash.purge_image(ctx, image_id)
    else:
        await trash.trash_image(ctx, image_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{image_id}/similar",
    response_model=SearchResults,
    summary="Images that look like a stored one",
    responses={**_NOT_FOUND, 409: {"model": ErrorBody, "description": "Embedded by another model"}},
)
async def similar_images(
    ctx: ContextDep,
    image_id: ImageId,
    narrowing: NarrowingDep,
    top_k: Annotated[int, Query(ge=1, le=200)] = 10,
) -> SearchResults:
    """Image -> image search from a stored image; the image itself is not in the results. The filters
    choose the candidates before the top_k are taken."""
    return await search.search_similar(ctx, image_id, top_k=top_k, narrowing=narrowing)
