"""Duplicates in three tiers, a suggested keeper for each group, and decisions that last.

- `exact`: the same bytes in more than one place (two libraries, or a library and an upload). The bytes are
  one image already (SHA-256 is unique), so such a group is one image with several copies.
- `same_picture`: re-encoded, resized, converted or slightly cropped copies. A pair is one when the
  perceptual hashes (pHash of the thumbnail, computed at ingest) differ in at most DUPLICATES_HASH_DISTANCE
  bits AND the CLIP cosine is at least DUPLICATES_SAME_COSINE: neither alone decides.
- `similar`: near-identical shots (bursts): a cosine of at least DUPLICATES_SIMILAR_COSINE, and with
  DUPLICATES_SIMILAR_WINDOW > 0 only when both were taken that many seconds apart at most.

The scan (`POST /duplicates/scan`, a job) asks the vector index for each image's neighbours above the lower
of the two cosines (a range search, capped at DUPLICATES_NEIGHBOURS: never all pairs) and stores the pairs
with their cosine and hash distance. Each new image is linked the same way as it is ingested. Tiers are
decided when groups are read, from the stored scores and the current thresholds; a group is a connected
component of its tier's pairs. A `keep_all` decision stores the members of the group: a group whose members
all lie in one decision of its tier stays hidden until an image outside it joins.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import delete, func, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from backend.context import AppContext
from backend.errors import GroupChanged, GroupNotFound, InvalidResolve
from backend.models import (
    BulkResolveOutcome,
    BulkResolveRequest,
    DuplicateCopy,
    DuplicateDecision,
    DuplicateGroup,
    DuplicateMember,
    DuplicatePair,
    DuplicateScore,
    DuplicatesPublic,
    DuplicateTier,
    Image,
    Job,
    LibraryFile,
    ResolveOutcome,
    ResolveRequest,
    SkippedGroup,
)
from backend.services.catalog import get_images_by_ids, publish
from backend.services.filters import in_collection
from backend.services.imaging import thumbnail_hash
from backend.services.index import stored_vector
from backend.services.jobs import JobHandle
from backend.services.trash import trash_images

log = logging.getLogger(__name__)

SCAN_CHUNK = 1000
RANGE_CHUNK = 250
HASH_CHUNK = 256
TIERS: tuple[DuplicateTier, ...] = ("exact", "same_picture", "similar")


# ---------------------------------------------------------------------------------------------- detection


def hash_distance(a: str | None, b: str | None) -> int | None:
    """Bits in which two pHashes (16 hex digits) differ; None when either is unknown."""
    if not a or not b:
        return None
    return (int(a, 16) ^ int(b, 16)).bit_count()


def _floor(ctx: AppContext) -> float:
    """The lowest cosine either tier looks at: what the range search is asked for."""
    return min(ctx.settings.duplicates_same_cosine, ctx.settings.duplicates_similar_cosine)


async def _neighbour_pairs(ctx: AppContext, ids: np.ndarray, vectors: np.ndarray) -> dict[tuple[int, int], float]:
    """(smaller id, larger id) -> cosine for each image's neighbours above the floor."""
    found: dict[tuple[int, int], float] = {}
    # A few queries at a time: in a collection of look-alikes a range search holds every hit above the floor
    # before the cap cuts it.
    for start in range(0, len(ids), RANGE_CHUNK):
        # The image itself is its own nearest neighbour: one more than asked for.
        hits = await ctx.index.range_search(
            vectors[start : start + RANGE_CHUNK], _floor(ctx), ctx.settings.duplicates_neighbours + 1
        )
        for image_id, row in zip(ids[start : start + RANGE_CHUNK].tolist(), hits, strict=True):
            for other, cosine in row:
                if other != image_id:
                    found[(min(image_id, other), max(image_id, other))] = cosine
    return found


async def _hashes(session: AsyncSession, ids: set[int]) -> dict[int, str | None]:
    out: dict[int, str | None] = {}
    listed = sorted(ids)
    for start in range(0, len(listed), SCAN_CHUNK):
        rows = (
            await session.exec(
                select(Image.id, Image.phash).where(col(Image.id).in_(listed[start : start + SCAN_CHUNK]))
            )
        ).all()
        out.update({int(i): h for i, h in rows if i is not None})
    return out


