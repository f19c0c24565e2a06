"""SQLModel tables and the public schemas the API answers with."""

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, NaiveDatetime, StringConstraints, field_validator
from sqlalchemy import JSON, BigInteger, Column, DateTime, Index
from sqlmodel import Field, SQLModel

from backend.dbtypes import Embedding, UtcDateTime


def utcnow() -> datetime:
    return datetime.now(UTC)


class ImageBase(SQLModel):
    filename: str = Field(description="The name the file was uploaded with (sanitised).")
    content_type: str = Field(description="MIME type of the stored original, from its decoded format.")
    width: int = Field(description="Width in pixels after applying the EXIF orientation.")
    height: int = Field(description="Height in pixels after applying the EXIF orientation.")
    size_bytes: int
    sha256: str = Field(index=True, unique=True, max_length=64)
    created_at: datetime = Field(
        default_factory=utcnow, index=True, sa_type=UtcDateTime, description="When it was stored (UTC)."
    )
    # EXIF stores the camera's local time without a zone, so this one stays naive.
    taken_at: NaiveDatetime | None = Field(
        default=None, index=True, sa_type=DateTime, description="EXIF DateTimeOriginal (camera local time)."
    )
    taken_at_offset: str | None = Field(
        default=None, max_length=6, description="The UTC offset of `taken_at` (EXIF OffsetTimeOriginal), as +02:00."
    )
    latitude: float | None = Field(
        default=None, index=True, description="EXIF GPS latitude in degrees (north positive)."
    )
    longitude: float | None = Field(default=None, description="EXIF GPS longitude in degrees (east positive).")
    altitude: float | None = Field(default=None, description="EXIF GPS altitude in metres above sea level.")
    camera_make: str | None = Field(default=None, max_length=100, description="EXIF Make.")
    camera_model: str | None = Field(default=None, max_length=100, description="EXIF Model.")
    lens: str | None = Field(default=None, max_length=100, description="EXIF LensMake and LensModel.")
    embedding_model: str = Field(index=True, description="The CLIP model that made the stored vector.")
    caption: str | None = Field(default=None, description="BLIP's caption, once one was made.")
    # No foreign key: the libraries service removes a library's images itself (their vectors and thumbnails
    # go with them), and SQLite could not drop a referencing column in place.
    library_id: int | None = Field(
        default=None,
        index=True,
        description="The library whose folder holds the original (none for an upload, whose original is stored).",
    )
    path: str | None = Field(default=None, description="Where the original lies in its library (relative, /).")
    offline: bool = Field(
        default=False, description="Its library's folder cannot be reached (an unmounted disk): no original for now."
    )
    phash: str | None = Field(
        default=None,
        max_length=16,
        description="Perceptual hash (pHash, 64 bits as hex) of the picture: what finds re-encoded and resized copies.",
    )
    trashed_at: datetime | None = Field(
        default=None,
        index=True,
        sa_type=UtcDateTime,
        description="When it went to the trash (UTC); null while it is in the collection.",
    )


class Image(ImageBase, table=True):
    # AUTOINCREMENT: an id is never reused, so a stale index entry can never point at a new image.
    __table_args__ = {"sqlite_autoincrement": True}
    id: int | None = Field(default=None, primary_key=True)
    format: str
    storage_key: str = Field(description="Path of the original, relative to STORAGE_ROOT.")
    thumbnail_key: str = Field(description="Path of the JPEG thumbnail, relative to STORAGE_ROOT.")
    embedding_dim: int
    embedding: bytes = Field(sa_column=Column(Embedding, nullable=False))
    caption_model: str | None = Field(default=None, description="The BLIP model that wrote `caption`.")


class Library(SQLModel, table=True):
    """A folder indexed in place: its files are read, never written, moved or deleted."""

    __table_args__ = {"sqlite_autoincrement": True}
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=200)
    path: str = Field(unique=True, description="The folder, absolute and resolved.")
    watch: bool = True
    online: bool = True
    created_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)
    scanned_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    last_error: str | None = None


