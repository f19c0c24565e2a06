"""The first schema (the hand-written version 1): images and their vectors.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from backend.dbtypes import Embedding, UtcDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # Every collection's schema finds it in public (search_path "<collection>, public").
        op.execute("CREATE EXTENSION IF NOT EXISTS vector WITH SCHEMA public")
    op.create_table(
        "image",
        sa.Column("filename", sa.String, nullable=False),
        sa.Column("content_type", sa.String, nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("taken_at", sa.DateTime),
        sa.Column("embedding_model", sa.String, nullable=False),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("format", sa.String, nullable=False),
        sa.Column("storage_key", sa.String, nullable=False),
        sa.Column("thumbnail_key", sa.String, nullable=False),
        sa.Column("embedding_dim", sa.Integer, nullable=False),
        sa.Column("embedding", Embedding, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_image_created_at", "image", ["created_at"])
    op.create_index("ix_image_embedding_model", "image", ["embedding_model"])
    op.create_index("ix_image_sha256", "image", ["sha256"], unique=True)


def downgrade() -> None:
    op.drop_table("image")
