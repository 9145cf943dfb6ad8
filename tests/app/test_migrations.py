"""The Alembic migrations on SQLite and PostgreSQL: they build exactly the schema of app.db.models, and
they go down and up again cleanly."""
from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, MetaData, String, create_engine, inspect
from sqlalchemy.pool import NullPool
from support.db import db_url  # noqa: F401  (the parametrized sqlite/postgres fixture)

from app.db.migrate import ROOT, run_migrations
from app.db.models import Base

TABLES = {"users", "api_tokens", "datasets", "jobs", "epoch_metrics", "job_events", "artifacts", "workspaces",
          "memberships", "sign_in_failures"}


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def tables(engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def schema_differences(engine, metadata: MetaData = Base.metadata) -> list:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        return compare_metadata(ctx, metadata)


def foreign_keys(engine) -> set[tuple]:
    insp = inspect(engine)
    out = set()
    for t in TABLES:
        for fk in insp.get_foreign_keys(t):
            out.add((t, tuple(fk["constrained_columns"]), fk["referred_table"],
                     (fk.get("options") or {}).get("ondelete", "").upper() or None))
    return out


def model_foreign_keys() -> set[tuple]:
    return {(t.name, tuple(c.name for c in fk.columns), fk.referred_table.name,
             fk.ondelete.upper() if fk.ondelete else None)
            for t in Base.metadata.tables.values() for fk in t.foreign_key_constraints}


def test_one_linear_history():
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1, script.get_heads()
    assert len(script.get_bases()) == 1, script.get_bases()


def test_migrations_match_the_models_and_round_trip(db_url):  # noqa: F811
    assert set(Base.metadata.tables) == TABLES
    engine = create_engine(db_url, poolclass=NullPool)
    cfg = alembic_config(db_url)
    head = ScriptDirectory.from_config(cfg).get_current_head()
    try:
        run_migrations(db_url)
        assert tables(engine) == TABLES | {"alembic_version"}
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == head
        assert schema_differences(engine) == []
        # the comparison does see differences: a model with one more column is not the database
        changed = MetaData()
        for t in Base.metadata.tables.values():
            t.to_metadata(changed)
        changed.tables["jobs"].append_column(Column("extra", String(10), nullable=True))
        assert [d[0] for d in schema_differences(engine, changed)] == ["add_column"]
        assert foreign_keys(engine) == model_foreign_keys()

        command.downgrade(cfg, "base")
        assert tables(engine) <= {"alembic_version"}
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() is None

        command.upgrade(cfg, "head")
        assert tables(engine) == TABLES | {"alembic_version"}
        assert schema_differences(engine) == []
        run_migrations(db_url)  # at head already: nothing to do, no error
    finally:
        engine.dispose()


def test_unreachable_postgres_skips_locally_and_fails_on_ci(tmp_path):
    """The db_url fixture itself: without PostgreSQL the postgres variant must not pass silently on CI."""
    import os
    import subprocess
    import sys

    (tmp_path / "test_pg.py").write_text("from support.db import db_url  # noqa\n\n"
                                         "def test_x(db_url):\n    assert db_url\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(GRAFT_TEST_PG_URL="postgresql+psycopg://postgres@127.0.0.1:1/test",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider", str(tmp_path / "test_pg.py")]
    local = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert local.returncode == 0 and "1 passed, 1 skipped" in local.stdout, local.stdout + local.stderr
    assert "PostgreSQL is not reachable" in local.stdout
    ci = subprocess.run(cmd, cwd=tmp_path, env={**env, "CI": "true"}, capture_output=True, text=True, timeout=60)
    assert ci.returncode == 1 and "1 passed, 1 error" in ci.stdout, ci.stdout + ci.stderr
    assert "PostgreSQL is not reachable" in ci.stdout and "must run on CI" in ci.stdout


def test_datasets_made_before_0006_are_multiclass(db_url):  # noqa: F811
    """0006 gives every existing dataset task 'multiclass' and no label statistics, and goes down and up again
    with the rows kept (SQLite rebuilds the table)."""
    from sqlalchemy import text
    from sqlalchemy.orm import Session

    from app.services import auth

    engine = create_engine(db_url, poolclass=NullPool)
    cfg = alembic_config(db_url)
    try:
        run_migrations(db_url)
        with Session(engine) as s:
            user = auth.create_user(s, "old")
            uid, wid = user.id, s.execute(text("SELECT id FROM workspaces")).scalar_one()

        def insert(conn, name: str) -> None:
            conn.execute(text("INSERT INTO datasets (owner_id, workspace_id, name, path, layout, classes, counts, "
                              "warnings, num_images, size_bytes, created_at) VALUES (:u, :w, :n, 'datasets/x/y', "
                              "'', '[]', '{}', '[]', 0, 0, CURRENT_TIMESTAMP)"), {"u": uid, "w": wid, "n": name})

        with engine.begin() as conn:
            insert(conn, "at head")  # the columns' server default
        command.downgrade(cfg, "0005")
        with engine.connect() as conn:
            assert "task" not in {c["name"] for c in inspect(conn).get_columns("datasets")}
        with engine.begin() as conn:
            insert(conn, "before 0006")
        command.upgrade(cfg, "head")
        with engine.connect() as conn:
            got = conn.execute(text("SELECT name, task, label_stats FROM datasets ORDER BY id")).all()
        assert [tuple(r) for r in got] == [("at head", "multiclass", None), ("before 0006", "multiclass", None)]
        assert schema_differences(engine) == []
    finally:
        engine.dispose()