class LibraryFile(SQLModel, table=True):
    """A file of a library and the image its bytes are: what a scan compares the folder against. Two files
    with the same bytes are one image (one row each here); the image's `path` names one of them."""

    __tablename__ = "library_file"
    __table_args__ = (Index("ux_library_file_path", "library_id", "path", unique=True),)
    id: int | None = Field(default=None, primary_key=True)
    library_id: int = Field(foreign_key="library.id", ondelete="CASCADE")
    path: str
    size: int = Field(sa_type=BigInteger)
    mtime_ns: int = Field(sa_type=BigInteger)
    sha256: str = Field(max_length=64)
    image_id: int = Field(foreign_key="image.id", ondelete="CASCADE", index=True)


class DismissedFile(SQLModel, table=True):
    """Bytes of a library that were purged from the trash: a scan does not index them again (the file itself
    stays where it is; the service never deletes a library's files)."""

    __tablename__ = "library_dismissed"
    library_id: int = Field(foreign_key="library.id", ondelete="CASCADE", primary_key=True)
    sha256: str = Field(primary_key=True, max_length=64)


class DuplicatePair(SQLModel, table=True):
    """Two images close enough to be looked at together: found by the duplicates scan, which of the tiers
    they fall in is decided when read (the thresholds are settings)."""

    __tablename__ = "duplicate_pair"
    image_a: int = Field(foreign_key="image.id", ondelete="CASCADE", primary_key=True)  # the smaller id
    image_b: int = Field(foreign_key="image.id", ondelete="CASCADE", primary_key=True, index=True)
    cosine: float
    hash_distance: int | None = None


class DuplicateDecision(SQLModel, table=True):
    """`keep_all`: these images are not duplicates. A group of the tier whose members all lie in one
    decision stays hidden; a new member brings it back."""

    __tablename__ = "duplicate_decision"
    __table_args__ = {"sqlite_autoincrement": True}
    id: int | None = Field(default=None, primary_key=True)
    tier: str = Field(max_length=20)
    image_ids: list[int] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)


class ImageTag(SQLModel, table=True):
    """Zero-shot tags: the vocabulary entries whose CLIP text vector fits the image best."""

    __tablename__ = "image_tag"
    image_id: int = Field(foreign_key="image.id", ondelete="CASCADE", primary_key=True)
    tag: str = Field(primary_key=True, index=True)
    score: float


MAX_CLUSTERS = 1000
JobKind = Literal["cluster", "import", "reindex", "caption", "metadata", "scan", "duplicates"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class Job(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=32)
    kind: str = Field(index=True)
    status: str = Field(index=True)
    params: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    progress_done: int = 0
    progress_total: int | None = None
    message: str | None = None
    cancel_requested: bool = False
    result: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    error: str | None = None
    created_at: datetime = Field(default_factory=utcnow, index=True, sa_type=UtcDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    # The replica that accepted and runs it, and until when it has promised to (see services/jobs.py).
    owner: str | None = Field(default=None, max_length=200)
    lease_until: datetime | None = Field(default=None, sa_type=UtcDateTime)


class ClusterRun(SQLModel, table=True):
    """One finished clustering of the collection; its clusters and members hang off it."""

    __tablename__ = "cluster_run"
    __table_args__ = {"sqlite_autoincrement": True}
    id: int | None = Field(default=None, primary_key=True)
    job_id: str | None = None
    created_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)
    embedding_model: str
    k: int
    k_requested: int | None = None
    seed: int
    image_count: int
    silhouette: float | None = None
    captions: bool
    caption_model: str | None = None
    caption_error: str | None = None


class ClusterRow(SQLModel, table=True):
    __tablename__ = "cluster"
    run_id: int = Field(foreign_key="cluster_run.id", ondelete="CASCADE", primary_key=True)
    cluster_id: int = Field(primary_key=True)
    size: int
    caption: str | None = None
    representative_ids: list[int] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))


