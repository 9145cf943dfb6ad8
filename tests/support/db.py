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
