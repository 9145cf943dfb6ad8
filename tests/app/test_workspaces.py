"""Shared workspaces on a real database (SQLite and PostgreSQL): admins create them, owners manage members
and roles, uploads go where they are asked to, the dashboard follows the switcher; and the migration that
moved existing data into personal workspaces, both ways."""
from __future__ import annotations

import pytest
from alembic import command
from alembic.config import Config
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select, text
from support.db import db_url  # noqa: F401  (fixture: sqlite and postgres)
from support.web import csrf_of, dataset_zip, make_app

from app.db.migrate import MIGRATIONS
from app.services import auth


def bearer(app, name: str, admin: bool = False) -> dict[str, str]:
    with app.state.sessions() as s:
        user = auth.create_user(s, name, admin=admin)
        return {"Authorization": f"Bearer {auth.create_token(s, user, 'tests')}"}


def browser(app, name: str) -> TestClient:
    c = TestClient(app)
    with app.state.sessions() as s:
        link = auth.create_token(s, auth.get_user(s, name), "link", kind="login", ttl=auth.LOGIN_TTL)
    assert c.get(f"/login?token={link}", follow_redirects=False).status_code == 303
    return c


@pytest.fixture
def team(tmp_path, db_url):  # noqa: F811
    app, _ = make_app(tmp_path / "data", db_url)
    root, bob, carol = bearer(app, "root", admin=True), bearer(app, "bob"), bearer(app, "carol")
    return TestClient(app), app, root, bob, carol


def test_admins_create_shared_workspaces_and_owners_manage_members(team):
    c, app, root, bob, carol = team
    mine = c.get("/api/v1/workspaces", headers=bob).json()
    assert [(w["name"], w["personal"], w["role"]) for w in mine] == [("bob", True, "owner")]
    r = c.post("/api/v1/workspaces", headers=bob, json={"name": "vision"})
    assert r.status_code == 403 and "only admins" in r.json()["error"]["message"]
    r = c.post("/api/v1/workspaces", headers=root, json={"name": "vision"})
    assert r.status_code == 201 and r.json()["role"] == "owner"
    wid = r.json()["id"]
    # members and roles
    r = c.post(f"/api/v1/workspaces/{wid}/members", headers=root, json={"username": "bob", "role": "editor"})
    assert r.status_code == 200 and r.json()["role"] == "editor"
    r = c.post(f"/api/v1/workspaces/{wid}/members", headers=root, json={"username": "bob", "role": "boss"})
    assert r.status_code == 422
    r = c.post(f"/api/v1/workspaces/{wid}/members", headers=root, json={"username": "nobody", "role": "viewer"})
    assert r.status_code == 404 and "invites them first" in r.json()["error"]["message"]
    # an editor does not manage members; an owner does
    r = c.post(f"/api/v1/workspaces/{wid}/members", headers=bob, json={"username": "carol", "role": "viewer"})
    assert r.status_code == 403 and "owner" in r.json()["error"]["message"]
    c.post(f"/api/v1/workspaces/{wid}/members", headers=root, json={"username": "bob", "role": "owner"})
    r = c.post(f"/api/v1/workspaces/{wid}/members", headers=bob, json={"username": "carol", "role": "viewer"})
    assert r.status_code == 200
    members = {m["username"]: m["role"] for m in c.get(f"/api/v1/workspaces/{wid}/members", headers=carol).json()}
    assert members == {"root": "owner", "bob": "owner", "carol": "viewer"}
    # the last owner stays
    with app.state.sessions() as s:
        root_id, bob_id = auth.get_user(s, "root").id, auth.get_user(s, "bob").id
    assert c.delete(f"/api/v1/workspaces/{wid}/members/{root_id}", headers=bob).status_code == 204
    r = c.post(f"/api/v1/workspaces/{wid}/members", headers=bob, json={"username": "bob", "role": "viewer"})
    assert r.status_code == 409 and "last owner" in r.json()["error"]["message"]
    assert c.delete(f"/api/v1/workspaces/{wid}/members/{bob_id}", headers=bob).status_code == 409
    # a personal workspace is not shared
    personal = mine[0]["id"]
    r = c.post(f"/api/v1/workspaces/{personal}/members", headers=bob, json={"username": "carol", "role": "viewer"})
    assert r.status_code == 409
    # outsiders: not found
    outsider = bearer(app, "dave")
    assert c.get(f"/api/v1/workspaces/{wid}/members", headers=outsider).status_code == 404


