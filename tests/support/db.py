"""Real databases for the API and migration tests: a SQLite file, or a fresh PostgreSQL database that is
dropped afterwards. Import the `db_url` fixture into a test module (`from dbfixtures import db_url`).

PostgreSQL is expected at GRAFT_TEST_PG_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test;
the fixture creates and drops its own databases through it). When it cannot be reached, the postgres
variant is skipped locally and fails on CI (CI=true), so a CI without a database cannot pass silently.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

PG_ADMIN_URL = os.environ.get("GRAFT_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

_pg_problem: list[str] = []  # remembered once per session: one connection timeout is enough


def _admin_engine():
    return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool,
                         connect_args={"connect_timeout": 3})


def _pg_unreachable(reason: str) -> None:
    msg = (f"PostgreSQL is not reachable at {make_url(PG_ADMIN_URL).render_as_string(hide_password=True)} "
           f"({reason}); start it or set GRAFT_TEST_PG_URL")
    if os.environ.get("CI") == "true":
        pytest.fail(f"{msg}: the postgres tests must run on CI", pytrace=False)
    pytest.skip(msg)


def _dispose_cached_engine(url: str) -> None:
    """The app caches one engine per URL (app.db.session.engine_for): close its pooled connections."""
    from app.db.session import engine_for

    engine_for(url).dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> Iterator[str]:
    """A URL to an empty database, of each kind in turn."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'graft-test.db'}"
        yield url
        _dispose_cached_engine(url)
        return
    if _pg_problem:
        _pg_unreachable(_pg_problem[0])
    name = f"graft_test_{uuid.uuid4().hex[:12]}"
    admin = _admin_engine()
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:  # noqa: BLE001 - any connection problem means "no PostgreSQL here"
        admin.dispose()
        _pg_problem.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if _pg_problem:  # outside the except block: a clear message, not a chain of tracebacks
        _pg_unreachable(_pg_problem[0])
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        _dispose_cached_engine(url)
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = :n AND pid <> pg_backend_pid()"), {"n": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def queued_job(tmp_path, spec: dict, user: str = "tester"):
    """A migrated SQLite database under tmp_path with one user, one dataset row and one queued job of `spec`
    (task id "task-1"): yields (settings, session factory, job id); the engine is disposed afterwards."""
    from app.core.settings import Settings
    from app.db.migrate import run_migrations
    from app.db.models import Dataset, Job, User
    from app.db.session import engine_for, session_factory

    settings = Settings(_env_file=None, data_dir=tmp_path / "data")
    settings.ensure_dirs()
    run_migrations(settings.db_url)
    S = session_factory(settings.db_url)
    with S() as s:
        u = User(name=user)
        s.add(u)
        s.flush()
        ds = Dataset(owner_id=u.id, name="d", path="datasets/d")
        s.add(ds)
        s.flush()
        job = Job(owner_id=u.id, dataset_id=ds.id, spec=spec, status="queued", celery_task_id="task-1")
        s.add(job)
        s.commit()
        jid = job.id
    yield settings, S, jid
    engine_for(settings.db_url).dispose()


def job_messages(S, jid: int) -> list[str]:
    """The job's "message" events, oldest first."""
    from sqlalchemy import select

    from app.db.models import JobEvent

    with S() as s:
        return [e.data["message"] for e in s.scalars(select(JobEvent).where(JobEvent.job_id == jid,
                                                                             JobEvent.kind == "message"))]
