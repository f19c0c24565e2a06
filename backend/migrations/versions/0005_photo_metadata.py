"""Images carry what their EXIF says about time, place and camera; the date taken is indexed for sorting.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

COLUMNS = (
    ("taken_at_offset", sa.String(6)),
    ("latitude", sa.Float),
    ("longitude", sa.Float),
    ("altitude", sa.Float),
    ("camera_make", sa.String(100)),
    ("camera_model", sa.String(100)),
    ("lens", sa.String(100)),
)


def upgrade() -> None:
    with op.batch_alter_table("image") as batch:
        for name, kind in COLUMNS:
            batch.add_column(sa.Column(name, kind))
    op.create_index("ix_image_taken_at", "image", ["taken_at"])
    op.create_index("ix_image_latitude", "image", ["latitude"])


def downgrade() -> None:
    op.drop_index("ix_image_latitude", "image")
    op.drop_index("ix_image_taken_at", "image")
    with op.batch_alter_table("image") as batch:
        for name, _ in reversed(COLUMNS):
            batch.drop_column(name)
