from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response, status
from fastapi.responses import FileResponse, JSONResponse

from backend.deps import ContextDep, SessionDep
from backend.errors import NotFoundError
from backend.models import (
    VALIDATION_ERROR_RESPONSE,
    ErrorBody,
    ImagePublic,
    ImagesPublic,
    ImageUploaded,
    ImportRequest,
    JobPublic,
    SearchResults,
    TagScore,
    UploadBatch,
    UploadError,
    UploadItem,
)
from backend.multipart import multipart_body, receive_uploads
from backend.services import catalog, search
from backend.services.captions import caption_one, start_caption_job
from backend.services.importer import start_import
from backend.services.ingest import IngestOutcome, ingest_files
from backend.services.jobs import to_public
from backend.services.tagging import load_tags

router = APIRouter(
    prefix="/images",
    tags=["images"],
    responses=VALIDATION_ERROR_RESPONSE,
)

MAX_ID = 2**63 - 1  # SQLite's INTEGER range
ImageId = Annotated[int, Path(ge=1, le=MAX_ID, description="The image's id.")]
_NOT_FOUND = {404: {"model": ErrorBody, "description": "No image with this id"}}
_UPLOAD_ERRORS = {
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
    request: Request, ctx: ContextDep, session: SessionDep, response: Response
) -> ImageUploaded | UploadBatch | JSONResponse:
    """Store, thumbnail and embed images. The same bytes again return the stored record with `duplicate: true`."""
    await ctx.models.get()  # 503 before the body is read when the model is unavailable (ingest asks again)
    async with receive_uploads(
        request,
        ctx,
        fields={"file", "files"},
        missing="send images as multipart/form-data in the field `file` or `files`",
    ) as received:
        outcomes = await ingest_files(
            ctx=ctx,
            session=session,
            files=received,
        )
    created = [o.image.id for o in outcomes if o.created and o.image is not None and o.image.id is not None]
    if ctx.settings.caption_on_upload and created:
        await start_caption_job(ctx, created)
    tags = await load_tags(session, [o.image.id for o in outcomes if o.image is not None and o.image.id is not None])
    if len(received) == 1 and received[0].form_field == "file":
        outcome = outcomes[0]
        if outcome.error is not None:
            raise outcome.error
        assert outcome.image is not None
        if outcome.duplicate:
            response.status_code = status.HTTP_200_OK
        return catalog.to_uploaded(outcome.image, duplicate=outcome.duplicate, tags=tags.get(outcome.image.id or 0))

    batch = _batch(outcomes, tags)
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


def _batch(outcomes: list[IngestOutcome], tags: dict[int, list[TagScore]]) -> UploadBatch:
    items: list[UploadItem] = []
    for outcome in outcomes:
        if outcome.error is not None:
            error = UploadError(status=outcome.error.status_code, code=outcome.error.code, detail=outcome.error.detail)
            items.append(UploadItem(filename=outcome.filename, status="failed", error=error))
        else:
            assert outcome.image is not None
            items.append(
                UploadItem(
                    filename=outcome.filename,
                    status="duplicate" if outcome.duplicate else "created",
                    image=catalog.to_uploaded(
                        outcome.image, duplicate=outcome.duplicate, tags=tags.get(outcome.image.id or 0)
                    ),
                )
            )
    return UploadBatch(
        created=sum(item.status == "created" for item in items),
        duplicates=sum(item.status == "duplicate" for item in items),
        failed=sum(item.status == "failed" for item in items),
        items=items,
    )


@router.get("", response_model=ImagesPublic, summary="List images, newest first")
async def list_images(
    ctx: ContextDep,
    session: SessionDep,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    tag: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=200,
            description="Only images with this zero-shot tag (any case; see /tags).",
        ),
    ] = None,
) -> ImagesPublic:
    """A page of image records, newest first, with the total count."""
    tag = None if tag is None else ctx.tags.canonical(tag)
    total, _ = await catalog.count_images(
        session=session, model_name=ctx.settings.clip_model_name, indexed=len(ctx.vectors.index)
    )
    return await catalog.list_images(session=session, offset=offset, limit=limit, total=total, tag=tag)


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
    job = to_public(await start_import(ctx, request.path, recursive=request.recursive))
    response.headers["Location"] = job.url
    return job


@router.get("/{image_id}", response_model=ImagePublic, summary="One image's metadata", responses=_NOT_FOUND)
async def get_image(session: SessionDep, image_id: ImageId) -> ImagePublic:
    """Metadata of one image, with its tags and caption."""
    image = await catalog.get_image(session=session, image_id=image_id)
    return (await catalog.publish(session, [image]))[0]


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
    session: SessionDep,
    image_id: ImageId,
    refresh: Annotated[bool, Query(description="Caption again even when a caption is stored.")] = False,
) -> ImagePublic:
    """Writes (or, without `refresh`, returns the stored) BLIP caption of one image; about 2 s on a CPU."""
    await catalog.get_image(session=session, image_id=image_id)  # 404 before loading BLIP
    await session.commit()
    await caption_one(ctx, image_id, refresh=refresh)
    image = await catalog.get_image(session=session, image_id=image_id)
    await session.refresh(image)
    return (await catalog.publish(session, [image]))[0]


@router.get(
    "/{image_id}/file",
    response_class=FileResponse,
    summary="The original file",
    responses={200: {"content": {"image/*": {}}}, **_NOT_FOUND},
)
async def get_file(ctx: ContextDep, session: SessionDep, image_id: ImageId) -> FileResponse:
    """The uploaded bytes, unchanged, with their content type."""
    image = await catalog.get_image(session=session, image_id=image_id)
    return _serve(ctx, image.storage_key, image.content_type, image.sha256, image.filename)


@router.get(
    "/{image_id}/thumbnail",
    response_class=FileResponse,
    summary="A JPEG thumbnail",
    responses={200: {"content": {"image/jpeg": {}}}, **_NOT_FOUND},
)
async def get_thumbnail(ctx: ContextDep, session: SessionDep, image_id: ImageId) -> FileResponse:
    """A JPEG no larger than THUMBNAIL_SIZE on its longer side, EXIF orientation applied."""
    image = await catalog.get_image(session=session, image_id=image_id)
    return _serve(ctx, image.thumbnail_key, "image/jpeg", f"{image.sha256}-thumb", None)


def _serve(ctx: ContextDep, key: str, media_type: str, etag: str, filename: str | None) -> FileResponse:
    path = ctx.store.path(key)
    if not path.is_file():
        raise NotFoundError("the stored file is missing", code="file_missing")
    return FileResponse(
        path,
        media_type=media_type,
        filename=filename,
        content_disposition_type="inline",
        headers={"ETag": f'"{etag}"', "Cache-Control": "private, max-age=31536000, immutable"},
    )


@router.delete(
    "/{image_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete an image",
    responses=_NOT_FOUND,
)
async def delete_image(ctx: ContextDep, session: SessionDep, image_id: ImageId) -> Response:
    """Removes the record, its vector from the index, and its files."""
    await catalog.delete_image(ctx=ctx, session=session, image_id=image_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{image_id}/similar",
    response_model=SearchResults,
    summary="Images that look like a stored one",
    responses={**_NOT_FOUND, 409: {"model": ErrorBody, "description": "Embedded by another model"}},
)
async def similar_images(
    ctx: ContextDep,
    session: SessionDep,
    image_id: ImageId,
    top_k: Annotated[int, Query(ge=1, le=200)] = 10,
) -> SearchResults:
    """Image -> image search from a stored image; the image itself is not in the results."""
    return await search.search_similar(ctx=ctx, session=session, image_id=image_id, top_k=top_k)
