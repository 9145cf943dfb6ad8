"""Multi-label datasets: a dataset records its task (`multiclass`, every dataset so far, or `multilabel`: a
labels.csv manifest) and, for multi-label, its label statistics (labels per image, images with no label, the
co-occurrence of labels). Downgrade drops the columns.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("task", sa.String(16), nullable=False, server_default="multiclass"))
        batch.add_column(sa.Column("label_stats", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("label_stats")
        batch.drop_column("task")
