"""SQLModel tables and the public schemas the API answers with."""

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, NaiveDatetime
from sqlalchemy import Column, LargeBinary
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class ImageBase(SQLModel):
    filename: str = Field(description="The name the file was uploaded with (sanitised).")
    content_type: str = Field(description="MIME type of the stored original, from its decoded format.")
    width: int = Field(description="Width in pixels after applying the EXIF orientation.")
    height: int = Field(description="Height in pixels after applying the EXIF orientation.")
    size_bytes: int
    sha256: str = Field(index=True, unique=True, max_length=64)
    created_at: datetime = Field(default_factory=utcnow, index=True, description="When it was stored (UTC).")
    # EXIF stores the camera's local time without a zone, so this one stays naive.
    taken_at: NaiveDatetime | None = Field(default=None, description="EXIF DateTimeOriginal (camera local time).")
    embedding_model: str = Field(index=True, description="The CLIP model that made the stored vector.")


class Image(ImageBase, table=True):
    # AUTOINCREMENT: an id is never reused, so a stale index entry can never point at a new image.
    __table_args__ = {"sqlite_autoincrement": True}
    id: int | None = Field(default=None, primary_key=True)
    format: str
    storage_key: str = Field(description="Path of the original, relative to STORAGE_ROOT.")
    thumbnail_key: str = Field(description="Path of the JPEG thumbnail, relative to STORAGE_ROOT.")
    embedding_dim: int
    embedding: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class SchemaVersion(SQLModel, table=True):
    __tablename__ = "schema_version"
    id: int = Field(default=1, primary_key=True)
    version: int


class ImagePublic(ImageBase):
    id: int
    file_url: str
    thumbnail_url: str


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
    type: str
    size: int
    dimension: int | None


class ModelHealth(BaseModel):
    name: str
    device: str | None
    state: Literal["not_loaded", "loading", "loaded", "failed"]
    loaded: bool
    error: str | None = None


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    app: str
    images: int
    stale_embeddings: int = Field(description="Images whose vector was made by another CLIP model.")
    index: IndexHealth
    model: ModelHealth


class ErrorBody(BaseModel):
    detail: str
    code: str


# Documents the 422 every route with parameters can answer (the default schema is FastAPI's, not ours).
VALIDATION_ERROR_RESPONSE: dict[int | str, dict[str, object]] = {
    422: {"model": ErrorBody, "description": "Invalid parameters"}
}
