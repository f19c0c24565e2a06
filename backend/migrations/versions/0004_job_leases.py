"""Jobs carry the replica that runs them and its lease (several replicas on one PostgreSQL database).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

from backend.dbtypes import UtcDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job") as batch:
        batch.add_column(sa.Column("owner", sa.String(200)))
        batch.add_column(sa.Column("lease_until", UtcDateTime))


def downgrade() -> None:
    with op.batch_alter_table("job") as batch:
        batch.drop_column("lease_until")
        batch.drop_column("owner")