def test_uploads_go_to_the_chosen_workspace_and_the_dashboard_follows_the_switcher(team):
    c, app, root, bob, carol = team
    wid = c.post("/api/v1/workspaces", headers=root, json={"name": "vision"}).json()["id"]
    c.post(f"/api/v1/workspaces/{wid}/members", headers=root, json={"username": "bob", "role": "editor"})
    files = {"file": ("d.zip", dataset_zip({"train": 3, "val": 2}), "application/zip")}
    r = c.post("/api/v1/datasets", headers=bob, data={"name": "team data", "workspace_id": str(wid)}, files=files)
    assert r.status_code == 201 and r.json()["workspace_id"] == wid
    shared_ds = r.json()["id"]
    r = c.post("/api/v1/datasets", headers=bob, data={"name": "my data"}, files=files)  # default: personal
    personal_ds = r.json()["id"]
    assert r.json()["workspace_id"] != wid
    r = c.post("/api/v1/datasets", headers=bob, data={"name": "x", "workspace_id": "abc"}, files=files)
    assert r.status_code == 400 and "workspace_id" in r.json()["error"]["message"]
    job = c.post("/api/v1/jobs", headers=bob, json={"dataset_id": shared_ds, "epochs": 2}).json()
    assert job["workspace_id"] == wid
    r = c.post("/api/v1/jobs", headers=bob, json={"dataset_id": shared_ds, "workspace_id": wid + 99})
    assert r.status_code == 422
    assert [d["id"] for d in c.get(f"/api/v1/datasets?workspace_id={wid}", headers=bob).json()] == [shared_ds]
    # the pages: the personal workspace first; the switcher moves the dashboard to the shared one
    page = browser(app, "bob")
    home = page.get("/").text
    assert "my data" in home and "team data" not in home and 'id="ws-select"' in home
    r = page.post("/workspaces/switch", data={"workspace_id": str(wid), "csrf_token": csrf_of(home)},
                  follow_redirects=False)
    assert r.status_code == 303
    home = page.get("/").text
    assert "team data" in home and "my data" not in home
    # a workspace that is not yours cannot be switched to
    r = page.post("/workspaces/switch", data={"workspace_id": "999", "csrf_token": csrf_of(home)})
    assert r.status_code == 404
    assert page.get(f"/datasets/{personal_ds}").status_code == 200  # links still open whatever the switcher says
    # the workspace page lists the members; only owners get the forms
    r = page.get(f"/workspaces/{wid}")
    assert r.status_code == 200 and 'data-user="root"' in r.text and 'id="member-form"' not in r.text
    admin_page = browser(app, "root").get(f"/workspaces/{wid}")
    assert 'id="member-form"' in admin_page.text


def _cfg(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def test_the_migration_moves_data_into_personal_workspaces_and_back(db_url):  # noqa: F811
    cfg = _cfg(db_url)
    command.upgrade(cfg, "0003")
    engine = create_engine(db_url)
    with engine.begin() as conn:
        now = "2026-12-01 10:00:00"
        conn.execute(text("INSERT INTO users (id, name, created_at) VALUES (1, 'admin', :t), (2, 'bob', :t)"),
                     {"t": now})
        for i, owner in ((1, 1), (2, 2), (3, 2)):
            conn.execute(text("INSERT INTO datasets (id, owner_id, name, path, layout, classes, counts, warnings, "
                              "num_images, size_bytes, created_at) VALUES (:i, :o, 'd', 'p', '', '[]', '{}', '[]', "
                              "0, 0, :t)"), {"i": i, "o": owner, "t": now})
        conn.execute(text("INSERT INTO jobs (id, owner_id, dataset_id, spec, status, cancel_requested, progress, "
                          "current_epoch, total_epochs, attempts, kind, created_at) VALUES (1, 2, 2, '{}', "
                          "'succeeded', false, 1.0, 1, 1, 1, 'train', :t)"), {"t": now})
    command.upgrade(cfg, "head")
    with engine.connect() as conn:
        ws = dict(conn.execute(text("SELECT personal_user_id, id FROM workspaces")).all())
        assert set(ws) == {1, 2}
        assert dict(conn.execute(text("SELECT id, workspace_id FROM datasets")).all()) == {1: ws[1], 2: ws[2],
                                                                                           3: ws[2]}
        assert conn.execute(text("SELECT workspace_id FROM jobs")).scalar_one() == ws[2]
        roles = conn.execute(text("SELECT user_id, role FROM memberships ORDER BY user_id")).all()
        assert [tuple(r) for r in roles] == [(1, "owner"), (2, "owner")]
        admins = conn.execute(text("SELECT name FROM users WHERE is_admin")).scalars().all()
        assert admins == ["admin"]
    command.downgrade(cfg, "0003")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM datasets")).scalar_one() == 3
        assert conn.execute(text("SELECT owner_id FROM jobs")).scalar_one() == 2
        names = set(conn.execute(select(text("name")).select_from(text("users"))).scalars())
        assert names == {"admin", "bob"}
    engine.dispose()
