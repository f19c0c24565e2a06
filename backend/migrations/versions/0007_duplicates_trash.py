"""Duplicates and the trash: a perceptual hash and a trashed-at date per image, the pairs a duplicates scan
found, keep-all decisions, and the library files whose purged bytes a scan must not index again.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

from backend.dbtypes import UtcDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMNs, as in 0006: a batch copy of `image` would cascade-delete its tags and memberships.
    op.add_column("image", sa.Column("phash", sa.String(16)))
    op.add_column("image", sa.Column("trashed_at", UtcDateTime))
    op.create_index("ix_image_trashed_at", "image", ["trashed_at"])
    op.create_table(
        "duplicate_pair",
        sa.Column("image_a", sa.Integer, sa.ForeignKey("image.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("image_b", sa.Integer, sa.ForeignKey("image.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("cosine", sa.Float, nullable=False),
        sa.Column("hash_distance", sa.Integer),
    )
    op.create_index("ix_duplicate_pair_image_b", "duplicate_pair", ["image_b"])
    op.create_table(
        "duplicate_decision",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tier", sa.String(20), nullable=False),
        sa.Column("image_ids", sa.JSON, nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "library_dismissed",
        sa.Column("library_id", sa.Integer, sa.ForeignKey("library.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("sha256", sa.String(64), primary_key=True),
    )


def downgrade() -> None:
    op.drop_table("library_dismissed")
    op.drop_table("duplicate_decision")
    op.drop_table("duplicate_pair")
    op.drop_index("ix_image_trashed_at", "image")
    with op.batch_alter_table("image") as batch:
        batch.drop_column("trashed_at")
        batch.drop_column("phash")