class ClusterMember(SQLModel, table=True):
    __tablename__ = "cluster_member"
    __table_args__ = (Index("ix_cluster_member_order", "run_id", "cluster_id", "rank"),)
    run_id: int = Field(foreign_key="cluster_run.id", ondelete="CASCADE", primary_key=True)
    image_id: int = Field(foreign_key="image.id", ondelete="CASCADE", primary_key=True, index=True)
    cluster_id: int
    rank: int
    distance: float


class TagScore(BaseModel):
    tag: str
    score: float = Field(description="Share of the softmax over the tag vocabulary.")


class TagCount(BaseModel):
    tag: str
    count: int = Field(description="Images that carry this tag.")


class TagsPublic(BaseModel):
    data: list[TagCount] = Field(description="The vocabulary, then any other stored tag; most used first.")
    vocabulary_size: int


class ImagePublic(ImageBase):
    id: int
    file_url: str
    thumbnail_url: str
    tags: list[TagScore] = Field(default_factory=list, description="Zero-shot CLIP tags, best first.")


class ImageUploaded(ImagePublic):
    duplicate: bool = Field(description="True when these bytes were already stored: nothing new was stored.")


class ImagesPublic(BaseModel):
    data: list[ImagePublic]
    count: int
    offset: int
    limit: int


class UploadError(BaseModel):
    status: int
    code: str
    detail: str


class UploadItem(BaseModel):
    filename: str
    status: Literal["created", "duplicate", "failed"]
    image: ImageUploaded | None = None
    error: UploadError | None = None


class UploadBatch(BaseModel):
    created: int
    duplicates: int
    failed: int
    items: list[UploadItem]


class SearchHit(BaseModel):
    image: ImagePublic
    score: float = Field(ge=-1.0, le=1.0, description="Cosine similarity of the CLIP vectors.")


class SearchResults(BaseModel):
    query: str | None = None
    image_id: int | None = None
    count: int
    results: list[SearchHit]


class IndexHealth(BaseModel):
    type: str = Field(description="The FAISS layout (embedded default), or pgvector-hnsw (PostgreSQL).")
    size: int
    dimension: int | None
    approximate: bool = Field(
        description="True from INDEX_APPROXIMATE_FROM vectors on: search probes an inverted-file index "
        "instead of scanning every vector."
    )
    reorganizing: bool = Field(description="The index is being rebuilt in another layout; search goes on.")


class ImageEmbedding(BaseModel):
    id: int
    model: str = Field(description="The catalog key of the model that made the vector (name, #precision if reduced).")
    current: bool = Field(description="Whether the current CLIP settings make vectors of this model (searchable).")
    precision: str = Field(description="fp32 (fp16 on CUDA counts as fp32 here), bf16 or int8.")
    runtime: str | None = Field(
        description="What serves this model now (onnx or torch), when it is the current one and loaded; fp32 "
        "vectors of both runtimes agree to 1e-6, so the catalog does not tell them apart."
    )
    dim: int
    vector: list[float] = Field(description="The L2-normalised vector, as stored (float32 values).")


class TowerHealth(BaseModel):
    runtime: str = Field(description="What runs this tower: onnx (ONNX Runtime) or torch (PyTorch).")
    precision: str = Field(description="fp32, fp16, bf16 or int8.")


class ModelHealth(BaseModel):
    name: str | None = Field(description="Hub id or directory; null without a valid key when keys are required.")
    device: str | None
    state: Literal["not_loaded", "loading", "loaded", "failed"]
    loaded: bool
    error: str | None = Field(default=None, description="Why it failed to load (null without a valid key).")
    towers: dict[str, TowerHealth] | None = Field(
        default=None,
        description="Once loaded, what serves each part of the model: CLIP's `image` and `text` towers, BLIP's "
        "`captioner`.",
    )
    embedding_model: str | None = Field(
        default=None, description="CLIP: the key its vectors carry in the catalog (the name, #precision when reduced)."
    )
    graphs: str | None = Field(
        default=None,
        description="CLIP on ONNX Runtime: where its graphs came from (exported this start, cache, or directory).",
    )
    fallback: str | None = Field(
        default=None, description="Why the planned runtime does not serve (an ONNX export that failed), or null."
    )


