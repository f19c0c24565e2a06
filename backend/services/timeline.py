"""The collection by date taken: years, months or days with their counts and newest thumbnails.

Buckets are cut from `taken_at` as text (`2024-05-17 09:30:05` on both engines), so a photo belongs to the
day its camera's clock showed.
"""

from __future__ import annotations

from typing import Literal

from sqlalchemy import String, cast, func
from sqlmodel import col, select

from backend.context import AppContext
from backend.models import Image, TimelineBucket, TimelineImage, TimelinePublic
from backend.services.catalog import canonical_filter
from backend.services.filters import ImageFilter

Granularity = Literal["year", "month", "day"]
_KEY_LENGTH = {"year": 4, "month": 7, "day": 10}


async def timeline(
    ctx: AppContext,
    *,
    granularity: Granularity,
    image_filter: ImageFilter,
    offset: int,
    limit: int,
    per_bucket: int,
) -> TimelinePublic:
    """A page of buckets, newest first, each with its count and its `per_bucket` newest images."""
    conditions = canonical_filter(ctx, image_filter).conditions()
    key = func.substr(cast(col(Image.taken_at), String), 1, _KEY_LENGTH[granularity]).label("key")
    dated = [*conditions, col(Image.taken_at).is_not(None)]
    async with ctx.sessions() as session:
        total = (await session.exec(select(func.count(func.distinct(key))).where(*dated))).one()
        undated = (
            await session.exec(
                select(func.count()).select_from(Image).where(*conditions, col(Image.taken_at).is_(None))
            )
        ).one()
        rows = (
            await session.exec(
                select(key, func.count()).where(*dated).group_by(key).order_by(key.desc()).offset(offset).limit(limit)
            )
        ).all()
        keys = [str(row[0]) for row in rows]
        newest: dict[str, list[TimelineImage]] = {k: [] for k in keys}
        if keys and per_bucket:
            rank = (
                func.row_number()
                .over(partition_by=key, order_by=(col(Image.taken_at).desc(), col(Image.id).desc()))
                .label("rank")
            )
            ranked = select(col(Image.id), col(Image.taken_at), key, rank).where(*dated, key.in_(keys)).subquery()
            picked = await session.exec(
                select(ranked.c.id, ranked.c.taken_at, ranked.c.key)
                .where(ranked.c.rank <= per_bucket)
                .order_by(ranked.c.key.desc(), ranked.c.rank)
            )
            for image_id, taken_at, bucket in picked.all():
                newest[str(bucket)].append(
                    TimelineImage(id=image_id, taken_at=taken_at, thumbnail_url=f"/images/{image_id}/thumbnail")
                )
    buckets = [
        TimelineBucket(key=k, count=int(count), images=newest[k])
        for k, count in zip(keys, (r[1] for r in rows), strict=True)
    ]
    return TimelinePublic(
        granularity=granularity, buckets=buckets, count=int(total), offset=offset, limit=limit, undated=int(undated)
    )