def _pair_rows(pairs: dict[tuple[int, int], float], hashes: dict[int, str | None]) -> list[DuplicatePair]:
    return [
        DuplicatePair(image_a=a, image_b=b, cosine=cosine, hash_distance=hash_distance(hashes.get(a), hashes.get(b)))
        for (a, b), cosine in pairs.items()
        if a in hashes and b in hashes  # both still exist
    ]


async def link_new(ctx: AppContext, ids: list[int], vectors: np.ndarray) -> int:
    """Pair freshly ingested images with their neighbours (the incremental half of detection). Never fails
    the ingest: a problem here only waits for the next scan. The pairs stored."""
    if not ids:
        return 0
    try:
        pairs = await _neighbour_pairs(ctx, np.array(ids, dtype=np.int64), vectors)
        if not pairs:
            return 0
        async with ctx.write_lock, ctx.sessions() as session:
            hashes = await _hashes(session, {i for pair in pairs for i in pair})
            rows = _pair_rows(pairs, hashes)
            known = set()
            for start in range(0, len(rows), SCAN_CHUNK):
                chunk = rows[start : start + SCAN_CHUNK]
                known |= set(
                    (
                        await session.exec(
                            select(DuplicatePair.image_a, DuplicatePair.image_b).where(
                                col(DuplicatePair.image_b).in_({row.image_b for row in chunk}),
                                col(DuplicatePair.image_a).in_({row.image_a for row in chunk}),
                            )
                        )
                    ).all()
                )
            fresh = [row for row in rows if (row.image_a, row.image_b) not in known]
            session.add_all(fresh)
            await session.commit()
            return len(fresh)
    except IntegrityError:  # another replica linked the same pair meanwhile
        return 0
    except Exception:
        log.exception("could not look for duplicates of %d new images (the next scan will)", len(ids))
        return 0


async def start_scan(ctx: AppContext) -> Job:
    """Queue a full duplicates scan (one at a time: a second request while one runs is that job)."""

    async def run(handle: JobHandle) -> dict[str, Any]:
        return await scan(ctx, handle)

    return await ctx.jobs.submit("duplicates", {}, run)


async def _backfill_hashes(ctx: AppContext, handle: JobHandle | None) -> int:
    """Give every image without a pHash (stored before hashes were made) one, from its thumbnail."""
    done = 0
    last = 0
    while True:
        async with ctx.sessions() as session:
            rows = (
                await session.exec(
                    select(Image.id, Image.thumbnail_key)
                    .where(col(Image.phash).is_(None), col(Image.id) > last)
                    .order_by(col(Image.id))
                    .limit(HASH_CHUNK)
                )
            ).all()
        if not rows:
            return done
        last = int(rows[-1][0] or 0)
        hashed: list[tuple[int, str]] = []
        for image_id, key in rows:
            try:
                hashed.append((int(image_id or 0), await ctx.executor.run(thumbnail_hash, ctx.store.path(key))))
            except Exception as exc:  # a missing or broken thumbnail: no hash, so no same_picture pairs
                log.warning("no perceptual hash for image %s: %s", image_id, exc)
        async with ctx.write_lock, ctx.sessions() as session:
            for image_id, phash in hashed:
                await session.exec(update(Image).where(col(Image.id) == image_id).values(phash=phash))
            await session.commit()
        done += len(hashed)
        if handle is not None:
            handle.checkpoint()
            await handle.progress(done, done, "perceptual hashes")