class DatabaseHealth(BaseModel):
    backend: Literal["sqlite", "postgresql"] = Field(
        description="sqlite: the embedded default, one process; postgresql: any number of replicas."
    )
    replica: str = Field(description="This process (REPLICA_ID, or host:pid): the one that answered.")


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    app: str
    collection: str | None = Field(
        description="The collection the counts are of; null (and no counts) when API keys are required and "
        "no valid X-API-Key was sent."
    )
    images: int | None
    stale_embeddings: int | None = Field(description="Images whose vector was made by another CLIP model.")
    index: IndexHealth | None
    database: DatabaseHealth
    model: ModelHealth = Field(description="The CLIP model (embeddings, search, tags).")
    captioner: ModelHealth = Field(description="The BLIP model (captions); loaded on first use.")


class JobProgress(BaseModel):
    done: int
    total: int | None = Field(description="Units of work in the current phase, once known.")
    message: str | None = Field(description="The current phase.")


class JobPublic(BaseModel):
    id: str
    kind: JobKind
    status: JobStatus
    progress: JobProgress
    params: dict[str, Any]
    cancel_requested: bool
    result: dict[str, Any] | None = Field(
        description="What the job did; in GET /jobs without its lists (failures, image_ids), which GET /jobs/{id} has"
    )
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    url: str
    replica: str | None = Field(default=None, description="The service process that runs (or ran) it.")


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int = Field(description="Jobs that match the filters, on every page.")
    offset: int
    limit: int


class ClusterRequest(BaseModel):
    # Strict and closed: `true` is not k=1, "yes" is not a boolean, and a misspelt field is an error.
    model_config = ConfigDict(strict=True, extra="forbid")

    k: Annotated[int, Field(ge=1, le=MAX_CLUSTERS)] | Literal["auto"] | None = Field(
        default=None, description='Number of clusters, or "auto" to choose it; default KMEANS_CLUSTERS.'
    )
    captions: bool = Field(default=True, description="Caption each cluster with BLIP.")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, description="Random seed; default CLUSTER_SEED.")

    @field_validator("k", mode="before")
    @classmethod
    def _one_message_for_k(cls, value: object) -> object:
        whole = isinstance(value, int) and type(value) is not bool and 1 <= value <= MAX_CLUSTERS
        if value is not None and value != "auto" and not whole:
            raise ValueError(f'k must be a whole number from 1 to {MAX_CLUSTERS}, or "auto"')
        return value


class ClusterPublic(BaseModel):
    cluster_id: int
    size: int = Field(description="Images in the cluster now (deleted images drop out).")
    caption: str | None
    representatives: list[ImagePublic] = Field(description="The images closest to the centroid.")
    images_url: str


class ClusterRunPublic(BaseModel):
    id: int
    job_id: str | None
    created_at: datetime
    embedding_model: str
    k: int
    k_requested: int | None = Field(description="The k asked for; null when it was chosen automatically.")
    auto_k: bool
    seed: int
    image_count: int = Field(description="Images clustered when the run was made.")
    silhouette: float | None = Field(description="Cosine silhouette of the clustering (on a sample).")
    captions: bool
    caption_model: str | None
    caption_error: str | None = Field(description="Why clusters have no caption, when BLIP was unavailable.")
    export_url: str
    clusters: list[ClusterPublic]


class MapPoint(BaseModel):
    id: int = Field(description="The image's id.")
    x: float
    y: float
    cluster: int | None = Field(description="Its cluster in the run, or null when the run does not hold it.")


