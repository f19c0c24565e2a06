"""Column types that mean the same on SQLite and PostgreSQL.

- `UtcDateTime`: UTC instants stored without a zone (SQLite has none; asyncpg refuses an aware value for
  `timestamp`) and read back aware, in UTC, so the API writes them with their offset (RFC 3339).
- `Embedding`: an image's CLIP vector. The Python side is always the little-endian float32 blob the services
  use; SQLite stores that blob, PostgreSQL a pgvector `vector`, which its HNSW index and search work on.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import DateTime, LargeBinary
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine, UserDefinedType


class UtcDateTime(TypeDecorator[datetime]):
    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class PgVector(UserDefinedType[bytes]):
    """pgvector's `vector`, without a fixed dimension. The values pass through as the float32 blob; the
    asyncpg codec (`vector_codec`) turns them into pgvector's binary format and back."""

    cache_ok = True

    def get_col_spec(self, **_kw: Any) -> str:
        return "vector"


class Embedding(TypeDecorator[bytes]):
    impl = LargeBinary
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(PgVector())
        return dialect.type_descriptor(LargeBinary())


def encode_vector(blob: bytes) -> bytes:
    """The little-endian float32 blob as pgvector's binary input: dimension, reserved, big-endian floats."""
    vector = np.frombuffer(blob, dtype="<f4")
    return struct.pack(">HH", len(vector), 0) + vector.astype(">f4").tobytes()


def decode_vector(data: bytes) -> bytes:
    dim, _ = struct.unpack_from(">HH", data)
    return np.frombuffer(data, dtype=">f4", count=dim, offset=4).astype("<f4").tobytes()
