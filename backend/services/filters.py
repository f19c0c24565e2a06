"""Narrowing the collection by date taken, camera, place and tag: one filter for listings, searches and the
timeline, turned into SQL conditions on the image table (the same on SQLite and PostgreSQL).

Dates compare with `taken_at` as the camera wrote it (its local time): a photo taken at 23:30 on New Year's
Eve in Sydney belongs to that evening, whatever the time in UTC was. `taken_after` is inclusive,
`taken_before` exclusive. A bounding box whose west edge lies east of its east edge crosses the
antimeridian (a box around Fiji).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeVar

from sqlalchemy import and_, func, or_
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import col, select

from backend.models import Image, ImageTag

T = TypeVar("T")
ImageSort = Literal["taken_at", "-taken_at", "created_at", "-created_at"]


@dataclass(frozen=True)
class BoundingBox:
    min_lon: float
    min_lat: float
    max_lon: float
    max_lat: float


@dataclass(frozen=True)
class ImageFilter:
    taken_after: datetime | None = None
    taken_before: datetime | None = None
    camera: str | None = None
    has_location: bool | None = None
    bbox: BoundingBox | None = None
    tag: str | None = None  # canonical vocabulary entry
    library: int | None = None

    @property
    def active(self) -> bool:
        return any(value is not None for value in vars(self).values())

    def conditions(self) -> list[ColumnElement[bool]]:
        """The WHERE conditions on `image` this filter stands for: at least that it is not in the trash."""
        taken_at = col(Image.taken_at)
        found: list[ColumnElement[bool]] = [in_collection()]
        if self.taken_after is not None:
            found.append(taken_at >= _local(self.taken_after))
        if self.taken_before is not None:
            found.append(taken_at < _local(self.taken_before))
        if self.camera is not None:
            pattern = f"%{_escape(self.camera.lower())}%"
            camera = func.lower(
                func.coalesce(col(Image.camera_make), "") + " " + func.coalesce(col(Image.camera_model), "")
            )
            found.append(camera.like(pattern, escape="\\"))
        if self.has_location is not None:
            located = col(Image.latitude).is_not(None)
            found.append(located if self.has_location else col(Image.latitude).is_(None))
        if self.bbox is not None:
            box = self.bbox
            latitude, longitude = col(Image.latitude), col(Image.longitude)
            found.append(latitude.between(box.min_lat, box.max_lat))
            if box.min_lon <= box.max_lon:
                found.append(longitude.between(box.min_lon, box.max_lon))
            else:
                found.append(or_(longitude >= box.min_lon, longitude <= box.max_lon))
        if self.library is not None:
            found.append(col(Image.library_id) == self.library)
        if self.tag is not None:
            found.append(col(Image.id).in_(select(ImageTag.image_id).where(ImageTag.tag == self.tag)))
        return found

    def where(self) -> ColumnElement[bool]:
        return and_(*self.conditions())


def in_collection() -> ColumnElement[bool]:
    """Not in the trash: what every listing, search, cluster, map and export holds to."""
    return col(Image.trashed_at).is_(None)


def image_order(sort: ImageSort) -> list[Any]:
    """ORDER BY for a sort key: newest or oldest first; images without a date taken come last either way."""
    descending = sort.startswith("-")
    column = col(Image.taken_at) if sort.endswith("taken_at") else col(Image.created_at)
    order: list[Any] = [col(Image.taken_at).is_(None)] if sort.endswith("taken_at") else []
    order += [column.desc(), col(Image.id).desc()] if descending else [column.asc(), col(Image.id).asc()]
    return order


def sort_images(items: list[tuple[Image, T]], sort: ImageSort) -> list[tuple[Image, T]]:
    """(image, anything) pairs in `sort` order, as `image_order` sorts rows (a search's top k by date)."""
    descending = sort.startswith("-")
    if sort.endswith("taken_at"):
        dated = [item for item in items if item[0].taken_at is not None]
        undated = [item for item in items if item[0].taken_at is None]
        dated.sort(key=lambda item: (item[0].taken_at, item[0].id or 0), reverse=descending)
        undated.sort(key=lambda item: item[0].id or 0, reverse=descending)
        return dated + undated
    return sorted(items, key=lambda item: (item[0].created_at, item[0].id or 0), reverse=descending)


def _local(moment: datetime) -> datetime:
    """A bound as camera wall-clock time: an aware one keeps its own wall clock, its offset is dropped."""
    return moment.replace(tzinfo=None)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