class MapCluster(BaseModel):
    cluster_id: int
    caption: str | None


class MapPublic(BaseModel):
    method: Literal["pca"] = Field(description="How the vectors were projected onto the plane.")
    total: int = Field(description="Images in the search index (the current CLIP model's).")
    count: int = Field(description="Points in this answer.")
    sampled: bool = Field(description="True when `count` < `total`: a seeded random sample is drawn.")
    run_id: int | None = Field(description="The clustering run whose clusters label the points.")
    clusters: list[MapCluster]
    points: list[MapPoint] = Field(description="Coordinates within the unit disc.")


class ClusterMemberPublic(BaseModel):
    image: ImagePublic
    rank: int = Field(description="0 is the image closest to the centroid.")
    distance: float = Field(description="Cosine distance to the centroid.")


class ClusterImages(BaseModel):
    run_id: int
    cluster_id: int
    caption: str | None
    size: int
    offset: int
    limit: int
    data: list[ClusterMemberPublic]


class UploadCluster(BaseModel):
    name: int = Field(description="The cluster's number, largest cluster first.")
    image_ids: list[str] = Field(description="Filenames of its images as uploaded, closest to the centroid first.")
    description: str = Field(description="BLIP's caption for the cluster.")


class UploadClusters(BaseModel):
    clusters: list[UploadCluster]


class ImportRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    path: str = Field(min_length=1, max_length=4096, description="A folder inside one of the IMPORT_ROOTS.")
    recursive: bool = True


class ErrorBody(BaseModel):
    detail: str
    code: str


# What a route declares as `responses=`: status -> {"model": ..., "description": ...}.
Responses = dict[int | str, dict[str, Any]]

# Documents the 422 every route with parameters can answer (the default schema is FastAPI's, not ours).
VALIDATION_ERROR_RESPONSE: Responses = {422: {"model": ErrorBody, "description": "Invalid parameters"}}


class TimelineImage(BaseModel):
    id: int
    taken_at: datetime
    thumbnail_url: str


class TimelineBucket(BaseModel):
    key: str = Field(description="The year, month or day: 2024, 2024-05 or 2024-05-17.")
    count: int = Field(description="Images taken in it that the filters keep.")
    images: list[TimelineImage] = Field(description="The newest few of them.")


class TimelinePublic(BaseModel):
    granularity: Literal["year", "month", "day"]
    buckets: list[TimelineBucket] = Field(description="Newest first.")
    count: int = Field(description="Buckets in all (offset and limit page through them).")
    offset: int
    limit: int
    undated: int = Field(description="Images the filters keep that have no date taken: in no bucket.")