async def scan(ctx: AppContext, handle: JobHandle | None = None) -> dict[str, Any]:
    """Find the pairs of the whole collection again. The pairs of images that were in the collection when the
    scan began are replaced; those of images ingested meanwhile (linked as they came) stay."""
    hashed = await _backfill_hashes(ctx, handle)
    model = ctx.settings.embedding_model
    async with ctx.sessions() as session:
        total = (
            await session.exec(
                select(func.count()).select_from(Image).where(Image.embedding_model == model, in_collection())
            )
        ).one()
    pairs: dict[tuple[int, int], float] = {}
    last, seen = 0, 0
    if handle is not None:
        await handle.progress(0, total, "neighbours")
    while True:
        async with ctx.sessions() as session:
            rows = (
                await session.exec(
                    select(Image.id, Image.embedding, Image.embedding_dim)
                    .where(Image.embedding_model == model, in_collection(), col(Image.id) > last)
                    .order_by(col(Image.id))
                    .limit(SCAN_CHUNK)
                )
            ).all()
        if not rows:
            break
        last = int(rows[-1][0] or 0)
        usable = [(int(i or 0), stored_vector(blob, dim)) for i, blob, dim in rows]
        usable_ids = [i for i, v in usable if v is not None]
        if usable_ids:
            vectors = np.stack([v for _, v in usable if v is not None])
            pairs.update(await _neighbour_pairs(ctx, np.array(usable_ids, dtype=np.int64), vectors))
        seen += len(rows)
        if handle is not None:
            handle.checkpoint()
            await handle.progress(seen, max(total, seen), "neighbours")
    async with ctx.write_lock, ctx.sessions() as session:
        hashes = await _hashes(session, {i for pair in pairs for i in pair})
        fresh = _pair_rows(pairs, hashes)
        live = select(Image.id).where(in_collection())
        # Pairs with an end in the trash stay: restoring that image brings its group back.
        await session.exec(
            delete(DuplicatePair).where(
                col(DuplicatePair.image_b) <= last,
                col(DuplicatePair.image_a).in_(live),
                col(DuplicatePair.image_b).in_(live),
            )
        )
        await session.flush()
        kept = set((await session.exec(select(DuplicatePair.image_a, DuplicatePair.image_b))).all())
        session.add_all(row for row in fresh if (row.image_a, row.image_b) not in kept)
        await session.commit()
    groups = await _all_groups(ctx)
    counts = {tier: sum(g.tier == tier for g in groups) for tier in TIERS}
    return {"images": seen, "hashed": hashed, "pairs": len(fresh), "groups": counts}


# ---------------------------------------------------------------------------------------------- grouping


@dataclass
class _Group:
    tier: DuplicateTier
    members: list[int]
    pairs: list[DuplicateScore] = field(default_factory=list)
    copies: list[DuplicateCopy] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.tier}-{min(self.members)}"

    @property
    def size(self) -> int:
        return len(self.copies) if self.tier == "exact" else len(self.members)


