"""Accounts and shared workspaces: users get passwords (argon2id), an admin flag, a disabled flag, an e-mail
and a single-sign-on link; workspaces with members and roles; datasets and jobs belong to a workspace; failed
sign-ins are counted for the throttle.

Existing datasets and jobs move into their owners' personal workspaces (one per user, the user its owner).
Downgrade drops the workspaces again (datasets and jobs keep their owner_id, so nothing is lost). The user
named by GRAFT_DEFAULT_USER (default "admin"), or the first user, becomes an admin.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""
import os

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("password_hash", sa.String(255), nullable=True))
        batch.add_column(sa.Column("is_admin", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("disabled", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("email", sa.String(254), nullable=True))
        batch.add_column(sa.Column("oidc_issuer", sa.String(500), nullable=True))
        batch.add_column(sa.Column("oidc_subject", sa.String(255), nullable=True))
        batch.create_unique_constraint("uq_users_email", ["email"])
    op.create_table(
        "workspaces",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("personal_user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=True,
                  unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "memberships",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("workspace_id", sa.Integer(), sa.ForeignKey("workspaces.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("workspace_id", "user_id"),
    )
    op.create_table(
        "sign_in_failures",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("username", sa.String(100), nullable=False, index=True),
        sa.Column("address", sa.String(64), nullable=False, index=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    )
    for table in ("datasets", "jobs"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("workspace_id", sa.Integer(), nullable=True))

    # every user's personal workspace, with the user as its owner; their datasets and jobs move into it
    conn = op.get_bind()
    users = sa.table("users", sa.column("id", sa.Integer()), sa.column("name", sa.String()),
                     sa.column("is_admin", sa.Boolean()), sa.column("created_at", sa.DateTime(timezone=True)))
    workspaces = sa.table("workspaces", sa.column("id", sa.Integer()), sa.column("name", sa.String()),
                          sa.column("personal_user_id", sa.Integer()),
                          sa.column("created_at", sa.DateTime(timezone=True)))
    memberships = sa.table("memberships", sa.column("workspace_id", sa.Integer()), sa.column("user_id", sa.Integer()),
                           sa.column("role", sa.String()), sa.column("created_at", sa.DateTime(timezone=True)))
    rows = conn.execute(sa.select(users.c.id, users.c.name, users.c.created_at).order_by(users.c.id)).all()
    for uid, name, created in rows:
        conn.execute(workspaces.insert().values(name=name[:100], personal_user_id=uid, created_at=created))
        wid = conn.execute(sa.select(workspaces.c.id).where(workspaces.c.personal_user_id == uid)).scalar_one()
        conn.execute(memberships.insert().values(workspace_id=wid, user_id=uid, role="owner", created_at=created))
        for table in ("datasets", "jobs"):
            t = sa.table(table, sa.column("owner_id", sa.Integer()), sa.column("workspace_id", sa.Integer()))
            conn.execute(t.update().where(t.c.owner_id == uid).values(workspace_id=wid))
    if rows:
        admin = os.environ.get("GRAFT_DEFAULT_USER", "admin")
        named = [uid for uid, name, _ in rows if name == admin]
        conn.execute(users.update().where(users.c.id == (named[0] if named else rows[0][0])).values(is_admin=True))

    for table in ("datasets", "jobs"):
        with op.batch_alter_table(table) as batch:
            batch.alter_column("workspace_id", existing_type=sa.Integer(), nullable=False)
            batch.create_foreign_key(f"fk_{table}_workspace", "workspaces", ["workspace_id"], ["id"],
                                     ondelete="CASCADE")
            batch.create_index(f"ix_{table}_workspace_id", ["workspace_id"])


def downgrade() -> None:
    for table in ("datasets", "jobs"):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_workspace_id")
            batch.drop_constraint(f"fk_{table}_workspace", type_="foreignkey")
            batch.drop_column("workspace_id")
    op.drop_table("sign_in_failures")
    op.drop_table("memberships")
    op.drop_table("workspaces")
    with op.batch_alter_table("users") as batch:
        batch.drop_constraint("uq_users_email", type_="unique")
        for column in ("oidc_subject", "oidc_issuer", "email", "disabled", "is_admin", "password_hash"):
            batch.drop_column(column)
