"""Query parameters several routes share: the image filter of listings, searches and the timeline."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated

from fastapi import Depends, Query

from backend.errors import InvalidParameter
from backend.services.filters import BoundingBox, ImageFilter, ImageSort
from backend.services.search import Narrowing


def _bbox(raw: str) -> BoundingBox:
    parts = raw.split(",")
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if len(values) != 4 or not all(math.isfinite(value) for value in values):
        raise InvalidParameter("bbox must be four numbers: min_lon,min_lat,max_lon,max_lat")
    min_lon, min_lat, max_lon, max_lat = values
    if not (-180 <= min_lon <= 180 and -180 <= max_lon <= 180):
        raise InvalidParameter("bbox longitudes must lie between -180 and 180")
    if not (-90 <= min_lat <= max_lat <= 90):
        raise InvalidParameter("bbox latitudes must lie between -90 and 90, the minimum first")
    return BoundingBox(min_lon, min_lat, max_lon, max_lat)


def image_filter(
    taken_after: Annotated[
        datetime | None,
        Query(description="Taken at or after this date or date-time (the camera's local time), as 2024-05-01."),
    ] = None,
    taken_before: Annotated[
        datetime | None,
        Query(description="Taken before this date or date-time (the camera's local time); exclusive."),
    ] = None,
    camera: Annotated[
        str | None,
        Query(min_length=1, max_length=100, description="Camera make or model contains this (any case)."),
    ] = None,
    has_location: Annotated[bool | None, Query(description="Only images with (true) or without (false) GPS.")] = None,
    bbox: Annotated[
        str | None,
        Query(
            max_length=200,
            description="Only images located in min_lon,min_lat,max_lon,max_lat (degrees; west > east crosses "
            "the antimeridian).",
            examples=["2.2,48.8,2.5,48.9"],
        ),
    ] = None,
    tag: Annotated[
        str | None,
        Query(min_length=1, max_length=200, description="Only images with this zero-shot tag (any case; see /tags)."),
    ] = None,
    library: Annotated[
        int | None, Query(ge=1, le=2**63 - 1, description="Only images whose original lies in this library.")
    ] = None,
) -> ImageFilter:
    if (
        taken_after is not None
        and taken_before is not None
        and taken_after.replace(tzinfo=None) >= taken_before.replace(tzinfo=None)
    ):
        raise InvalidParameter("taken_after must be earlier than taken_before")
    return ImageFilter(
        taken_after=taken_after,
        taken_before=taken_before,
        camera=camera.strip() or None if camera is not None else None,
        has_location=has_location,
        bbox=_bbox(bbox) if bbox is not None else None,
        tag=tag,
        library=library,
    )


FilterDep = Annotated[ImageFilter, Depends(image_filter)]


def narrowing(
    image_filter: FilterDep,
    min_score: Annotated[
        float | None, Query(ge=-1.0, le=1.0, description="Leave out matches with a lower cosine score.")
    ] = None,
    sort: Annotated[
        ImageSort | None,
        Query(description="Show the top_k best matches by date instead of by score (`-` for newest first)."),
    ] = None,
) -> Narrowing:
    return Narrowing(image_filter=image_filter, min_score=min_score, sort=sort)


NarrowingDep = Annotated[Narrowing, Depends(narrowing)]