def _components(edges: list[DuplicateScore]) -> list[tuple[list[int], list[DuplicateScore]]]:
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for edge in edges:
        ra, rb = root(edge.a), root(edge.b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = defaultdict(list)
    for node in list(parent):
        members[root(node)].append(node)
    scores: dict[int, list[DuplicateScore]] = defaultdict(list)
    for edge in edges:
        scores[root(edge.a)].append(edge)
    return [(sorted(nodes), scores[r]) for r, nodes in members.items()]


def _group_pairs(
    pairs: list[tuple[int, int, float, int | None]],
    taken: dict[int, datetime | None],
    *,
    max_distance: int,
    same_cosine: float,
    similar_cosine: float,
    window: float,
) -> list[_Group]:
    """Group the pairs of live images into same_picture and similar groups (synchronous: the executor's)."""
    same: list[DuplicateScore] = []
    close: list[DuplicateScore] = []
    for a, b, cosine, distance in pairs:
        if distance is not None and distance <= max_distance and cosine >= same_cosine:
            score = DuplicateScore(a=a, b=b, cosine=cosine, hash_distance=distance, tier="same_picture")
            same.append(score)
            close.append(score)
        elif cosine >= similar_cosine:
            if window > 0:
                ta, tb = taken.get(a), taken.get(b)
                if ta is None or tb is None or abs((ta - tb).total_seconds()) > window:
                    continue
            close.append(DuplicateScore(a=a, b=b, cosine=cosine, hash_distance=distance, tier="similar"))
    groups = [_Group("same_picture", nodes, edges) for nodes, edges in _components(same)]
    same_sets = {tuple(g.members) for g in groups}
    for nodes, edges in _components(close):
        if tuple(nodes) not in same_sets and any(edge.tier == "similar" for edge in edges):
            groups.append(_Group("similar", nodes, edges))
    return groups


async def _all_groups(ctx: AppContext, tier: DuplicateTier | None = None) -> list[_Group]:
    """Every group (of one tier) that no decision hides, largest first, then by smallest id."""
    settings = ctx.settings
    async with ctx.sessions() as session:
        in_trash = (await session.exec(select(Image.id).where(col(Image.trashed_at).is_not(None)))).all()
        trashed = {int(i) for i in in_trash if i is not None}
        groups: list[_Group] = []
        if tier in (None, "same_picture", "similar"):
            rows = (
                await session.exec(
                    select(
                        DuplicatePair.image_a, DuplicatePair.image_b, DuplicatePair.cosine, DuplicatePair.hash_distance
                    )
                )
            ).all()
            pairs = [(a, b, c, d) for a, b, c, d in rows if a not in trashed and b not in trashed]
            taken: dict[int, datetime | None] = {}
            if settings.duplicates_similar_window > 0 and pairs:
                ends = sorted({i for a, b, _, _ in pairs for i in (a, b)})
                for start in range(0, len(ends), SCAN_CHUNK):
                    chunk = ends[start : start + SCAN_CHUNK]
                    dates = await session.exec(select(Image.id, Image.taken_at).where(col(Image.id).in_(chunk)))
                    taken.update((int(i or 0), t) for i, t in dates.all())
            groups = await ctx.executor.run(
                _group_pairs,
                pairs,
                taken,
                max_distance=settings.duplicates_hash_distance,
                same_cosine=settings.duplicates_same_cosine,
                similar_cosine=settings.duplicates_similar_cosine,
                window=settings.duplicates_similar_window,
            )
            if tier is not None:
                groups = [g for g in groups if g.tier == tier]
        if tier in (None, "exact"):
            groups += await _exact_groups(session, trashed)
        decisions: dict[str, list[set[int]]] = defaultdict(list)
        for decided_tier, ids in (
            await session.exec(select(DuplicateDecision.tier, DuplicateDecision.image_ids))
        ).all():
            decisions[decided_tier].append(set(ids))
    visible = [g for g in groups if not any(set(g.members) <= kept for kept in decisions[g.tier])]
    visible.sort(key=lambda g: (-g.size, TIERS.index(g.tier), min(g.members)))
    return visible


async def _exact_groups(session: AsyncSession, trashed: set[int]) -> list[_Group]:
    """One group per image whose bytes lie in more than one place."""
    counted = select(LibraryFile.image_id, func.count().label("n")).group_by(col(LibraryFile.image_id)).subquery()
    rows = (
        await session.exec(
            select(Image.id, Image.storage_key, counted.c.n).join(counted, counted.c.image_id == Image.id)
        )
    ).all()
    several = [int(i) for i, key, n in rows if i is not None and i not in trashed and n + (1 if key else 0) >= 2]
    if not several:
        return []
    copies: dict[int, list[DuplicateCopy]] = defaultdict(list)
    for start in range(0, len(several), SCAN_CHUNK):
        chunk = several[start : start + SCAN_CHUNK]
        for image_id, key in (
            await session.exec(select(Image.id, Image.storage_key).where(col(Image.id).in_(chunk)))
        ).all():
            if key:
                copies[int(image_id or 0)].append(DuplicateCopy(library_id=None, path=None))
        places = await session.exec(
            select(LibraryFile.image_id, LibraryFile.library_id, LibraryFile.path)
            .where(col(LibraryFile.image_id).in_(chunk))
            .order_by(col(LibraryFile.library_id), col(LibraryFile.path))
        )
        for image_id, library_id, path in places.all():
            copies[image_id].append(DuplicateCopy(library_id=library_id, path=path))
    return [_Group("exact", [i], copies=copies[i]) for i in several]


# ---------------------------------------------------------------------------------------------- the keeper


_METADATA = (
    ("taken_at", "date taken"),
    ("latitude", "place"),
    ("altitude", "altitude"),
    ("camera_make", "camera make"),
    ("camera_model", "camera model"),
    ("lens", "lens"),
    ("taken_at_offset", "time zone"),
)


def _richness(image: Image) -> list[str]:
    return [label for name, label in _METADATA if getattr(image, name) is not None]


def _rank(image: Image) -> tuple[Any, ...]:
    taken = image.taken_at.timestamp() if image.taken_at is not None else float("inf")
    return (-(image.width * image.height), -image.size_bytes, -len(_richness(image)), taken, image.id or 0)


def suggest_keeper(images: list[Image]) -> tuple[Image, str]:
    """The copy to keep and why, in words: most pixels, then most bytes, then the richest metadata, then the
    oldest date taken, then the first stored."""
    ordered = sorted(images, key=_rank)
    best = ordered[0]
    if len(ordered) == 1:
        return best, "the only image"
    runner = ordered[1]
    if best.width * best.height != runner.width * runner.height:
        return best, (f"most pixels: {best.width}×{best.height}, the next largest {runner.width}×{runner.height}")
    if best.size_bytes != runner.size_bytes:
        return best, f"as many pixels as the next, and most bytes: {best.size_bytes} against {runner.size_bytes}"
    rich, other = _richness(best), _richness(runner)
    if len(rich) != len(other):
        return best, f"same size, and the richest metadata: {', '.join(rich)}"
    if best.taken_at != runner.taken_at:
        return best, f"same size and metadata, and the oldest date taken: {best.taken_at}"
    return best, "the copies match in size and metadata: the first one stored"


# ---------------------------------------------------------------------------------------------- reading


def _evidence(group: _Group) -> str:
    if group.tier == "exact":
        return f"the same bytes in {len(group.copies)} places"
    # Rounded down, so "at least" stays true (0.99998 reads 0.999, not 1.000).
    least = math.floor(min(p.cosine for p in group.pairs) * 1000) / 1000
    if group.tier == "same_picture":
        distances = [p.hash_distance for p in group.pairs if p.hash_distance is not None]
        return (
            f"perceptual hashes at most {max(distances)} bits apart and CLIP cosine at least {least:.3f}: "
            "the same picture re-encoded, resized, converted or cropped"
        )
    return f"CLIP cosine at least {least:.3f}: near-identical shots"


async def _public(session: AsyncSession, groups: list[_Group]) -> list[DuplicateGroup]:
    ids = sorted({i for g in groups for i in g.members})
    rows = await get_images_by_ids(session, ids)
    published = {p.id: p for p in await publish(session, list(rows.values()))}
    out: list[DuplicateGroup] = []
    for group in groups:
        images = [rows[i] for i in group.members if i in rows]
        if not images:
            continue
        keeper, reason = suggest_keeper(images)
        if group.tier == "exact":
            reason = "one image: the bytes are the same in every copy"
        ordered = [keeper] + [image for image in sorted(images, key=_rank) if image is not keeper]
        out.append(
            DuplicateGroup(
                id=group.id,
                tier=group.tier,
                size=group.size,
                evidence=_evidence(group),
                keeper_id=int(keeper.id or 0),
                keeper_reason=reason,
                members=[
                    DuplicateMember(image=published[int(image.id or 0)], keeper=image is keeper, copies=group.copies)
                    for image in ordered
                ],
                pairs=sorted(group.pairs, key=lambda p: (p.a, p.b)),
            )
        )
    return out


async def list_groups(
    ctx: AppContext, *, tier: DuplicateTier | None = None, offset: int = 0, limit: int = 50
) -> DuplicatesPublic:
    """GET /duplicates: groups largest first."""
    groups = await _all_groups(ctx, tier)
    async with ctx.sessions() as session:
        page = await _public(session, groups[offset : offset + limit])
    return DuplicatesPublic(data=page, count=len(groups), offset=offset, limit=limit)


async def _find(ctx: AppContext, group_id: str) -> _Group:
    tier = group_id.rsplit("-", 1)[0]
    if tier not in TIERS:
        raise GroupNotFound(f"no duplicates group {group_id!r}: ids look like same_picture-12")
    for group in await _all_groups(ctx, tier):
        if group.id == group_id:
            return group
    raise GroupNotFound(f"no duplicates group {group_id!r} now: resolved, or changed since it was listed")


# ---------------------------------------------------------------------------------------------- decisions


async def _keep_all(ctx: AppContext, group: _Group) -> ResolveOutcome:
    async with ctx.write_lock, ctx.sessions() as session:
        session.add(DuplicateDecision(tier=group.tier, image_ids=sorted(group.members)))
        await session.commit()
    return ResolveOutcome(group_id=group.id, tier=group.tier, kept=sorted(group.members), trashed=[], remembered=True)


async def _keep(ctx: AppContext, group: _Group, keep: list[int], reason: str | None = None) -> ResolveOutcome:
    """Trash the members not kept. The kept ones are checked again under the write lock: two resolves of one
    group sent together (keep A, keep B) must not trash both, so the second is refused (GroupChanged)."""
    keep = sorted(set(keep))
    others = [i for i in group.members if i not in keep]
    async with ctx.write_lock, ctx.sessions() as session:
        gone = sorted(set(keep) - set(await get_images_by_ids(session, keep)))
        if gone:
            raise GroupChanged(
                f"{group.id} changed since it was read: {gone} left the collection (trashed or deleted "
                "meanwhile), so nothing was trashed; list the groups again"
            )
        rows = await get_images_by_ids(session, others)
        trashed = await trash_images(ctx, session, list(rows.values()))
    return ResolveOutcome(
        group_id=group.id, tier=group.tier, kept=sorted(keep), trashed=sorted(trashed), reason=reason, remembered=False
    )


async def resolve(ctx: AppContext, group_id: str, request: ResolveRequest) -> ResolveOutcome:
    """POST /duplicates/{group_id}/resolve: keep some and trash the rest, or keep all and remember it."""
    if request.keep_all == (request.keep is not None):
        raise InvalidResolve('send either {"keep": [ids]} or {"keep_all": true}')
    group = await _find(ctx, group_id)
    if request.keep_all:
        return await _keep_all(ctx, group)
    assert request.keep is not None
    strangers = sorted(set(request.keep) - set(group.members))
    if strangers:
        raise InvalidResolve(f"not members of {group_id}: {strangers}; its members are {group.members}")
    if group.tier == "exact":
        raise InvalidResolve(
            "an exact group is one image whose bytes lie in several places: there is nothing to trash; "
            'remove the extra files from their folders yourself, or send {"keep_all": true}'
        )
    return await _keep(ctx, group, list(request.keep))


async def resolve_many(ctx: AppContext, request: BulkResolveRequest) -> BulkResolveOutcome:
    """POST /duplicates/resolve: keep each group's suggested keeper, trash the rest (or only say so). With a
    plan (a dry run's groups sent back), exactly that plan, group by group, where the group is unchanged."""
    outcome = BulkResolveOutcome(dry_run=request.dry_run, groups=[], trashed=0)
    if request.plan is not None:
        current = {group.id: group for group in await _all_groups(ctx)}
        for item in request.plan:
            group = current.get(item.group_id)
            if group is None:
                outcome.skipped.append(
                    SkippedGroup(group_id=item.group_id, reason="no such group now: resolved or changed")
                )
            elif set(item.kept) & set(item.trashed) or set(item.kept) | set(item.trashed) != set(group.members):
                reason = f"its members are {group.members} now, not the ones planned: preview again"
                outcome.skipped.append(SkippedGroup(group_id=item.group_id, reason=reason))
            else:
                await _settle(ctx, outcome, group, sorted(set(item.kept)), sorted(set(item.trashed)))
        return outcome
    groups = (await _all_groups(ctx, request.tier))[: request.limit]
    async with ctx.sessions() as session:
        rows = await get_images_by_ids(session, sorted({i for g in groups for i in g.members}))
    for group in groups:
        images = [rows[i] for i in group.members if i in rows]
        if len(images) < 2:
            continue
        keeper, reason = suggest_keeper(images)
        others = sorted(int(image.id or 0) for image in images if image is not keeper)
        await _settle(ctx, outcome, group, [int(keeper.id or 0)], others, reason)
    return outcome


async def _settle(
    ctx: AppContext,
    outcome: BulkResolveOutcome,
    group: _Group,
    kept: list[int],
    trashed: list[int],
    reason: str | None = None,
) -> None:
    """One group of a bulk resolve: only said (dry run), done, or skipped when its keeper left meanwhile."""
    if outcome.dry_run:
        done = ResolveOutcome(
            group_id=group.id, tier=group.tier, kept=kept, trashed=trashed, reason=reason, remembered=False
        )
    else:
        try:
            done = await _keep(ctx, group, kept, reason)
        except GroupChanged as exc:  # another resolve took its keeper meanwhile: left as it is
            outcome.skipped.append(SkippedGroup(group_id=group.id, reason=exc.detail))
            return
    outcome.groups.append(done)
    outcome.trashed += len(done.trashed)