class LibraryCreate(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    path: str = Field(min_length=1, max_length=4096, description="A folder inside one of the IMPORT_ROOTS.")
    name: str | None = Field(default=None, min_length=1, max_length=200, description="Default: the folder's name.")
    watch: bool = Field(default=True, description="Follow changes to the folder while the service runs.")


class LibraryUpdate(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=200)
    watch: bool | None = None


class LibraryPublic(BaseModel):
    id: int
    name: str
    path: str
    watch: bool
    online: bool = Field(description="False while the folder cannot be reached; its images are kept, offline.")
    created_at: datetime
    scanned_at: datetime | None = Field(description="When the last scan finished.")
    last_error: str | None = Field(description="Why the last scan found the folder offline, if it did.")
    images: int = Field(description="Images whose original lies in this library.")
    files: int = Field(description="Image files in it (the same bytes twice are two files, one image).")
    scan_job: str | None = Field(
        default=None, description="When it was just added: the id of its first scan (GET /jobs/{id})."
    )


class LibrariesPublic(BaseModel):
    data: list[LibraryPublic]
    count: int


DuplicateTier = Literal["exact", "same_picture", "similar"]


class DuplicateCopy(BaseModel):
    library_id: int | None = Field(description="The library that holds this copy; null for the stored upload.")
    path: str | None = Field(description="Where it lies in the library (relative); null for the stored upload.")


class DuplicateMember(BaseModel):
    image: ImagePublic
    keeper: bool = Field(description="The copy suggested to keep.")
    copies: list[DuplicateCopy] = Field(
        default_factory=list, description="Tier exact: every place these bytes lie (they are one image)."
    )


class DuplicateScore(BaseModel):
    a: int
    b: int
    cosine: float = Field(description="Cosine of the CLIP vectors.")
    hash_distance: int | None = Field(description="Bits (of 64) in which the perceptual hashes differ.")
    tier: Literal["same_picture", "similar"]


class DuplicateGroup(BaseModel):
    id: str = Field(description="tier-smallest id: what POST /duplicates/{group_id}/resolve takes.")
    tier: DuplicateTier
    size: int
    evidence: str = Field(description="Why these images are grouped, in words.")
    keeper_id: int
    keeper_reason: str = Field(description="Why that one is suggested, in words.")
    members: list[DuplicateMember] = Field(description="The keeper first.")
    pairs: list[DuplicateScore] = Field(description="The scores of the pairs that tie the group together.")


class DuplicatesPublic(BaseModel):
    data: list[DuplicateGroup] = Field(description="Largest group first.")
    count: int = Field(description="Groups of the tier(s) asked for, on every page.")
    offset: int
    limit: int


class ResolveRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    keep: list[int] | None = Field(
        default=None, min_length=1, max_length=1000, description="The members to keep; the others go to the trash."
    )
    keep_all: bool = Field(default=False, description="They are not duplicates: keep them all, and remember it.")


class ResolveOutcome(BaseModel):
    group_id: str
    tier: DuplicateTier
    kept: list[int]
    trashed: list[int] = Field(description="Moved to the trash (GET /trash; POST /trash/{id}/restore undoes it).")
    reason: str | None = Field(default=None, description="Bulk: why the kept one was chosen.")
    remembered: bool = Field(description="keep_all: the decision is stored and survives rescans.")


class PlannedResolve(BaseModel):
    """One group of a preview, sent back as it was shown: applied only if the group is still exactly this."""

    model_config = ConfigDict(strict=True, extra="forbid")

    group_id: Annotated[str, StringConstraints(pattern=r"^(same_picture|similar)-[0-9]{1,19}$", max_length=40)]
    kept: list[int] = Field(min_length=1, max_length=1000)
    trashed: list[int] = Field(min_length=1, max_length=1000)


class BulkResolveRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    tier: Literal["same_picture", "similar"] = Field(
        default="same_picture", description="Which groups: exact copies are one image and have nothing to trash."
    )
    dry_run: bool = Field(default=False, description="Only say what would be kept and trashed.")
    limit: int = Field(default=1000, ge=1, le=10_000, description="At most this many groups, largest first.")
    plan: list[PlannedResolve] | None = Field(
        default=None,
        max_length=10_000,
        description="The `groups` of a dry run, sent back to apply exactly what it showed (tier and limit are "
        "then not used): a group whose members changed since is skipped, never resolved differently.",
    )


class SkippedGroup(BaseModel):
    group_id: str
    reason: str


class BulkResolveOutcome(BaseModel):
    dry_run: bool
    groups: list[ResolveOutcome]
    trashed: int = Field(description="Images moved to the trash (or that would be, with dry_run).")
    skipped: list[SkippedGroup] = Field(
        default_factory=list, description="Groups of the plan left as they are, with why (changed since the preview)."
    )


class TrashedImage(ImagePublic):
    purge_at: datetime | None = Field(description="When it is deleted for good (TRASH_DAYS); null: never.")


class TrashPublic(BaseModel):
    data: list[TrashedImage] = Field(description="Most recently trashed first.")
    count: int
    offset: int
    limit: int


class TrashEmptied(BaseModel):
    purged: int = Field(description="Images deleted for good.")
