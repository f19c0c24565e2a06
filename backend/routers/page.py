"""The web page: `test.html` (at the repository's root; installed under share/ai-image-organizer), served at `/`,
and the coastline its map of places draws."""

import sys
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "test.html",  # a checkout, or an editable install
    Path(sys.prefix) / "share" / "ai-image-organizer" / "test.html",  # pip install .
)
PAGE = next((path for path in _CANDIDATES if path.is_file()), _CANDIDATES[0])

# The world map's coastline (Natural Earth 1:110m land, public domain, through world-atlas 2.0.2, ISC):
# bundled, so the map of places works with no tile server and no internet.
COASTLINE = Path(__file__).resolve().parents[1] / "static" / "coastline-110m.json"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    # Revalidated on every visit, so a new version of the page is picked up at once.
    return FileResponse(PAGE, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})


@router.get("/coastline.json")
async def coastline() -> FileResponse:
    return FileResponse(COASTLINE, media_type="application/json", headers={"Cache-Control": "public, max-age=86400"})
