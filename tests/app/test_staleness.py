"""A running job whose worker stopped responding says so (API, SSE snapshot, job page) instead of a stale ETA."""
from __future__ import annotations

import datetime as dt
import io
import zipfile

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from support.paths import HYMENOPTERA

from app.api.routes.jobs import _snapshot
from app.core.settings import Settings
from app.db.migrate import run_migrations
from app.db.models import Job
from app.db.session import engine_for
from app.main import create_app
from app.services import auth
from app.services.jobs import STALE_NOTE, staleness

NOW = dt.datetime(2026, 1, 2, 12, 0, 0, tzinfo=dt.UTC)
SETTINGS = Settings(_env_file=None, heartbeat_timeout_s=60)


def _job(status: str, heartbeat_age_s: float | None, started_age_s: float | None = 300,
         created_age_s: float = 600, naive: bool = False) -> Job:
    def ago(s: float | None) -> dt.datetime | None:
        if s is None:
            return None
        t = NOW - dt.timedelta(seconds=s)
        return t.replace(tzinfo=None) if naive else t  # SQLite hands back naive UTC times

    return Job(status=status, heartbeat_at=ago(heartbeat_age_s), started_at=ago(started_age_s),
               created_at=ago(created_age_s))


@pytest.mark.parametrize("naive", [False, True])
def test_running_with_an_old_heartbeat_is_stale(naive):
    assert staleness(_job("running", 61, naive=naive), SETTINGS, NOW) == (True, STALE_NOTE)
    assert STALE_NOTE == "its worker stopped responding; it will resume when a worker takes it"


@pytest.mark.parametrize("naive", [False, True])
def test_running_with_a_fresh_heartbeat_is_not(naive):
    assert staleness(_job("running", 5, naive=naive), SETTINGS, NOW) == (False, None)
    assert staleness(_job("running", 59, naive=naive), SETTINGS, NOW) == (False, None)


def test_no_heartbeat_yet_counts_from_the_start_then_the_creation():
    assert staleness(_job("running", None, started_age_s=10), SETTINGS, NOW) == (False, None)
    assert staleness(_job("running", None, started_age_s=100), SETTINGS, NOW) == (True, STALE_NOTE)
    assert staleness(_job("running", None, started_age_s=None, created_age_s=30), SETTINGS, NOW) == (False, None)
    assert staleness(_job("running", None, started_age_s=None, created_age_s=90), SETTINGS, NOW) == (True, STALE_NOTE)


@pytest.mark.parametrize("status", ["queued", "succeeded", "failed", "cancelled"])
def test_only_running_jobs_are_stale(status):
    assert staleness(_job(status, 10_000), SETTINGS, NOW) == (False, None)


def test_the_timeout_is_the_setting():
    job = _job("running", 61)
    assert staleness(job, Settings(_env_file=None, heartbeat_timeout_s=120), NOW) == (False, None)
    assert staleness(job, Settings(_env_file=None, heartbeat_timeout_s=6), NOW)[0] is True


# ---------------------------------------------------------------- through the app, on a real SQLite database


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for split in ("train", "val"):
            for cls in ("ants", "bees"):
                for f in sorted((HYMENOPTERA / split / cls).glob("*.jpg"))[:3]:
                    zf.write(f, f"{split}/{cls}/{f.name}")
    return buf.getvalue()


def test_api_snapshot_and_page_show_the_note(tmp_path):
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", heartbeat_timeout_s=60)
    settings.ensure_dirs()
    run_migrations(settings.db_url)
    app = create_app(settings)
    with app.state.sessions() as s:
        user = auth.ensure_user(s, "alice")
        api_token = auth.create_token(s, user, "t")
        login = auth.create_token(s, user, "x", kind="login")
    try:
        with TestClient(app, headers={"Authorization": f"Bearer {api_token}"}) as c:
            r = c.post("/api/v1/datasets", data={"name": "tiny"},
                       files={"file": ("tiny.zip", _zip(), "application/zip")})
            assert r.status_code == 201, r.text
            job = c.post("/api/v1/jobs", json={"dataset_id": r.json()["id"], "epochs": 3}).json()
            jid = job["id"]
            assert job["stale"] is False and job["status_note"] is None  # queued

            def set_running(heartbeat_age_s: float) -> None:
                now = dt.datetime.now(dt.UTC)
                with app.state.sessions() as s:
                    s.execute(update(Job).where(Job.id == jid).values(
                        status="running", attempts=1, started_at=now - dt.timedelta(seconds=600),
                        heartbeat_at=now - dt.timedelta(seconds=heartbeat_age_s), eta_seconds=780.0,
                        current_epoch=1, progress=0.3))
                    s.commit()

            set_running(5)
            out = c.get(f"/api/v1/jobs/{jid}").json()
            assert out["status"] == "running" and out["stale"] is False and out["status_note"] is None
            set_running(3600)
            out = c.get(f"/api/v1/jobs/{jid}").json()
            assert out["stale"] is True and out["status_note"] == STALE_NOTE
            listed = {j["id"]: j for j in c.get("/api/v1/jobs").json()}
            assert listed[jid]["stale"] is True and listed[jid]["status_note"] == STALE_NOTE
            with app.state.sessions() as s:
                snap = _snapshot(s.get(Job, jid), settings)
            assert snap["stale"] is True and snap["status_note"] == STALE_NOTE and snap["status"] == "running"

        with TestClient(app) as browser:
            r = browser.get(f"/login?token={login}", follow_redirects=False)
            assert r.status_code == 303
            html = browser.get(f"/jobs/{jid}").text
            assert f'<span id="eta-text" class="status-note" role="status">{STALE_NOTE}</span>' in html, html
            set_running(5)
            html = browser.get(f"/jobs/{jid}").text
            assert STALE_NOTE not in html and '<span id="eta-text">about 13 min 00 s left</span>' in html
    finally:
        engine_for(settings.db_url).dispose()
