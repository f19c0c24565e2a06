"""The web page: `test.html` from the repository root, served at `/`."""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

PAGE = Path(__file__).resolve().parents[2] / "test.html"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    # Revalidated on every visit, so a new version of the page is picked up at once.
    return FileResponse(PAGE, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})
