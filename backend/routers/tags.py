from fastapi import APIRouter

from backend.deps import ContextDep
from backend.models import TagsPublic
from backend.services import catalog

router = APIRouter(prefix="/tags", tags=["images"])


@router.get("", response_model=TagsPublic, summary="The tag vocabulary, with how many images carry each tag")
async def list_tags(ctx: ContextDep) -> TagsPublic:
    """The zero-shot tags images can get (TAG_VOCABULARY), most used first; use one with `GET /images?tag=`."""
    return await catalog.list_tags(ctx)
