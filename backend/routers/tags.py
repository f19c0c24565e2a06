from fastapi import APIRouter

from backend.deps import ContextDep, SessionDep
from backend.models import TagsPublic
from backend.services.tagging import tag_counts

router = APIRouter(prefix="/tags", tags=["images"])


@router.get("", response_model=TagsPublic, summary="The tag vocabulary, with how many images carry each tag")
async def list_tags(ctx: ContextDep, session: SessionDep) -> TagsPublic:
    """The zero-shot tags images can get (TAG_VOCABULARY), most used first; use one with `GET /images?tag=`."""
    return await tag_counts(session, ctx.tags.names)
