"""Settings read from the environment and an optional `.env` file."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the service; `.env.example` lists them with their defaults."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    app_name: str = "AI Image Organizer"
    storage_root: Path = Path("storage")
    # Empty means: an SQLite file inside STORAGE_ROOT.
    database_url: str = ""

    clip_model_name: str = "openai/clip-vit-base-patch32"
    clip_device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # Load the model while the app starts (in the background); false loads it on first use.
    clip_preload: bool = True
    embed_batch_size: int = Field(default=32, ge=1, le=1024)

    max_upload_bytes: int = Field(default=50 * 1024 * 1024, ge=1)
    max_request_bytes: int = Field(default=512 * 1024 * 1024, ge=1)
    max_files_per_request: int = Field(default=100, ge=1, le=1000)
    max_image_pixels: int = Field(default=100_000_000, ge=1)
    thumbnail_size: int = Field(default=256, ge=16, le=2048)

    # Seconds between saves of the FAISS index after a change (it is also saved at shutdown).
    index_save_interval: float = Field(default=5.0, ge=0.0)
    # Worker threads for model, FAISS, decoding and hashing; 0 means the number of cores.
    executor_workers: int = Field(default=0, ge=0, le=64)

    @field_validator("storage_root")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.storage_root / 'organizer.db'}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
