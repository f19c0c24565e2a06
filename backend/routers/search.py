from typing import Annotated

from fastapi import APIRouter, Query, Request

from backend.deps import ContextDep, SessionDep
from backend.errors import AppError
from backend.models import VALIDATION_ERROR_RESPONSE, ErrorBody, SearchResults
from backend.multipart import multipart_body, receive_uploads
from backend.services import search as search_service
from backend.services.ingest import embed_query_image

router = APIRouter(tags=["search"], responses=VALIDATION_ERROR_RESPONSE)

MAX_TOP_K = 200
TopK = Annotated[int, Query(ge=1, le=MAX_TOP_K, description="How many results, best first.")]
_ERRORS = {
    503: {"model": ErrorBody, "description": "The CLIP model is not available"},
}


@router.get("/search", response_model=SearchResults, summary="Find images by a sentence", responses=_ERRORS)
async def search_text(
    ctx: ContextDep,
    session: SessionDep,
    q: Annotated[str, Query(min_length=1, max_length=1000, description="What to look for.")],
    top_k: TopK = 10,
) -> SearchResults:
    """Text -> image search: the query's CLIP text vector against every image vector, by cosine."""
    if not q.strip():
        raise AppError("q must contain something other than spaces", code="validation_error", status_code=422)
    return await search_service.search_text(ctx=ctx, session=session, query=q.strip(), top_k=top_k)


@router.post(
    "/search/image",
    response_model=SearchResults,
    summary="Find images that look like an uploaded one",
    responses={**_ERRORS, 400: {"model": ErrorBody}, 413: {"model": ErrorBody}, 415: {"model": ErrorBody}},
    openapi_extra=multipart_body(file=(False, "The query image; it is not stored.")),
)
async def search_image(request: Request, ctx: ContextDep, session: SessionDep, top_k: TopK = 10) -> SearchResults:
    """Image -> image search with a query image that is embedded and then discarded."""
    await ctx.models.get()  # 503 before the body is read when the model is unavailable
    async with receive_uploads(
        request,
        ctx,
        fields={"file"},
        max_files=1,
        missing="send the query image as multipart/form-data in the field `file`",
    ) as received:
        if received[0].error is not None:
            raise received[0].error
        assert received[0].staged is not None
        vector = await embed_query_image(ctx=ctx, staged=received[0].staged)
    return await search_service.search_by_vector(ctx=ctx, session=session, vector=vector, top_k=top_k)
