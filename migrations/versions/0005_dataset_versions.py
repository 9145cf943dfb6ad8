"""Dataset versions: a dataset made from another by relabelling, removing or adding images records its
parent, its lineage (the first dataset of the family) and its version number (1 for an upload), and what
changed. Downgrade drops the columns (the versions stay as ordinary datasets).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("parent_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("lineage_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("version", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("changes", sa.JSON(), nullable=True))
        batch.create_foreign_key("fk_datasets_parent_id", "datasets", ["parent_id"], ["id"], ondelete="RESTRICT")
        batch.create_index("ix_datasets_parent_id", ["parent_id"])
        batch.create_index("ix_datasets_lineage_id", ["lineage_id"])


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_index("ix_datasets_lineage_id")
        batch.drop_index("ix_datasets_parent_id")
        batch.drop_constraint("fk_datasets_parent_id", type_="foreignkey")
        batch.drop_column("changes")
        batch.drop_column("version")
        batch.drop_column("lineage_id")
        batch.drop_column("parent_id")
