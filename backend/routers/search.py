from functools import partial
from typing import Annotated

from fastapi import APIRouter, Query, Request

from backend.deps import ContextDep
from backend.errors import InvalidParameter
from backend.models import VALIDATION_ERROR_RESPONSE, ErrorBody, Responses, SearchResults
from backend.multipart import multipart_body, receive_uploads
from backend.routers.params import NarrowingDep
from backend.services import search as search_service

router = APIRouter(tags=["search"], responses=VALIDATION_ERROR_RESPONSE)

MAX_TOP_K = 200
TopK = Annotated[int, Query(ge=1, le=MAX_TOP_K, description="How many results, best first.")]
_ERRORS: Responses = {
    503: {"model": ErrorBody, "description": "The CLIP model is not available"},
}


@router.get("/search", response_model=SearchResults, summary="Find images by a sentence", responses=_ERRORS)
async def search_text(
    ctx: ContextDep,
    q: Annotated[str, Query(min_length=1, max_length=1000, description="What to look for.")],
    narrowing: NarrowingDep,
    top_k: TopK = 10,
) -> SearchResults:
    """Text -> image search: the query's CLIP text vector against every image vector, by cosine. The
    filters choose the candidates before the top_k are taken."""
    if not q.strip():
        raise InvalidParameter("q must contain something other than spaces")
    return await search_service.search_text(ctx, q.strip(), top_k=top_k, narrowing=narrowing)


@router.post(
    "/search/image",
    response_model=SearchResults,
    summary="Find images that look like an uploaded one",
    responses={**_ERRORS, 400: {"model": ErrorBody}, 413: {"model": ErrorBody}, 415: {"model": ErrorBody}},
    openapi_extra=multipart_body(file=(False, "The query image; it is not stored.")),
)
async def search_image(request: Request, ctx: ContextDep, narrowing: NarrowingDep, top_k: TopK = 10) -> SearchResults:
    """Image -> image search with a query image that is embedded and then discarded."""
    receive = partial(
        receive_uploads,
        request,
        ctx,
        fields={"file"},
        max_files=1,
        missing="send the query image as multipart/form-data in the field `file`",
    )
    return await search_service.search_by_upload(ctx, receive, top_k=top_k, narrowing=narrowing)
