"""Libraries: folders indexed in place, their files, and where an image's original lies in one.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

from backend.dbtypes import UtcDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "library",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("path", sa.String, nullable=False, unique=True),
        sa.Column("watch", sa.Boolean, nullable=False),
        sa.Column("online", sa.Boolean, nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("scanned_at", UtcDateTime),
        sa.Column("last_error", sa.String),
        sqlite_autoincrement=True,
    )
    # Plain ADD COLUMNs (SQLite has them): a batch copy of `image` would drop it first, and its tags and
    # cluster memberships with it (ON DELETE CASCADE).
    op.add_column("image", sa.Column("library_id", sa.Integer))
    op.add_column("image", sa.Column("path", sa.String))
    op.add_column("image", sa.Column("offline", sa.Boolean, nullable=False, server_default=sa.false()))
    op.create_index("ix_image_library_id", "image", ["library_id"])
    op.create_table(
        "library_file",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("library_id", sa.Integer, sa.ForeignKey("library.id", ondelete="CASCADE"), nullable=False),
        sa.Column("path", sa.String, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("mtime_ns", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("image_id", sa.Integer, sa.ForeignKey("image.id", ondelete="CASCADE"), nullable=False),
    )
    op.create_index("ux_library_file_path", "library_file", ["library_id", "path"], unique=True)
    op.create_index("ix_library_file_image_id", "library_file", ["image_id"])


def downgrade() -> None:
    op.drop_table("library_file")
    op.drop_index("ix_image_library_id", "image")
    with op.batch_alter_table("image") as batch:
        batch.drop_column("offline")
        batch.drop_column("path")
        batch.drop_column("library_id")
    op.drop_table("library")
