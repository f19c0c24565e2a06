"""Settings read from the environment and an optional `.env` file."""

import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from backend.apikeys import KeyEntry, parse_entry
from backend.db import is_postgres, normalize_url
from ml.inference import PrecisionSetting, RuntimeSetting, plan

Device = Literal["auto", "cpu", "cuda", "mps"]


class Settings(BaseSettings):
    """Every knob of the service; `.env.example` lists them with their defaults."""

    # hide_input_in_errors: a bad API_KEYS entry may be a raw key pasted by mistake; it must not reach the log.
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", hide_input_in_errors=True
    )

    app_name: str = "AI Image Organizer"
    storage_root: Path = Path("storage")
    # Empty means: an SQLite file inside STORAGE_ROOT (and the FAISS index in memory: one process).
    # postgresql://user:pass@host:port/db, postgresql+asyncpg://..., or the socket form
    # postgresql://user@/db?host=/run/postgresql: everything in PostgreSQL with pgvector, and any number of
    # replicas on that database and one shared STORAGE_ROOT.
    database_url: str = ""
    # PostgreSQL: connections each process keeps per collection (as many again on demand).
    database_pool_size: int = Field(default=5, ge=1, le=100)
    # This process's name among the replicas (in /health and on the jobs it runs); empty: <host>:<pid>.
    replica_id: str = Field(default="", max_length=200)
    # PostgreSQL: a replica renews the lease of its jobs every third of this; another replica fails a job whose
    # lease ran out (its replica died) with the reason.
    job_lease_seconds: float = Field(default=30.0, ge=3.0, le=3600.0)
    # pgvector's HNSW index: graph degree and build-time candidates (see docs/performance.md), and the
    # candidates a search keeps (at least top_k); more is better recall and slower.
    pgvector_hnsw_m: int = Field(default=16, ge=2, le=100)
    pgvector_ef_construction: int = Field(default=64, ge=4, le=1000)
    pgvector_ef_search: int = Field(default=200, ge=1, le=1000)

    clip_model_name: str = "openai/clip-vit-base-patch32"
    clip_device: Device = "auto"
    # Load the model while the app starts (in the background); false loads it on first use.
    clip_preload: bool = True
    embed_batch_size: int = Field(default=32, ge=1, le=1024)
    # What runs CLIP: ONNX Runtime or PyTorch (auto: ONNX Runtime on the CPU, PyTorch on CUDA and MPS), and
    # at which precision (auto: fp32; bf16 needs AVX512_BF16 or AMX; int8 is refused, it missed its fidelity
    # bound). bf16 vectors are another model's to the catalog: changing to or from it re-embeds (POST /reindex).
    inference_runtime: RuntimeSetting = "auto"
    inference_precision: PrecisionSetting = "auto"
    # Where ONNX graphs exported from the model are kept between starts; empty: STORAGE_ROOT/models/onnx.
    model_cache_dir: str = ""

    max_upload_bytes: int = Field(default=50 * 1024 * 1024, ge=1)
    max_request_bytes: int = Field(default=512 * 1024 * 1024, ge=1)
    # Slow clients: a request's head must be complete this many seconds after the connection opened (or the
    # previous answer on it ended); its body may pause at most REQUEST_BODY_TIMEOUT seconds between two
    # pieces and must average at least REQUEST_MIN_RATE bytes a second once it has been arriving that long.
    request_header_timeout: float = Field(default=10.0, gt=0, le=3600)
    request_body_timeout: float = Field(default=20.0, gt=0, le=3600)
    request_min_rate: float = Field(default=1024.0, ge=0)
    max_files_per_request: int = Field(default=100, ge=1, le=1000)
    max_image_pixels: int = Field(default=100_000_000, ge=1)
    # Most memory one image may need while it is decoded, estimated from its size, mode and format before
    # anything is decoded (8 bytes a pixel at most for the accepted modes: 0.8 GB at MAX_IMAGE_PIXELS).
    max_decode_bytes: int = Field(default=1_000_000_000, ge=1)
    thumbnail_size: int = Field(default=256, ge=16, le=2048)

    # Seconds between saves of the FAISS index after a change (it is also saved at shutdown).
    index_save_interval: float = Field(default=5.0, ge=0.0)
    # From this many vectors on, search uses an approximate (IVF, fp16) index instead of an exact scan;
    # 0 keeps search exact at any size. A search reads this fraction of the approximate index's lists.
    index_approximate_from: int = Field(default=50_000, ge=0)
    index_probe_fraction: float = Field(default=0.25, gt=0.0, le=1.0)
    # Worker threads for model, FAISS, decoding and hashing; 0 means the number of cores.
    executor_workers: int = Field(default=0, ge=0, le=64)
    # How much lower the scheduling priority of bulk work (uploads, imports, clustering) is than that of
    # searches and of the request loop: added to the nice value of the bulk threads (0: same priority).
    bulk_niceness: int = Field(default=10, ge=0, le=19)

    # Clustering: k when a request gives none (a number, or "auto" to choose it by silhouette).
    kmeans_clusters: Annotated[int, Field(ge=1, le=1000)] | Literal["auto"] = 8
    kmeans_batch_size: int = Field(default=1024, ge=16, le=100_000)
    cluster_seed: int = Field(default=0, ge=0, le=2**31 - 1)
    # Largest k that k=auto tries.
    cluster_k_max: int = Field(default=20, ge=2, le=200)
    # Images per cluster that BLIP captions and that the API shows as its representatives.
    cluster_representatives: int = Field(default=4, ge=1, le=20)
    # Finished clustering runs kept in the database (older ones are deleted).
    cluster_runs_kept: int = Field(default=10, ge=1, le=1000)

    # BLIP captioning model: hub id or local directory; loaded on first use.
    blip_model_name: str = "Salesforce/blip-image-captioning-base"
    blip_device: Device = "auto"
    caption_batch_size: int = Field(default=8, ge=1, le=256)
    caption_max_tokens: int = Field(default=30, ge=1, le=200)
    # Caption every new image in a background job after it is stored (about 2 s per image on a CPU).
    caption_on_upload: bool = False

    # Zero-shot tags: comma-separated vocabulary (empty = the built-in list of everyday subjects and scenes).
    tag_vocabulary: Annotated[list[str], NoDecode] = Field(default_factory=list)
    tags_per_image: int = Field(default=3, ge=0, le=50)
    # Smallest share of the softmax over the vocabulary for a tag to be kept.
    tag_min_score: float = Field(default=0.1, ge=0.0, le=1.0)

    # Folders POST /images/import may read from (comma-separated); empty disables folder import.
    import_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    # Libraries (folders inside IMPORT_ROOTS indexed in place): follow the watched ones while running, and
    # scan every library at startup and every LIBRARY_RESCAN_INTERVAL seconds (what no event told: network
    # shares often send none). Files modified in the last LIBRARY_SETTLE_SECONDS wait for the next scan,
    # as they may still be written. LIBRARY_WATCH_POLLING polls instead of inotify (some network mounts).
    library_watch: bool = True
    library_rescan_interval: float = Field(default=3600.0, ge=5, le=30 * 86_400)
    library_settle_seconds: float = Field(default=2.0, ge=0, le=3600)
    library_watch_polling: bool = False
    # Duplicates (GET /duplicates). `same_picture`: the same picture re-encoded, resized, converted or slightly
    # cropped, when the perceptual hashes differ in at most DUPLICATES_HASH_DISTANCE of 64 bits AND the CLIP
    # cosine is at least DUPLICATES_SAME_COSINE (neither decides alone). `similar`: near-identical shots
    # (bursts) from DUPLICATES_SIMILAR_COSINE on, and when DUPLICATES_SIMILAR_WINDOW > 0 (seconds) only for
    # shots taken that close together. Each image is compared with its DUPLICATES_NEIGHBOURS nearest ones.
    duplicates_hash_distance: int = Field(default=16, ge=0, le=64)
    duplicates_same_cosine: float = Field(default=0.90, ge=-1.0, le=1.0)
    duplicates_similar_cosine: float = Field(default=0.88, ge=-1.0, le=1.01)
    duplicates_similar_window: float = Field(default=0.0, ge=0.0, le=365 * 86_400)
    duplicates_neighbours: int = Field(default=20, ge=1, le=200)
    # Trashed images (DELETE /images/{id}, resolved duplicates) are purged this many days later.
    trash_days: float = Field(default=30.0, ge=0, le=36_500)
    # Browser origins allowed to call the API (comma-separated, or * for any); empty = same origin only.
    # `null` (pages opened from disk, but also sandboxed frames of any site) needs API_KEYS.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Names the service answers to in the Host header (comma-separated; *.example.org for subdomains, * for
    # any). A request naming another host is refused, which defeats DNS rebinding. Behind a reverse proxy
    # or on the LAN, list the names and addresses clients use.
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["localhost", "127.0.0.1", "::1"])
    # API keys, as comma-separated `collection:sha256-of-key` entries (python -m backend.apikeys new NAME
    # makes one). Empty: no key is needed and everything is in the `default` collection. Otherwise every
    # route but /health, the page and the API docs needs an X-API-Key header, and each key sees only its
    # collection (`default` lives in STORAGE_ROOT, any other in STORAGE_ROOT/collections/<name>).
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Background jobs that run at the same time; the others wait in the queue.
    job_concurrency: int = Field(default=1, ge=1, le=16)
    # Jobs that may wait in each collection's queue; past it a new job is refused (429 too_many_jobs). A job
    # identical to one queued or running (same kind and parameters) is that job, not a new one.
    job_queue_limit: int = Field(default=20, ge=1, le=10_000)
    # Finished jobs are deleted this many days after they ended (0: kept for ever).
    job_retention_days: float = Field(default=30.0, ge=0, le=36_500)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _key_list(cls, value: object) -> object:
        if isinstance(value, str):
            entries = _split(value)
            if value.strip() and not entries:
                raise ValueError("API_KEYS is set but holds no entry: leave it empty to run without keys")
            return entries
        return value

    @field_validator("tag_vocabulary", "cors_origins", "import_roots", "allowed_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split(value) if isinstance(value, str) else value

    @field_validator("api_keys")
    @classmethod
    def _key_entries(cls, value: list[str]) -> list[str]:
        owner: dict[bytes, str] = {}
        for raw in value:
            entry = parse_entry(raw)  # raises, saying what is wrong
            other = owner.setdefault(entry.digest, entry.collection)
            if other != entry.collection:
                # The same key cannot open two collections: one of the two would silently become unreachable.
                raise ValueError(f"API_KEYS lists one key's digest for both {other!r} and {entry.collection!r}")
        return value

    @model_validator(mode="after")
    def _null_origin_needs_keys(self) -> "Settings":
        if "null" in self.cors_origins and not self.api_keys:
            raise ValueError(
                "CORS_ORIGINS=null admits pages opened from disk, and sandboxed frames of any web site too: set "
                "API_KEYS as well, so only a page with a key can use the API"
            )
        return self

    @property
    def key_entries(self) -> list[KeyEntry]:
        return [parse_entry(entry) for entry in self.api_keys]

    @field_validator("import_roots")
    @classmethod
    def _absolute_roots(cls, value: list[Path]) -> list[Path]:
        return [root.expanduser().resolve() for root in value]

    @field_validator("database_url")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        value = value.strip()
        if value:
            normalize_url(value)  # DatabaseUrlError (a ValueError) names what is wrong
        return value

    @field_validator("storage_root")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def onnx_cache(self) -> Path:
        if self.model_cache_dir.strip():
            return Path(self.model_cache_dir.strip()).expanduser().resolve()
        return self.storage_root / "models" / "onnx"

    @property
    def embedding_model(self) -> str:
        """The catalog's key for the vectors the current CLIP settings make: the model name, marked with the
        precision when it is not full precision (InferenceConfigError when the settings cannot run here)."""
        return _plan(self.clip_model_name, self.clip_device, self.inference_runtime, self.inference_precision)

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return normalize_url(self.database_url)
        return f"sqlite+aiosqlite:///{self.storage_root / 'organizer.db'}"

    @property
    def uses_postgres(self) -> bool:
        return bool(self.database_url) and is_postgres(self.database_url)

    @property
    def database_backend(self) -> str:
        return "postgresql" if self.uses_postgres else "sqlite"

    @property
    def replica(self) -> str:
        return self.replica_id.strip() or f"{socket.gethostname()}:{os.getpid()}"


def _split(value: str) -> list[str]:
    """A comma-separated setting's items, stripped, empty ones left out."""
    return [item.strip() for item in value.split(",") if item.strip()]


@lru_cache
def _plan(model_name: str, device: str, runtime: RuntimeSetting, precision: PrecisionSetting) -> str:
    from ml.embedder import resolve_device  # imports torch: only once the plan is asked for

    return plan(model_name, resolve_device(device), runtime, precision).embedding_model


@lru_cache
def get_settings() -> Settings:
    return Settings()
