"""Version 2: captions on images; tags, jobs and clustering runs.

The hand-written schema created new tables with `create_all` at every start, so a database stamped from
its version 1 may hold some of these tables already: each is created only where it is missing.

Revision ID: 0002
Revises: 0001
"""

import warnings

import sqlalchemy as sa
from alembic import op

from backend.dbtypes import UtcDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    # The schema named: without it PostgreSQL lists every table the search path sees, public's included.
    tables = set(inspector.get_table_names(schema=inspector.default_schema_name))
    with warnings.catch_warnings():  # SQLAlchemy does not know pgvector's type: a warning, and no matter here
        warnings.simplefilter("ignore", sa.exc.SAWarning)
        found = inspector.get_columns("image", schema=inspector.default_schema_name)
    columns = {column["name"] for column in found}
    with op.batch_alter_table("image") as batch:
        if "caption" not in columns:
            batch.add_column(sa.Column("caption", sa.String))
        if "caption_model" not in columns:
            batch.add_column(sa.Column("caption_model", sa.String))
    if "image_tag" not in tables:
        op.create_table(
            "image_tag",
            sa.Column("image_id", sa.Integer, sa.ForeignKey("image.id", ondelete="CASCADE"), primary_key=True),
            sa.Column("tag", sa.String, primary_key=True),
            sa.Column("score", sa.Float, nullable=False),
        )
        op.create_index("ix_image_tag_tag", "image_tag", ["tag"])
    if "job" not in tables:
        op.create_table(
            "job",
            sa.Column("id", sa.String(32), primary_key=True),
            sa.Column("kind", sa.String, nullable=False),
            sa.Column("status", sa.String, nullable=False),
            sa.Column("params", sa.JSON, nullable=False),
            sa.Column("progress_done", sa.Integer, nullable=False),
            sa.Column("progress_total", sa.Integer),
            sa.Column("message", sa.String),
            sa.Column("cancel_requested", sa.Boolean, nullable=False),
            sa.Column("result", sa.JSON),
            sa.Column("error", sa.String),
            sa.Column("created_at", UtcDateTime, nullable=False),
            sa.Column("started_at", UtcDateTime),
            sa.Column("finished_at", UtcDateTime),
        )
        op.create_index("ix_job_kind", "job", ["kind"])
        op.create_index("ix_job_status", "job", ["status"])
        op.create_index("ix_job_created_at", "job", ["created_at"])
    if "cluster_run" not in tables:
        op.create_table(
            "cluster_run",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("job_id", sa.String),
            sa.Column("created_at", UtcDateTime, nullable=False),
            sa.Column("embedding_model", sa.String, nullable=False),
            sa.Column("k", sa.Integer, nullable=False),
            sa.Column("k_requested", sa.Integer),
            sa.Column("seed", sa.Integer, nullable=False),
            sa.Column("image_count", sa.Integer, nullable=False),
            sa.Column("silhouette", sa.Float),
            sa.Column("captions", sa.Boolean, nullable=False),
            sa.Column("caption_model", sa.String),
            sa.Column("caption_error", sa.String),
            sqlite_autoincrement=True,
        )
    if "cluster" not in tables:
        op.create_table(
            "cluster",
            sa.Column("run_id", sa.Integer, sa.ForeignKey("cluster_run.id", ondelete="CASCADE"), primary_key=True),
            sa.Column("cluster_id", sa.Integer, primary_key=True),
            sa.Column("size", sa.Integer, nullable=False),
            sa.Column("caption", sa.String),
            sa.Column("representative_ids", sa.JSON, nullable=False),
        )
    if "cluster_member" not in tables:
        op.create_table(
            "cluster_member",
            sa.Column("run_id", sa.Integer, sa.ForeignKey("cluster_run.id", ondelete="CASCADE"), primary_key=True),
            sa.Column("image_id", sa.Integer, sa.ForeignKey("image.id", ondelete="CASCADE"), primary_key=True),
            sa.Column("cluster_id", sa.Integer, nullable=False),
            sa.Column("rank", sa.Integer, nullable=False),
            sa.Column("distance", sa.Float, nullable=False),
        )
        op.create_index("ix_cluster_member_order", "cluster_member", ["run_id", "cluster_id", "rank"])
        op.create_index("ix_cluster_member_image_id", "cluster_member", ["image_id"])


def downgrade() -> None:
    for table in ("cluster_member", "cluster", "cluster_run", "job", "image_tag"):
        op.drop_table(table)
    with op.batch_alter_table("image") as batch:
        batch.drop_column("caption_model")
        batch.drop_column("caption")
