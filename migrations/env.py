"""Alembic environment: the URL comes from Graft's settings unless the caller set one."""
from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from app.db.models import Base

config = context.config
url = config.get_main_option("sqlalchemy.url")
if not url:
    from app.core.settings import get_settings

    url = get_settings().db_url


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    if url.startswith("sqlite"):
        # SQLite alters a table by copying it into a new one and dropping the old (Alembic's batch mode):
        # with foreign keys enforced, dropping `users` would cascade into every table that refers to it.
        # So migrate with them off, as SQLite's documentation says, and check them all afterwards.
        engine = create_engine(url, poolclass=pool.NullPool, connect_args={"timeout": 30})
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.exec_driver_sql("PRAGMA busy_timeout=30000")
            conn.commit()  # (the pragmas run outside SQLite's transaction; this ends SQLAlchemy's)
            context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
            conn.commit()
            broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"the migration left rows whose foreign keys point nowhere: {broken[:5]}")
        engine.dispose()
        return
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
